"""Lazy access to the Triton kernel modules, shared by every op.

A kernel module is imported on first use, not at `import fusedlm`, so that a program can still
choose TRITON_INTERPRET after importing fusedlm, and a machine without triton imports fusedlm.
"""
import importlib
import os
import threading

_MODULES = {}
# Triton's interpreter patches triton.language module-wide while a kernel runs: two threads
# interpreting at once break each other, so interpreted launches take turns.
_INTERPRETER_LOCK = threading.Lock()


def kernels(name):
    """fusedlm.kernels.<name>, or None if triton is not importable (see `why_unavailable`)."""
    if name not in _MODULES:
        try:
            module, error = importlib.import_module(f"fusedlm.kernels.{name}"), None
        except ImportError as e:  # triton is not installed (it is optional off Linux)
            module, error = None, f"triton is not importable ({e})"
        _MODULES[name] = (module, error, os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"))
    return _MODULES[name][0]


def device_problem(name, device_type):
    """None if the Triton kernels of `name` can run on `device_type` here, else why not."""
    if kernels(name) is None:
        return _MODULES[name][1]
    if device_type == "cpu" and not _MODULES[name][2]:
        return "Triton runs on CUDA tensors (CPU tensors only under TRITON_INTERPRET=1)"
    if device_type not in ("cuda", "cpu"):
        return f"Triton does not run on device type {device_type}"
    return None


def run(name, launcher, *args, **kwargs):
    """kernels(name).<launcher>(*args, **kwargs), one interpreted launch at a time."""
    fn = getattr(kernels(name), launcher)
    if not _MODULES[name][2]:
        return fn(*args, **kwargs)
    with _INTERPRETER_LOCK:
        return fn(*args, **kwargs)
