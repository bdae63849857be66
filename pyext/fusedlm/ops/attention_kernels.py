"""Which kernels a fused attention call launches, once dispatch has chosen its backend.

Dispatch chooses among the backends (`torch`, `triton`, `cuda`); within `cuda`, a Hopper GPU has
two sets of CUDA C++ kernels: "mma" (csrc/attention/attention_kernels.cu, the default: the
kernels that passed the GPU suite) and "wgmma" (csrc/attention/attention_hopper.cu: wgmma + TMA,
forward and backward, head dims 64 and 128; checked on the CPU emulator, never run on a GPU
yet, so opt-in). The
environment's FUSEDLM_CUDA_ATTENTION sets the preference at import, `using_cuda_kernels` for a
block. With neither, the measured dispatch table's entry for the case decides (its
`cuda_kernels`, from `fusedlm bench attention --tune` on that GPU), once the wgmma kernels are
GPU-verified (WGMMA_GPU_VERIFIED); else "mma". The kernels chosen at a call's forward are saved
with it, so its backward runs the same ones wherever it runs. Where the wgmma kernels cannot
serve a call the mma.sync ones do, and `last_cuda_forward_kernel` / `last_cuda_backward_kernel`
say which ran and why.
"""
import contextlib
import os
from typing import Optional

from . import dispatch

CUDA_KERNEL_CHOICES = dispatch.CUDA_KERNEL_FAMILIES  # ("mma", "wgmma")
# None: no preference (the measured table, else "mma").
cuda_kernels: Optional[str] = os.environ.get("FUSEDLM_CUDA_ATTENTION") or None
# The measured table may choose the wgmma kernels only once they have passed the GPU suite
# (tests/test_attention_hopper_gpu.py): until then only by name.
WGMMA_GPU_VERIFIED = False
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
    """Whether the wgmma kernels are asked for by name (FUSEDLM_CUDA_ATTENTION or
    `using_cuda_kernels`)."""
    if cuda_kernels is not None and cuda_kernels not in CUDA_KERNEL_CHOICES:
        raise ValueError(
            "FUSEDLM_CUDA_ATTENTION (fusedlm.ops.attention_kernels.cuda_kernels) must be one of "
            f"{CUDA_KERNEL_CHOICES}, got {cuda_kernels!r}")
    return cuda_kernels == "wgmma"


def kernel_for(backend: str, case: Optional[tuple] = None) -> str:
    """The kernels a call that dispatch sent to `backend` ("triton" or "cuda") launches; `case`:
    the call's dispatch case (AttentionCase's values), for the measured table's choice."""
    if backend != "cuda":
        return backend
    if wgmma_requested():
        return "cuda-wgmma"
    if (cuda_kernels is None and case is not None and WGMMA_GPU_VERIFIED
            and dispatch.measured_cuda_kernels("attention", case) == "wgmma"):
        return "cuda-wgmma"
    return "cuda-mma"
