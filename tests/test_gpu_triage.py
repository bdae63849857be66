"""The Hopper kernels' triage script (benchmarks/attention_wgmma_smoke.py) must get through a run
in which cases fail, fault or hang: its supervisor is checked here with stand-in workers."""
import importlib.util
import pathlib
import sys
import textwrap

_PATH = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "attention_wgmma_smoke.py"
_spec = importlib.util.spec_from_file_location("attention_wgmma_smoke", _PATH)
smoke = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(smoke)

# Case 0 passes, 1 fails its check, 2 kills its worker in the backward, 3 hangs, 4 passes.
_WORKER = textwrap.dedent("""
    import os, sys, time
    def emit(*words): print("@@ " + " ".join(map(str, words)), flush=True)
    for i in range(int(sys.argv[1]), 5):
        emit("case", i)
        print(f"case {i} output", flush=True)
        if i == 2:
            emit("stage", "backward")
            os._exit(3)
        if i == 3:
            time.sleep(60)
        emit("fail" if i == 1 else "ok", i)
""")


def test_supervisor_reports_each_case_and_goes_on_past_a_fault_and_a_hang():
    log = []
    starts = []

    def argv(start):
        starts.append(start)
        return [sys.executable, "-c", _WORKER, str(start)]

    status = smoke.supervise(argv, 5, case_timeout=2.0, log=log.append)
    assert status == {0: "ok", 1: "fail", 2: "crash", 3: "hang", 4: "ok"}
    assert starts == [0, 3, 4]  # a fresh worker after the fault and after the hang
    assert "!! worker died in case 2 at backward; its last lines:" in log
    assert "!!   case 2 output" in log
    assert any(line.startswith("!! worker hung (no line for 2 s) in case 3 at forward") for line in log)
    assert "case 4 output" in log


def test_supervisor_reports_a_worker_that_cannot_start():
    log = []
    status = smoke.supervise(lambda start: [sys.executable, "-c", "print('no torch here'); raise SystemExit(1)"],
                             3, case_timeout=5.0, log=log.append)
    assert status == {0: "not run", 1: "not run", 2: "not run"}
    assert "!! worker died before its first case; its last lines:" in log and "!!   no torch here" in log


def test_the_cases_themselves_run_and_check_on_the_cpu():
    """The script's own cases, workers and checks, through the torch backend on the CPU: what
    the GPU run will do, less the kernels (a broken case builder or check would otherwise be
    found on the GPU's time)."""
    import subprocess
    run = subprocess.run([sys.executable, str(_PATH), "--cpu"], capture_output=True, text=True, timeout=600)
    n = len(smoke._cases())
    probes = sum(name.startswith("probe") for name, _ in smoke._cases())
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert f"cases: {n} of {n} passed" in run.stdout
    assert run.stdout.count("rel err out") == n - probes  # the probes need the compiled core
    assert run.stdout.count("(no probe on the torch backend)") == probes == 4


def test_supervisor_flags_a_case_whose_worker_fails_after_reporting_it():
    """compute-sanitizer (--error-exitcode) reports memory errors by the worker's exit code,
    after the case itself said ok."""
    worker = 'print("@@ case 0", flush=True); print("@@ ok 0", flush=True); raise SystemExit(7)'
    log = []
    assert smoke.supervise(lambda start: [sys.executable, "-c", worker], 1, 5.0, log=log.append) == {0: "crash"}
    assert "!! worker died in case 0 at its end (after its result); its last lines:" in log
