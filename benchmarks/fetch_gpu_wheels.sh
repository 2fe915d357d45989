#!/usr/bin/env bash
# Downloads the wheels of benchmarks/gpu-wheels.txt into .whl/ (ignored by git) for the GPU
# machine's Python 3.12 on x86-64, without their dependencies (the machine has those), and checks
# that every one came. The GPU proof run installs them from there with no network.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
grep -v '^#' benchmarks/gpu-wheels.txt | grep -v '^$' | while read -r requirement; do
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    -d .whl "$requirement"
done
grep -v '^#' benchmarks/gpu-wheels.txt | grep -v '^$' | while read -r requirement; do
  name=$(echo "${requirement%%==*}" | tr '-' '_')
  version=${requirement##*==}
  ls .whl/ | grep -qi "^${name}-${version}-" || { echo "missing wheel: $requirement"; exit 1; }
done
du -ch .whl/*.whl | tail -n 1
