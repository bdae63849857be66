#!/usr/bin/env bash
# Builds the fusedlm wheel that benchmarks/gpu_run.sh installs on the GPU machine (sm_90a, for its
# Python 3.12), into .whl/ (ignored; carried with run(..., carry=[".whl"])), with the source
# tree's fingerprint beside it: gpu_run.sh installs the wheel only if the tree it runs in has the
# same fingerprint, and builds from source otherwise (benchmarks/wheel_fingerprint.py).
#
#   PYTHON=/path/to/python3.12 bash benchmarks/build_wheel.sh
#
# PYTHON needs pip, scikit-build-core, pybind11, cmake and ninja (no torch: the compiled core does
# not link it); nvcc must be on PATH. FUSEDLM_CUDA_ARCHS overrides the architectures (90a).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3.12}
fp=$(python3 benchmarks/wheel_fingerprint.py .)
mkdir -p .whl
rm -f .whl/fusedlm-*.whl .whl/fusedlm.fingerprint
FUSEDLM_CUDA=ON FUSEDLM_CUDA_ARCHS=${FUSEDLM_CUDA_ARCHS:-90a} \
  "$PYTHON" -m pip wheel --no-build-isolation --no-deps -q . -w .whl
if [ "$(python3 benchmarks/wheel_fingerprint.py .)" != "$fp" ]; then
  rm -f .whl/fusedlm-*.whl
  echo "the source tree changed during the build: no wheel kept, build again" >&2
  exit 1
fi
echo "$fp" > .whl/fusedlm.fingerprint
ls .whl/fusedlm-*.whl
echo "fingerprint $fp"
