"""DPO/IPO/SimPO from hidden states: materialized (TRL) vs Liger-Kernel vs Cut Cross-Entropy vs fastpref.

Same flags as ``fastpref bench loss-head``; run with ``--help`` for them.
"""
import sys

from fastpref.cli import bench_main

if __name__ == "__main__":
    sys.exit(bench_main("loss-head"))
