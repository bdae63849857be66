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

log "benchmarks (JSON, CSV and PNG per op)"
for op in layer_norm lm_loss attention model; do
  extra=(); [ "$op" = layer_norm ] && extra=(--rows 16384 65536)
  python3 -m fusedlm.cli bench "$op" "${extra[@]}" --out "$OUT/$op.json" --csv "$OUT/$op.csv" \
    --plot "$OUT/$op.png" 2>&1 | tee -a "$OUT/bench.log" | tail -60
done
log "check and the pretraining demo (fusedlm demo: bf16, fused kernels vs Hugging Face)"
python3 -m fusedlm.cli demo --out "$OUT/pretrain" --no-progress 2>&1 | tee "$OUT/demo.log" | tail -40
log "demo exit: ${PIPESTATUS[0]}"
log "done"
