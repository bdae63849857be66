"""Which kernels a fused attention call launches, once dispatch has chosen its backend.

Dispatch chooses among the backends (`torch`, `triton`, `cuda`); within `cuda`, a Hopper GPU has
two sets of CUDA C++ kernels: "mma" (csrc/attention/attention_kernels.cu, the default: the
kernels that passed the GPU suite) and "wgmma" (csrc/attention/attention_hopper.cu: wgmma + TMA,
forward and backward, head dims 64 and 128; checked on the CPU emulator, never run on a GPU
yet, so opt-in). The
environment's FUSEDLM_CUDA_ATTENTION sets the preference at import, `using_cuda_kernels` for a
block. The preference in force at a call's forward is saved with it, so its backward runs the
same kernels wherever it runs. Where the wgmma kernels cannot serve a call the mma.sync ones do, and
`last_cuda_forward_kernel` / `last_cuda_backward_kernel` say which ran and why.
"""
import contextlib
import os
from typing import Optional

CUDA_KERNEL_CHOICES = ("mma", "wgmma")
cuda_kernels = os.environ.get("FUSEDLM_CUDA_ATTENTION", "mma")
last_cuda_forward_kernel: Optional[str] = None
last_cuda_backward_kernel: Optional[str] = None

# What the launchers in ops/attention.py take: the kernel family, not the dispatch backend.
KERNELS = ("triton", "cuda-mma", "cuda-wgmma")


@contextlib.contextmanager
def using_cuda_kernels(name: str):
    """Within the block, backend="cuda" attention prefers the `name` kernels ("mma" or
    "wgmma"); the previous choice comes back after."""
    global cuda_kernels
    if name not in CUDA_KERNEL_CHOICES:
        raise ValueError(f"name must be one of {CUDA_KERNEL_CHOICES}, got {name!r}")
    prev, cuda_kernels = cuda_kernels, name
    try:
        yield
    finally:
        cuda_kernels = prev


def wgmma_requested() -> bool:
    if cuda_kernels not in CUDA_KERNEL_CHOICES:
        raise ValueError(
            "FUSEDLM_CUDA_ATTENTION (fusedlm.ops.attention_kernels.cuda_kernels) must be one of "
            f"{CUDA_KERNEL_CHOICES}, got {cuda_kernels!r}")
    return cuda_kernels == "wgmma"


def kernel_for(backend: str) -> str:
    """The kernels a call that dispatch sent to `backend` ("triton" or "cuda") launches."""
    if backend == "cuda":
        return "cuda-wgmma" if wgmma_requested() else "cuda-mma"
    return backend
