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

Within `triton`, the backward's dQ comes from its own kernel ("triton", the default) or from the
dK/dV kernel's fp32 atomics ("triton-atomic-dq": FlashAttention-2's backward, 5 matrix products
a block pair instead of 7, dQ's last bits varying from run to run, head dims up to 128). The
measured table's `triton_kernels` picks the atomic one for a case once it is GPU-verified
(ATOMIC_DQ_GPU_VERIFIED); FUSEDLM_TRITON_ATOMIC_DQ=1 asks for it everywhere it serves
(kernels/attention.py). `deterministic=True` never takes it.
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
# Likewise for the Triton backward's atomic dQ (tests/test_attention_gpu.py, marker opt_in).
ATOMIC_DQ_GPU_VERIFIED = False
last_cuda_forward_kernel: Optional[str] = None
last_cuda_backward_kernel: Optional[str] = None

# What the launchers in ops/attention.py take: the kernel family, not the dispatch backend.
KERNELS = ("triton", "triton-atomic-dq", "cuda-mma", "cuda-wgmma")


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
    if backend == "triton":
        if (case is not None and ATOMIC_DQ_GPU_VERIFIED
                and dispatch.measured_kernels("attention", case, "triton_kernels") == "atomic-dq"):
            return "triton-atomic-dq"
        return "triton"
    if backend != "cuda":
        return backend
    if wgmma_requested():
        return "cuda-wgmma"
    if (cuda_kernels is None and case is not None and WGMMA_GPU_VERIFIED
            and dispatch.measured_kernels("attention", case, "cuda_kernels") == "wgmma"):
        return "cuda-wgmma"
    return "cuda-mma"


def probe_wgmma(head_dim: int = 64, dtype=None, device=None) -> dict:
    """The Hopper kernels' primitives, one at a time (fusedlm._C's attention_wgmma_probe;
    csrc/attention/attention.h says what it runs): a GPU's first check that the hardware reads
    them as the kernels, and the CPU emulator written from the same documents, assume. Returns,
    per primitive, the largest error against its reference: "tma_swizzle" (q's 64-row tile in
    shared memory against the 128-byte swizzle's placement: 16-byte chunk c of row r lands at
    chunk c ^ (r % 8); 0 when exact), "wgmma_ss" (q k^T over 64 keys, both operands K-major in
    shared memory, N = 64 as in the backward), "wgmma_ss_n128" (the same over 128 keys, as in
    the forward), "wgmma_rs" (p v: p = q k^T rounded, from the accumulators as A fragments, v
    read MN-major), the last three relative to the reference's largest magnitude. An error of
    order 1 names the primitive that is misread; each is checked against what the previous one
    actually produced, so the others' verdicts hold when one fails."""
    import torch
    from .. import _core
    dtype = dtype or torch.bfloat16
    if head_dim not in (64, 128) or isinstance(head_dim, bool):
        raise ValueError(f"head_dim must be 64 or 128 (the wgmma kernels' head dims), got {head_dim!r}")
    if dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"dtype must be torch.float16 or torch.bfloat16, got {dtype}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(rows, 1, head_dim, generator=g).to(dtype).to(device) for rows in (64, 128, 64))
    raw = torch.empty_like(q)
    s, s_wide = torch.empty(64, 64, device=device), torch.empty(64, 128, device=device)
    o = torch.empty(64, head_dim, device=device)
    d = _core.dl
    _core._C.attention_wgmma_probe(d(q), d(k), d(v), d(raw), d(s), d(s_wide), d(o), _core.stream_of(q))
    # Where each element of q should be in shared memory: slab sl (64 columns), row r, 16-byte
    # chunk p holds q[r, 64 sl + 8 (p ^ (r % 8)) + e].
    sl, r, p, e = torch.meshgrid(*(torch.arange(n) for n in (head_dim // 64, 64, 8, 8)), indexing="ij")
    placed = q[:, 0].cpu()[r, 64 * sl + 8 * (p ^ (r % 8)) + e].reshape(-1)
    swizzle = float((raw.cpu().reshape(-1).double() - placed.double()).abs().max())
    q64, k64, v64 = (t[:, 0].cpu().double() for t in (q, k, v))

    def rel(got, ref):
        return float((got.cpu().double() - ref).abs().max() / ref.abs().max())
    return {"tma_swizzle": swizzle, "wgmma_ss": rel(s, q64 @ k64[:64].T), "wgmma_ss_n128": rel(s_wide, q64 @ k64.T),
            "wgmma_rs": rel(o, s.cpu().to(dtype).double() @ v64)}
