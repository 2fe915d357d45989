#!/usr/bin/env bash
# Everything a CUDA machine is needed for, in one go: the GPU tests, then every benchmark op with
# its GPU defaults and the three losses at the Llama-3-8B head. Results go to
# benchmarks/results/<gpu name>/ (or the folder given as the first argument), one file per op.
set -euo pipefail
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")
out=${1:-benchmarks/results/$gpu}
mkdir -p "$out"
{
  echo "# GPU tests: $(date -u '+%Y-%m-%d %H:%M UTC'), $gpu"
  echo
  echo '```'
  python -m pytest -q -m gpu tests/ 2>&1 | tail -n 40
  echo '```'
} > "$out/gpu-tests.md"
fastpref bench all --out-dir "$out"
fastpref bench loss-head --model llama3-8b --tokens 16384 --loss sigmoid ipo simpo --out "$out/cuda-loss-head-losses"
