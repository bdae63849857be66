#!/usr/bin/env bash
# One call on the GPU machine: install (or build), run the GPU tests and the benchmarks, and bring
# everything back as $OUT/gpu_run.tar.gz plus $OUT/summary.txt.
#
#   run(command="bash benchmarks/gpu_run.sh", carry=[".whl"])
#   run(command="STEPS='cuda-tests:120 bench-attention:300' bash benchmarks/gpu_run.sh", carry=[".whl"])
#
# .whl (ignored, optional) holds wheels: a fusedlm wheel for the machine's Python, built from
# this tree by benchmarks/build_wheel.sh (saves the build there; a wheel from another tree is
# not installed, see below), and peers (Liger-Kernel, Cut
# Cross-Entropy). The machine has torch, triton, pybind11, scikit-build-core, cmake, ninja and
# nvcc, and no package registry: build without isolation and without dependencies.
#
# STEPS: "name:seconds" items run in order, each under its own time limit so the script always
# gets to pack its results (the call's own limit is 10 minutes); STEPS="" installs and stops.
# some-tests runs $SOME_TESTS (pytest node ids relative to the repository); attn-tests takes a
# -k expression in $TEST_K; bench-attention takes more arguments in $ATTN_ARGS (e.g. "--impl
# sdpa[cudnn] fusedlm[triton]"), bench-lm_loss in $LOSS_ARGS (e.g. "--case gpt2 llama-8k").
# profile-host (host time or kernel time, per attention case) takes case names in $PROFILE_CASES;
# lm-loss-align A/Bs the LM loss's vocabulary padding; wgmma-smoke, wgmma-sanitize and
# hopper-tests check the Hopper CUDA C++ kernels (see the step list below).
set -uo pipefail
OUT=${OUT:-$PWD/out}
SRC=$PWD
W=${GPU_RUN_WORK:-/tmp/gpu_run}  # scratch (a test points it elsewhere)
rm -rf "$W" && mkdir -p "$W" "$OUT"
export PYTHONUNBUFFERED=1
# The default fits one 10-minute call (about 540 s of steps; the install takes seconds with a
# carried wheel). On the first H100 run the full suite (`tests`, -n 8) needed more than 230 s,
# `bench-attention` 184 s, `bench-model` more than 80 s: a second call can take
# STEPS='tests:300 bench-layer_norm:90 bench-model:150'.
STEPS=${STEPS-"gpu-tests:180 bench-attention:200 bench-lm_loss:60 demo:100"}  # STEPS="": install only
# STEPS=scoreboard: a GPU session's first call (about 8 minutes of steps): the GPU suite, the
# model step (BERT-base at 0% and 50% padding, GPT-2 small), the LM loss, an attention subset,
# layer norm at 16k rows, and the smoke run of the Hopper kernels that have never run.
if [ "$STEPS" = scoreboard ]; then
  STEPS="gpu-tests:120 bench-model:165 bench-lm_loss:50 bench-attention:75 bench-layer_norm:30 wgmma-smoke:40"
  # fusedlm[cuda]: the mma.sync kernels (2026-11-30), never timed on a GPU yet.
  ATTN_ARGS=${ATTN_ARGS:-"--seq 512 2048 --head-dim 64 128 --impl sdpa[cudnn] fusedlm[triton] fusedlm[cuda]"}
  # The LM-loss issue's three cases (about ten implementations each, a torch.compile per case):
  # the five default ones would not fit the step's 50 s.
  LOSS_ARGS=${LOSS_ARGS:-"--case bert-mlm gpt2 large-vocab"}
  LN_ROWS=${LN_ROWS:-16384}
  # BERT-base and GPT-2 small only (the Llama-style case is a later call's), at 0% and 50%
  # padding: the compiled rows need about a minute of compiling each, so the step keeps what it
  # reaches, Hugging Face compiled and fusedlm packed compiled first (bench/model.py).
  MODEL_ARGS=${MODEL_ARGS:-"--case bert-base gpt2-small"}
fi
log() { echo "== $*" | tee -a "$W/summary.txt"; }
pack() { cp "$W/summary.txt" "$OUT/" 2>/dev/null; tar czf "$OUT/gpu_run.tar.gz" -C "$W" . ; }
trap pack EXIT

nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm --format=csv | tee -a "$W/summary.txt"

peers=$(ls .whl/*.whl 2>/dev/null | grep -v '/fusedlm-' || true)
if [ -n "$peers" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site $peers \
    && export PYTHONPATH=/tmp/site && log "peers: $(ls /tmp/site | grep -i dist-info | tr '\n' ' ')"
fi
start=$(date +%s)
# A carried wheel is installed only if it was built from this very tree (benchmarks/build_wheel.sh
# writes the fingerprint beside it): a stale one would run old kernels and an old package under
# this tree's tests, and its results would be credited to this tree.
wheel=$(ls .whl/fusedlm-*-cp312-*.whl 2>/dev/null | head -n 1)
if [ -z "${SKIP_INSTALL:-}" ] && [ -n "$wheel" ] \
   && ! why=$(python3 benchmarks/wheel_fingerprint.py --check .whl/fusedlm.fingerprint .); then
  log "NOT installing the carried wheel: $why; building from source"
  wheel=
fi
log "source fingerprint $(python3 benchmarks/wheel_fingerprint.py .)"
if [ -n "${SKIP_INSTALL:-}" ]; then
  log "using the installed fusedlm (SKIP_INSTALL)"
elif [ -n "$wheel" ]; then
  python3 -m pip install -q --no-index --no-deps --force-reinstall "$wheel" > "$W/build.log" 2>&1 \
    || { log "WHEEL INSTALL FAILED"; tail -20 "$W/build.log"; exit 1; }
  # Built on another machine's image: its compiled core may not load against this one's system
  # libraries (libstdc++, glibc). Then build here rather than lose the call.
  if ! (cd /tmp && python3 -c "import fusedlm._C") > "$W/wheel_import.log" 2>&1; then
    log "the carried wheel's compiled core does not load here ($(tail -n 1 "$W/wheel_import.log" | cut -c1-160)); building from source"
    wheel=
  else
    log "installed the carried wheel (built from this tree) in $(( $(date +%s) - start )) s"
  fi
fi
if [ -z "${SKIP_INSTALL:-}" ] && [ -z "$wheel" ]; then
  FUSEDLM_CUDA=ON FUSEDLM_CUDA_ARCHS=90a python3 -m pip install --no-build-isolation --no-deps -q . \
    > "$W/build.log" 2>&1 || { log "BUILD FAILED"; tail -50 "$W/build.log"; exit 1; }
  log "built (sm_90a) in $(( $(date +%s) - start )) s"
fi
cd /tmp   # import the installed package, not the source tree
python3 -c "import fusedlm, json; print(json.dumps(fusedlm.build_info()))" | tee -a "$W/summary.txt"

BENCH="python3 -m fusedlm.cli bench"
files() { echo "--out $W/$1.json --csv $W/$1.csv --plot $W/$1.png"; }
PYTEST=(python3 -m pytest -v -rfE -p no:cacheprovider --timeout=120)
run_step() {
  local name=$1 limit=$2
  case $name in
    cuda-tests) cmd=("${PYTEST[@]}" "$SRC/tests/test_attention_gpu.py" -k cuda) ;;
    attn-tests) cmd=("${PYTEST[@]}" -n 4 "$SRC/tests/test_attention_gpu.py" -k "${TEST_K:-}") ;;
    gpu-tests) cmd=("${PYTEST[@]}" -n 4 "$SRC/tests" -m "gpu and not opt_in") ;;
    # The Triton kernels' opt-in paths (TMA, atomic dQ): each new autotuned class compiles its
    # candidates, time the scoreboard's gpu-tests keeps for the default paths.
    opt-in-tests) cmd=("${PYTEST[@]}" -n 4 "$SRC/tests" -m "gpu and opt_in") ;;
    tests) cmd=("${PYTEST[@]}" -n 8 --durations=15 "$SRC/tests") ;;
    some-tests) cmd=("${PYTEST[@]}" --tb=short $(for t in $SOME_TESTS; do echo "$SRC/$t"; done)) ;;
    bench-attention) cmd=($BENCH attention ${ATTN_ARGS:-} $(files attention)) ;;
    bench-layer_norm) cmd=($BENCH layer_norm --rows ${LN_ROWS:-16384 65536} $(files layer_norm)) ;;
    # What dropout's Philox draws cost (four elements a draw since 2026-12-01): BERT's dropout,
    # add & norm at BERT-base's rows, and attention at BERT-base's shape, with dropout 0.1.
    bench-ln-dropout) cmd=($BENCH layer_norm --rows 16384 --widths 768 1024 --dtype bf16
                           --dropout 0.1 $(files layer_norm-dropout)) ;;
    bench-attention-dropout) cmd=($BENCH attention --seq 512 2048 --head-dim 64 --dropout 0.1
                                  --impl "sdpa[flash]" "sdpa[cudnn]" "fusedlm[triton]" "fusedlm[cuda]"
                                  $(files attention-dropout)) ;;
    # The measured dispatch table for this GPU (commit $OUT's measured_dispatch.json as
    # pyext/fusedlm/ops/measured_dispatch.json once the GPU suite has passed on these kernels).
    tune-layer_norm) cmd=($BENCH layer_norm --dtype bf16 fp16 fp32 --rows 16384
                          --tune "$W/measured_dispatch.json" $(files layer_norm-tune)) ;;
    # The LM loss's entries (per dtype and vocabulary) into the same table: fusedlm's backends
    # alone (and the full-logits base), every default case.
    tune-lm_loss) cmd=($BENCH lm_loss --impl "fusedlm[triton]" "fusedlm[cuda]"
                       --tune "$W/measured_dispatch.json" $(files lm_loss-tune)) ;;
    # Attention's entries (per dtype, head dim, causal and sequence length; fwd+bwd), with
    # which CUDA C++ kernel family and which Triton backward (dQ kernel or atomic dQ) is faster
    # where both run (tune-attention is the Triton kernels' autotuning sweep, another thing).
    tune-attention-dispatch) cmd=($BENCH attention --impl "fusedlm[triton]" "fusedlm[cuda]"
                                  "fusedlm[triton-atomic-dq]"
                                  $( [ "$(nvidia-smi --query-gpu=compute_cap --format=csv,noheader | head -1)" = 9.0 ] && echo "fusedlm[cuda-wgmma]")
                                  --tune "$W/measured_dispatch.json" $(files attention-tune)) ;;
    bench-lm_loss) cmd=($BENCH lm_loss ${LOSS_ARGS:-} $(files lm_loss)) ;;
    bench-model) cmd=($BENCH model ${MODEL_ARGS:-} $(files model)) ;;
    bench-mlp) cmd=($BENCH mlp ${MLP_ARGS:-} $(files mlp)) ;;
    bench-host) cmd=($BENCH host $(files host)) ;;
    ncu-attention) cmd=(ncu --kernel-name regex:attention_ --launch-count 3 --section SpeedOfLight
                        --section Occupancy --section LaunchStats --section WarpStateStats
                        --section MemoryWorkloadAnalysis python3 "$SRC/benchmarks/profile_attention.py" cuda) ;;
    tune-attention) cmd=(python3 "$SRC/benchmarks/tune_attention.py" ${TUNE_ARGS:-}) ;;
    lm-loss-align) cmd=(python3 "$SRC/benchmarks/lm_loss_gemm_align.py") ;;
    profile-host) cmd=(python3 "$SRC/benchmarks/profile_host.py" ${PROFILE_CASES:-}) ;;
    # The Hopper CUDA C++ kernels (opt-in): triage cases (each in a worker process that a fault
    # or hang does not outlive) and times, the same cases under compute-sanitizer, and their
    # test suite. bench-attention times them as fusedlm[cuda-wgmma]
    # when ATTN_ARGS names it (--impl ... fusedlm[cuda-wgmma]).
    wgmma-smoke) cmd=(python3 "$SRC/benchmarks/attention_wgmma_smoke.py") ;;
    wgmma-sanitize) cmd=(python3 "$SRC/benchmarks/attention_wgmma_smoke.py" --no-time --case-timeout 120
                         --wrap "compute-sanitizer --tool memcheck --error-exitcode 7") ;;
    hopper-tests) cmd=("${PYTEST[@]}" -n 4 "$SRC/tests/test_attention_hopper_gpu.py") ;;
    # flash-attention's own test suite against fusedlm.flash_attn_interface: needs a copy of its
    # tests/test_flash_attn.py in flash_attn_tests/ (ignored: carry=[".whl", "flash_attn_tests"])
    # and einops' wheel in .whl (installed with the peers).
    flash-attn-suite) cmd=(python3 "$SRC/tests/flash_attn_suite/run.py" --device cuda
                           --suite "$SRC/flash_attn_tests/test_flash_attn.py"
                           --per-test "${FA_PER_TEST:-40}" --json "$W/flash_attn_suite.json") ;;
    # On the time limit's SIGTERM the demo prints every thread's stack (where it was stuck).
    demo) cmd=(python3 -c "import faulthandler, signal, sys; faulthandler.register(signal.SIGTERM);
from fusedlm.cli import main; sys.exit(main(sys.argv[1:]))" demo --out "$W/pretrain" --no-progress) ;;
    *) log "unknown step $name"; return ;;
  esac
  log "$name (limit ${limit} s)"
  local t0=$(date +%s)
  timeout -k 10 "$limit" "${cmd[@]}" > "$W/$name.log" 2>&1
  local rc=$?
  log "$name: exit $rc after $(( $(date +%s) - t0 )) s$([ $rc = 124 ] && echo ' (TIME LIMIT)')"
  tail -n 40 "$W/$name.log" | cut -c1-200
}
for item in $STEPS; do
  run_step "${item%%:*}" "${item##*:}"
done
log "done"
