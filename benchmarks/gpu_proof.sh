#!/usr/bin/env bash
# The GPU proof run, one command on a bare H100/H200 (torch and Triton preinstalled, no network):
# installs the wheels carried in .whl/ (benchmarks/fetch_gpu_wheels.sh puts them there) and
# fastpref itself, then runs python -m fastpref.bench.proof with the arguments given (see its
# --help): GPU tests, device ceilings, the op and the DPO loss head at the headline shape, an
# end-to-end step, each under its own time limit, results in benchmarks/results/<gpu name>/.
#
#   bash benchmarks/gpu_proof.sh              # on the GPU machine
#   bash benchmarks/gpu_proof.sh --dry-run    # the same plumbing on a CPU, nothing installed
set -uo pipefail
cd "$(dirname "$0")/.."
started=$(date +%s)
python=${PYTHON:-python3}

dry_run=0
for argument in "$@"; do
  [ "$argument" = "--dry-run" ] && dry_run=1
done

install() {
  if [ "$dry_run" = 1 ]; then
    echo "[proof] dry run, not run: $*"
  else
    echo "[proof] $*"
    "$@" || { echo "[proof] install failed: $*"; exit 1; }
  fi
}

if compgen -G ".whl/*.whl" > /dev/null; then
  # --target keeps the machine's own packages as they are; the carried ones come first on the path.
  install "$python" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/fastpref-wheels .whl/*.whl
  [ "$dry_run" = 1 ] || export PYTHONPATH="/tmp/fastpref-wheels${PYTHONPATH:+:$PYTHONPATH}"
else
  echo "[proof] no wheels in .whl/: the peers that need them (Liger-Kernel, Cut Cross-Entropy, TRL) will be rows that say so"
fi
install "$python" -m pip install -q --no-index --no-deps --no-build-isolation -e .
# Peers the wheel set cannot bring (benchmarks/gpu-wheels.txt says why): their rows say "n/a (...)".
"$python" -c "import cutlass" 2> /dev/null ||
  echo "[proof] no CuTe DSL (nvidia-cutlass-dsl, an 84 MiB wheel, over the 64 MiB carried): Liger's CuTe head and QuACK will be rows that say so"
"$python" -c "import torch.nn.functional as F; F.linear_cross_entropy" 2> /dev/null ||
  echo "[proof] this torch has no F.linear_cross_entropy (torch >= 2.13): PyTorch's native head will be rows that say so"

exec "$python" -m fastpref.bench.proof --started "$started" "$@"
