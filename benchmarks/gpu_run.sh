#!/usr/bin/env bash
# One call on the GPU machine: build, run the GPU tests and the benchmarks, write under $OUT.
#   run(command="bash benchmarks/gpu_run.sh", carry=[".whl"])   # .whl: optional peer wheels
# The machine has torch, triton, pybind11, scikit-build-core, cmake, ninja and nvcc, and no
# package registry: build without isolation and without dependencies.
set -uo pipefail
OUT=${OUT:-$PWD/out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
log() { echo "== $*" | tee -a "$OUT/summary.txt"; }

if ls .whl/*.whl >/dev/null 2>&1; then   # Liger-Kernel etc., carried as wheels
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi

log "nvidia-smi"; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee -a "$OUT/summary.txt"
log "build (sm_90a only, to save time here)"
start=$(date +%s)
FUSEDLM_CUDA=ON FUSEDLM_CUDA_ARCHS=90a python3 -m pip install --no-build-isolation --no-deps -q . \
  > "$OUT/build.log" 2>&1 || { log "BUILD FAILED"; tail -50 "$OUT/build.log"; exit 1; }
log "built in $(( $(date +%s) - start )) s"
cd /tmp   # import the installed package, not the source tree
python3 -c "import fusedlm, json; print(json.dumps(fusedlm.build_info()))" | tee -a "$OUT/summary.txt"

log "GPU tests"
python3 -m pytest "$OLDPWD/tests" -q -x --timeout=900 -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -30
log "tests exit: ${PIPESTATUS[0]}"

log "benchmarks"
python3 -m fusedlm.cli bench layer_norm --rows 16384 65536 --out "$OUT/layer_norm.json" \
  2>&1 | tee "$OUT/bench.log" | tail -80
python3 -m fusedlm.cli bench lm_loss --out "$OUT/lm_loss.json" 2>&1 | tee -a "$OUT/bench.log" | tail -40
python3 -m fusedlm.cli bench attention --out "$OUT/attention.json" 2>&1 | tee -a "$OUT/bench.log" | tail -60
python3 -m fusedlm.cli bench model --out "$OUT/model.json" 2>&1 | tee -a "$OUT/bench.log" | tail -30
log "done"
