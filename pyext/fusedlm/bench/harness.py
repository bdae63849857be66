"""Timing and provenance for benchmarks (DESIGN.md: Performance).

GPU times are medians from triton.testing.do_bench (CUDA events, warm-up, L2 flushed between
runs); CPU times are medians of perf_counter over repeats. Every result file records the
device, the library versions, the git commit and the command that produced it.
"""
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch


def _git_commit():
    here = os.path.dirname(os.path.abspath(__file__))
    for cwd in (os.getcwd(), here):
        try:
            out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True,
                                 text=True, timeout=5)
            if out.returncode == 0:
                dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"],
                                       cwd=cwd, capture_output=True, text=True, timeout=5).stdout
                return out.stdout.strip() + ("+dirty" if dirty.strip() else "")
        except (OSError, subprocess.SubprocessError):
            pass
    return "unknown"


def environment():
    import fusedlm
    info = {
        "command": " ".join([os.path.basename(sys.argv[0])] + sys.argv[1:]),
        "git_commit": _git_commit(),
        "fusedlm": fusedlm.__version__,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "cuda_runtime": torch.version.cuda,
        "build": fusedlm.build_info(),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    try:
        import triton
        info["triton"] = triton.__version__
    except ImportError:
        info["triton"] = None
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(torch.cuda.current_device())
        info["device"] = p.name
        info["sm_count"] = p.multi_processor_count
        info["capability"] = f"{p.major}.{p.minor}"
    else:
        info["device"] = f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"
    return info


def time_ms(fn, device_type, warmup=25, rep=100):
    """Median milliseconds per call of fn()."""
    if device_type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=warmup, rep=rep, return_mode="median")
    for _ in range(3):
        fn()
    samples = []
    deadline = time.perf_counter() + rep / 1000 * 5
    while len(samples) < 5 or (time.perf_counter() < deadline and len(samples) < 200):
        t0 = time.perf_counter()
        fn()
        samples.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(samples)


class SavedBytes:
    """Counts the bytes autograd keeps for the backward within the block: every distinct
    storage a saved tensor lives in, those of `exclude` (parameters, inputs) not counted. The
    activation memory of a step, machine-independent (the same count on a CPU as on a GPU).

        with SavedBytes(model.parameters()) as saved:
            loss = model(**batch).loss
        saved.bytes
    """

    def __init__(self, exclude=()):
        self._exclude = {t.untyped_storage().data_ptr() for t in exclude}
        self._storages = {}
        self._hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, lambda t: t)

    def _pack(self, t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in self._exclude:
            self._storages[storage.data_ptr()] = storage.nbytes()
        return t

    @property
    def bytes(self):
        return sum(self._storages.values())

    def __enter__(self):
        self._hooks.__enter__()
        return self

    def __exit__(self, *exc):
        return self._hooks.__exit__(*exc)


def chosen(available, names, base=None):
    """`available` (name -> implementation) cut to `names` (None: all of them) and the `base`
    every speed-up is measured against; a name not available here is a ValueError (a typo
    must not time nothing)."""
    if names is None:
        return available
    unknown = [n for n in names if n not in available]
    if unknown:
        raise ValueError(f"peers (--impl): {', '.join(unknown)} not available here; available: "
                         f"{', '.join(available)}")
    return {k: v for k, v in available.items() if k in names or k == base}


def collect(results, records, on_result=None):
    """Append `records` to `results` and hand each to `on_result`: a caller that saves as it goes
    (`fusedlm bench --out`) keeps what a run measured before a time limit cut it short."""
    for r in records:
        results.append(r)
        if on_result is not None:
            on_result(r)


def write_json(path, payload):
    """Written whole or not at all (a temporary file renamed over it): a run killed while
    writing leaves the previous version, never half a file."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(payload, f, indent=1)
        f.write("\n")
    os.replace(tmp, path)
