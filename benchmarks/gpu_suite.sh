#!/usr/bin/env bash
# Everything a CUDA machine is needed for, in one go: the GPU tests, then every benchmark op with
# its GPU defaults, then the three losses at the Llama-3-8B head. Results go to
# benchmarks/results/<gpu name>/ (or the folder given as the first argument), one file per op.
# Each step gets a time limit (seconds, the second argument, default 150); when it runs out the op
# is interrupted and writes the rows it has measured.
set -uo pipefail
gpu=$(python -c "import torch; print(torch.cuda.get_device_name().lower().replace(' ', '-'))")
out=${1:-benchmarks/results/$gpu}
limit=${2:-150}
mkdir -p "$out"
{
  echo "# GPU tests: $(date -u '+%Y-%m-%d %H:%M UTC'), $gpu"
  echo
  echo '```'
  timeout -s INT "$limit" python -m pytest -q -m gpu tests/ 2>&1 | tail -n 40
  echo '```'
} > "$out/gpu-tests.md"
for op in logprobs loss-head end-to-end; do
  timeout -s INT "$limit" fastpref bench "$op" --out "$out/cuda-$op"
done
timeout -s INT "$limit" fastpref bench loss-head --model llama3-8b --tokens 16384 --loss sigmoid ipo simpo \
  --out "$out/cuda-loss-head-losses"
