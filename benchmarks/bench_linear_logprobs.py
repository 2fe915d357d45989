"""Forward+backward time and peak memory of fastpref.linear_logprobs vs the materialized baseline.

Same flags as ``fastpref bench``; run with ``--help`` for them.
"""
import sys

from fastpref.cli import bench_main

if __name__ == "__main__":
    sys.exit(bench_main())
