"""fastpref.linear_logprobs alone vs the materialized baseline: forward+backward time and peak memory.

Same flags as ``fastpref bench logprobs``; run with ``--help`` for them.
"""
import sys

from fastpref.cli import bench_main

if __name__ == "__main__":
    sys.exit(bench_main("logprobs"))
