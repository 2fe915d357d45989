"""One DPO training step of a Llama model: TRL-style padded vs Liger-Kernel vs fastpref packed.

Same flags as ``fastpref bench end-to-end``; run with ``--help`` for them.
"""
import sys

from fastpref.cli import bench_main

if __name__ == "__main__":
    sys.exit(bench_main("end-to-end"))
