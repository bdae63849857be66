"""A wheel carried to the GPU machine runs there only if it was built from the tree it runs in
(benchmarks/wheel_fingerprint.py, benchmarks/gpu_run.sh): a stale wheel would run old kernels and
an old package under the new tree's tests and benchmarks, and nothing would say so."""
import importlib.util
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("wheel_fingerprint",
                                               ROOT / "benchmarks" / "wheel_fingerprint.py")
wf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(wf)

WHEEL = "fusedlm-0.1.0-cp312-cp312-linux_x86_64.whl"


def _tree(tmp_path):
    """A stand-in source tree: the wheel's inputs and something that is not one."""
    root = tmp_path / "src"
    for rel, text in {"CMakeLists.txt": "project(x)\n", "pyproject.toml": "[project]\n",
                      "csrc/attention/attention.cu": "// kernel\n", "kernels/attention.py": "K = 1\n",
                      "pyext/fusedlm/__init__.py": "X = 1\n", "tests/test_x.py": "T = 1\n"}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    return root


def test_fingerprint_follows_every_input_and_nothing_else(tmp_path):
    root = _tree(tmp_path)
    base = wf.fingerprint(root)
    assert base == wf.fingerprint(root) and len(base) == 64

    # Not inputs of the wheel, or left out as .gitignore leaves them out: no change.
    (root / "tests" / "test_x.py").write_text("T = 2\n")
    (root / "pyext" / "fusedlm" / "__pycache__").mkdir()
    (root / "pyext" / "fusedlm" / "__pycache__" / "__init__.cpython-312.pyc").write_bytes(b"\0")
    (root / "pyext" / "fusedlm" / "_C.cpython-312-x86_64-linux-gnu.so").write_bytes(b"\0")
    (root / "build").mkdir()
    (root / "build" / "CMakeCache.txt").write_text("x\n")
    assert wf.fingerprint(root) == base

    # Each kind of change to an input: a new fingerprint, and going back restores the old one.
    kernel = root / "csrc" / "attention" / "attention.cu"
    kernel.write_text("// kernel, changed\n")
    assert wf.fingerprint(root) != base
    kernel.write_text("// kernel\n")
    assert wf.fingerprint(root) == base
    (root / "kernels" / "new.py").write_text("")
    assert wf.fingerprint(root) != base
    (root / "kernels" / "new.py").unlink()
    (root / "pyext" / "fusedlm" / "__init__.py").rename(root / "pyext" / "fusedlm" / "init.py")
    assert wf.fingerprint(root) != base
    (root / "pyext" / "fusedlm" / "init.py").rename(root / "pyext" / "fusedlm" / "__init__.py")
    (root / "CMakeLists.txt").write_text("project(y)\n")
    assert wf.fingerprint(root) != base


def test_fingerprint_names_what_is_missing_from_a_tree(tmp_path):
    with pytest.raises(FileNotFoundError, match="csrc"):
        wf.fingerprint(tmp_path)


def test_check_accepts_only_the_tree_the_fingerprint_was_taken_from(tmp_path):
    root = _tree(tmp_path)
    record = tmp_path / "fusedlm.fingerprint"
    assert "no fingerprint beside the wheel" in wf.check(record, root)
    record.write_text(wf.fingerprint(root) + "\n")
    assert wf.check(record, root) is None
    assert wf.main(["--check", str(record), str(root)]) == 0
    (root / "kernels" / "attention.py").write_text("K = 2\n")
    assert "built from another source tree" in wf.check(record, root)
    assert wf.main(["--check", str(record), str(root)]) == 1


def _gpu_run(tmp_path, root, core_loads=True):
    """benchmarks/gpu_run.sh with no steps in `root`, with stand-ins for nvidia-smi and for pip
    (which records what it was asked to install), and for the check that the installed
    compiled core loads (`core_loads`); -> (summary, pip's calls)."""
    (root / "benchmarks").mkdir()
    for name in ("gpu_run.sh", "wheel_fingerprint.py"):
        shutil.copy(ROOT / "benchmarks" / name, root / "benchmarks" / name)
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    pip_log = tmp_path / "pip.log"
    (bin_dir / "nvidia-smi").write_text("#!/bin/sh\necho 'name, stand-in'\n")
    # python3 -m pip ...: recorded, not run; anything else: this interpreter.
    load = "exit 0" if core_loads else "echo 'ImportError: GLIBCXX_3.4.32 not found' >&2; exit 1"
    (bin_dir / "python3").write_text(
        f'#!/bin/sh\nif [ "$1" = -m ] && [ "$2" = pip ]; then echo "$@" >> {pip_log}; exit 0; fi\n'
        f'if [ "$2" = "import fusedlm._C" ]; then {load}; fi\n'
        f'exec {sys.executable} "$@"\n')
    for exe in bin_dir.iterdir():
        exe.chmod(0o755)
    env = dict(os.environ, PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", STEPS="",
               OUT=str(tmp_path / "out"), GPU_RUN_WORK=str(tmp_path / "work"))
    subprocess.run(["bash", "benchmarks/gpu_run.sh"], cwd=root, env=env, check=True,
                   capture_output=True, timeout=120)
    summary = (tmp_path / "out" / "summary.txt").read_text()
    return summary, pip_log.read_text().splitlines()


def test_gpu_run_installs_a_wheel_built_from_its_own_tree(tmp_path):
    root = _tree(tmp_path)
    (root / ".whl").mkdir()
    (root / ".whl" / WHEEL).write_bytes(b"stand-in")
    (root / ".whl" / "fusedlm.fingerprint").write_text(wf.fingerprint(root) + "\n")
    summary, pip = _gpu_run(tmp_path, root)
    assert "installed the carried wheel (built from this tree)" in summary
    assert f"source fingerprint {wf.fingerprint(root)}" in summary
    assert len(pip) == 1 and pip[0].endswith(f".whl/{WHEEL}")


def test_gpu_run_builds_from_source_when_the_carried_wheel_does_not_load(tmp_path):
    """A wheel built here may not load against the GPU machine's system libraries: the script
    says so and builds there instead of running every step on a broken install."""
    root = _tree(tmp_path)
    (root / ".whl").mkdir()
    (root / ".whl" / WHEEL).write_bytes(b"stand-in")
    (root / ".whl" / "fusedlm.fingerprint").write_text(wf.fingerprint(root) + "\n")
    summary, pip = _gpu_run(tmp_path, root, core_loads=False)
    assert "compiled core does not load here (ImportError: GLIBCXX_3.4.32 not found)" in summary
    assert "built (sm_90a)" in summary and "installed the carried wheel" not in summary
    assert len(pip) == 2 and pip[0].endswith(f".whl/{WHEEL}") and pip[1].split()[-1] == "."


@pytest.mark.parametrize("record", ["stale", "missing"])
def test_gpu_run_builds_from_source_rather_than_run_a_wheel_of_another_tree(tmp_path, record):
    root = _tree(tmp_path)
    (root / ".whl").mkdir()
    (root / ".whl" / WHEEL).write_bytes(b"stand-in")
    if record == "stale":
        (root / ".whl" / "fusedlm.fingerprint").write_text(wf.fingerprint(root) + "\n")
        (root / "csrc" / "attention" / "attention.cu").write_text("// changed after the build\n")
    summary, pip = _gpu_run(tmp_path, root)
    assert "NOT installing the carried wheel" in summary and "building from source" in summary
    assert "built (sm_90a)" in summary
    assert len(pip) == 1 and WHEEL not in pip[0] and pip[0].split()[-1] == "."


def test_gpu_run_scoreboard_names_known_steps_within_8_minutes():
    """STEPS=scoreboard, a GPU session's first call: every step it names exists in run_step,
    and their limits sum to at most 8 minutes (the call's limit is 10)."""
    import re
    script = (ROOT / "benchmarks" / "gpu_run.sh").read_text()
    steps = re.search(r'if \[ "\$STEPS" = scoreboard \]; then\n  STEPS="([^"]+)"', script).group(1)
    known = set(re.findall(r"^    ([a-z_-]+)\) cmd=", script, re.M))
    items = [s.split(":") for s in steps.split()]
    assert {name for name, _ in items} <= known, {name for name, _ in items} - known
    assert sum(int(limit) for _, limit in items) <= 480
    assert {"gpu-tests", "bench-model", "bench-lm_loss", "bench-attention", "bench-layer_norm"} <= {n for n, _ in items}
