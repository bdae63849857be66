"""Fused attention: dense batches with BERT's padding mask, packed variable-length batches,
causal (bottom-right) or bidirectional, grouped-query heads, dropout inside the kernel.

Flow of a call: validate -> layout to (batch, seq, heads, D) views (strides, no copies) ->
dispatch.select -> the Triton kernels or the CUDA C++ ones (csrc/attention: head dims 32, 64,
96, 128; the same dropout draws), both behind one autograd.Function whose backward recomputes the
probabilities from the saved log-sum-exp, or the `torch` backend (the reference math, which
materializes the scores: the fallback for fp32, for CPU tensors and for what no kernel serves).

Dropout draws come from a seed: `seed=None` takes one from torch's default generator, so
`torch.manual_seed` makes a run reproducible; the same seed gives the same mask, and the
backward regenerates it instead of storing it. The Triton and CUDA C++ kernels draw the same
mask for a seed. The `torch` backend draws its own masks (the same seed reproduces them, but
they differ from the kernels').
"""
import operator
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import reference
from .. import _core
from . import _triton, attention_kernels, dispatch
from .padding import pad, unpad  # noqa: F401 (unpad: the public API's, via ops)
from ._tensors import (autocast_inputs, check_dropout, dropout_seed, first_derivative_only,
                       require, seeded_keep, unit_stride)

_HALF = (torch.float16, torch.bfloat16)
LN2 = 0.6931471805599453


class AttentionCase(NamedTuple):
    """The dispatch case of attention and attention_varlen."""
    device_type: str
    dtype: torch.dtype
    head_dim: int
    window: bool = False  # a sliding window (window_size other than (-1, -1))
    softcap: bool = False  # logit softcapping
    alibi: bool = False    # ALiBi slopes
    # The measured table's bucket (no backend's limit): causal or not, and the keys a sequence
    # has (max_seqlen_k when packed; 0 where unknown, a symbolic size under torch.compile).
    causal: bool = False
    seq_k: int = 0


def _triton_why_not(case):
    device, dtype, head_dim = case.device_type, case.dtype, case.head_dim
    why = _triton.device_problem("attention", device)
    if why is not None:
        return why
    if dtype not in _HALF:
        return f"the Triton kernel takes float16 or bfloat16, got {dtype} (float32 runs the reference)"
    if device == "cpu" and dtype == torch.bfloat16:
        return "bfloat16 is not supported by the Triton interpreter (numpy has no bfloat16)"
    limit = _triton.kernels("attention").MAX_HEAD_DIM
    if head_dim > limit:
        return f"head dim {head_dim} exceeds the Triton kernel's {limit}"
    return None


def _cuda_why_not(case):
    device, dtype, head_dim = case.device_type, case.dtype, case.head_dim
    if case.window or case.softcap or case.alibi:
        return "the CUDA C++ kernels have no sliding window (window_size), softcap or ALiBi"
    why = _core.device_problem(device)
    if why is not None:
        return why
    if dtype not in _HALF:
        return f"the CUDA C++ kernel takes float16 or bfloat16, got {dtype}"
    built = tuple(_core._C.attention_head_dims())
    if head_dim not in built:
        return f"the CUDA C++ kernel is built for head dims {built}, got {head_dim}"
    return None


# Triton passed the GPU suite on an H100. The CUDA C++ kernels that passed it there (WMMA, 15-25x
# slower than Triton: benchmarks/results/2026-11-23-h100) have been replaced by mma.sync ones
# with P in registers, tested on the CPU emulator and not yet run on a GPU, so `cuda` is chosen
# only by name until the GPU suite passes them.
dispatch.register(dispatch.OpBackends(
    "attention", AttentionCase,
    {"torch": lambda case: None, "triton": _triton_why_not, "cuda": _cuda_why_not},
    cuda_order=("triton", "cuda", "torch"), gpu_verified=("torch", "triton")))


# ---------------------------------------------------------------------------------------------
# The fused kernels (Triton or CUDA C++), behind one autograd.Function and one pair of custom ops.

def _lse_shape(q, varlen):
    return (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])


def _window(left, right):
    return None if (left, right) == (-1, -1) else (left, right)


def _forward(q, k, v, key_mask, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, seed, pinned,
             window_left, window_right, softcap, alibi, kernel):
    """-> (out, base-2 log-sum-exp of the scaled scores) from the Triton or CUDA C++ kernel."""
    o = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty(_lse_shape(q, cu_q is not None), dtype=torch.float32, device=q.device)
    if not kernel.startswith("triton"):
        d = _core.dl
        attention_kernels.last_cuda_forward_kernel = _core._C.attn_fwd(
            d(q), d(k), d(v), d(key_mask), d(cu_q), d(cu_k), max_q, max_k, causal, scale,
            dropout_p, int(seed), d(o), d(lse), _core.stream_of(q), kernel == "cuda-wgmma")
    else:
        _triton.run("attention", "forward", q, k, v, o, lse, key_mask=key_mask, cu_q=cu_q,
                    cu_k=cu_k, max_q=max_q, max_k=max_k, causal=causal, scale=scale,
                    dropout_p=dropout_p, seed=seed, window=_window(window_left, window_right),
                    softcap=softcap, alibi=alibi, pinned=pinned)
    return o, lse


def _contiguous_strides(shape):
    strides = [1]
    for n in reversed(shape[1:]):
        strides.insert(0, strides[0] * n)
    return tuple(strides)


def _qkv_slices(q, k, v):
    """Are q, k and v the three consecutive slices of one contiguous (..., rows, 3, heads, D)
    tensor along its dim -3 (a fused QKV projection's output, split by `split_qkv`)?"""
    whole = _contiguous_strides(q.shape[:-2] + (3,) + q.shape[-2:])
    step = whole[-3]  # heads * D
    return (q.dim() >= 3 and q.shape == k.shape == v.shape and q.dtype == k.dtype == v.dtype
            and q.stride() == k.stride() == v.stride() == whole[:-3] + whole[-2:]
            and k.storage_offset() - q.storage_offset() == step
            and v.storage_offset() - k.storage_offset() == step
            and q.untyped_storage().data_ptr() == k.untyped_storage().data_ptr()
            == v.untyped_storage().data_ptr())


def _backward(do, q, k, v, o, lse, key_mask, cu_q, cu_k, max_q, max_k, causal, scale,
              dropout_p, seed, pinned, window_left, window_right, softcap, alibi, kernel,
              packed_grads=False):
    """packed_grads (eager only: a custom op's outputs may not alias): when q, k and v are
    slices of one fused QKV tensor, dq, dk and dv are written as the same slices of one buffer,
    which split_qkv's backward then passes on whole, with no copy (both backends' kernels take
    their outputs' strides)."""
    do = unit_stride(do)
    # Packed key rows after the last key sequence are written by no kernel: their gradient is
    # 0. There are none when the queries' offsets, which end at the last row, serve the keys.
    every_key_row = cu_k is None or (cu_k is cu_q and k.shape[0] == q.shape[0])
    if packed_grads and every_key_row and _qkv_slices(q, k, v):
        dq, dk, dv = torch.empty(q.shape[:-2] + (3,) + q.shape[-2:], dtype=q.dtype,
                                 device=q.device).unbind(-3)
    else:
        dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
        grad_kv = torch.empty if every_key_row else torch.zeros
        dk = grad_kv(k.shape, dtype=k.dtype, device=k.device)
        dv = grad_kv(v.shape, dtype=v.dtype, device=v.device)
    # Scratch for delta = rowsum(dO * O), laid out like lse: each backend's backward fills it
    # before the kernels that read it (Triton: its dQ kernel; CUDA C++: a pass of its own).
    delta = torch.empty_like(lse)
    if not kernel.startswith("triton"):
        d = _core.dl
        attention_kernels.last_cuda_backward_kernel = _core._C.attn_bwd(
            d(q), d(k), d(v), d(key_mask), d(cu_q), d(cu_k), max_q, max_k, causal, scale,
            dropout_p, int(seed), d(o), d(do), d(lse), d(delta), d(dq), d(dk), d(dv),
            _core.stream_of(q), kernel == "cuda-wgmma")
    else:
        _triton.run("attention", "backward", q, k, v, o, do, lse, delta, dq, dk, dv,
                    key_mask=key_mask, cu_q=cu_q, cu_k=cu_k, max_q=max_q, max_k=max_k,
                    causal=causal, scale=scale, dropout_p=dropout_p, seed=seed,
                    window=_window(window_left, window_right), softcap=softcap, alibi=alibi,
                    pinned=pinned, atomic_dq=kernel == "triton-atomic-dq")
    return dq, dk, dv


class _AttentionFunction(torch.autograd.Function):
    """Eager path: straight to the launchers, no torch.library dispatch. The settings (max_q ...
    softcap, then the kernel) come as one tuple: apply costs about 0.2 us per argument."""

    @staticmethod
    def forward(ctx, q, k, v, key_mask, cu_q, cu_k, alibi, settings):
        o, lse = _forward(q, k, v, key_mask, cu_q, cu_k, *settings[:-1], alibi, settings[-1])
        ctx.save_for_backward(q, k, v, o, lse, key_mask, cu_q, cu_k, alibi)
        ctx.meta = settings
        ctx.mark_non_differentiable(lse)
        # No zero gradient made for lse, which has none (a memset of batch x heads x seq floats
        # a backward, per layer); do always comes, o being the only differentiable output.
        ctx.set_materialize_grads(False)
        return o, lse

    @staticmethod
    @first_derivative_only("attention")
    def backward(ctx, do, _dlse):
        *saved, alibi = ctx.saved_tensors
        # Gradients for q, k, v; none for key_mask, cu_q, cu_k, alibi and the settings.
        return _backward(do, *saved, *ctx.meta[:-1], alibi, ctx.meta[-1], True) + (None,) * 5


# torch.compile path: the same launchers behind custom ops with fake kernels and autograd. The
# dropout seed is a one-element tensor on q's device there (dropout_seed): the Triton kernels read
# it themselves, so that nothing in a compiled step is read back to the host and a CUDA graph
# replays a new draw each step; the CUDA C++ kernels take it by value (read on the host).

@torch.library.custom_op("fusedlm::attn_fwd", mutates_args=())
def attn_fwd_op(q: Tensor, k: Tensor, v: Tensor, key_mask: Optional[Tensor],
                cu_q: Optional[Tensor], cu_k: Optional[Tensor], max_q: int, max_k: int,
                causal: bool, scale: float, dropout_p: float, seed: Tensor,
                pinned: bool, window_left: int, window_right: int, softcap: float,
                alibi: Optional[Tensor], kernel: str) -> Tuple[Tensor, Tensor]:
    return _forward(q, k, v, key_mask, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p,
                    seed, pinned, window_left, window_right, softcap, alibi, kernel)


@attn_fwd_op.register_fake
def _(q, k, v, key_mask, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, seed, pinned,
      window_left, window_right, softcap, alibi, kernel):
    return q.new_empty(q.shape), q.new_empty(_lse_shape(q, cu_q is not None), dtype=torch.float32)


@torch.library.custom_op("fusedlm::attn_bwd", mutates_args=())
def attn_bwd_op(do: Tensor, q: Tensor, k: Tensor, v: Tensor, o: Tensor, lse: Tensor,
                key_mask: Optional[Tensor], cu_q: Optional[Tensor], cu_k: Optional[Tensor],
                max_q: int, max_k: int, causal: bool, scale: float, dropout_p: float,
                seed: Tensor, pinned: bool, window_left: int, window_right: int,
                softcap: float, alibi: Optional[Tensor],
                kernel: str) -> Tuple[Tensor, Tensor, Tensor]:
    return _backward(do, q, k, v, o, lse, key_mask, cu_q, cu_k, max_q, max_k, causal, scale,
                     dropout_p, seed, pinned, window_left, window_right, softcap, alibi,
                     kernel)


@attn_bwd_op.register_fake
def _(do, q, k, v, o, lse, key_mask, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, seed,
      pinned, window_left, window_right, softcap, alibi, kernel):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


def _setup_context(ctx, inputs, output):
    (q, k, v, key_mask, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, seed, pinned,
     window_left, window_right, softcap, alibi, kernel) = inputs
    ctx.save_for_backward(q, k, v, output[0], output[1], key_mask, cu_q, cu_k, alibi)
    ctx.meta = (max_q, max_k, causal, scale, dropout_p, seed, pinned, window_left, window_right,
                softcap, kernel)


def _op_backward(ctx, do, _dlse):
    *saved, alibi = ctx.saved_tensors
    # Gradients for q, k, v; none for the other 15 inputs of the op.
    return torch.ops.fusedlm.attn_bwd(do.contiguous(), *saved, *ctx.meta[:-1], alibi,
                                      ctx.meta[-1]) + (None,) * 15


attn_fwd_op.register_autograd(_op_backward, setup_context=_setup_context)


def _natural_lse(lse2):
    """The kernels' base-2 log-sum-exp in natural log. A row that sees no key has +inf there (so
    that the backward's exp2(s - lse) is 0); the log-sum-exp of nothing is -inf, as the torch
    backend and torch.logsumexp give."""
    return torch.where(lse2 == float("inf"), float("-inf"), lse2 * LN2)


def _fused(*args):
    """The kernels' forward (with autograd when a gradient is wanted); the last argument is the
    kernels to launch (attention_kernels.KERNELS: what kernel_for makes of the dispatch choice)."""
    if torch.compiler.is_compiling():
        seed = args[11] if isinstance(args[11], Tensor) else torch.tensor(args[11], device=args[0].device)
        return torch.ops.fusedlm.attn_fwd(*args[:11], seed, *args[12:])
    if not (torch.is_grad_enabled() and any(t.requires_grad for t in args[:3])):
        return _forward(*args)  # inference: the kernel alone (autograd's apply costs ~35 us)
    return _AttentionFunction.apply(*args[:6], args[16], (*args[6:16], args[17]))


class _SplitQKV(torch.autograd.Function):
    """q, k, v = qkv.unbind(-3), whose backward hands on, uncopied, the one buffer the attention
    kernels wrote dq, dk and dv into (`_backward`'s packed_grads); else it stacks them."""

    @staticmethod
    def forward(ctx, qkv):
        ctx.shape, ctx.dtype, ctx.device = qkv.shape, qkv.dtype, qkv.device
        return qkv.unbind(-3)

    @staticmethod
    def backward(ctx, dq, dk, dv):
        grads = (dq, dk, dv)
        if all(g is not None for g in grads) and _qkv_slices(*grads):
            # The buffer itself: contiguous in qkv's shape, starting at dq.
            return dq.as_strided(ctx.shape, _contiguous_strides(ctx.shape), dq.storage_offset())
        return torch.stack([g if g is not None else torch.zeros(ctx.shape[:-3] + ctx.shape[-2:],
                                                                dtype=ctx.dtype, device=ctx.device)
                            for g in grads], dim=-3)


def split_qkv(qkv: Tensor):
    """(q, k, v) from a fused QKV projection's output viewed as (..., rows, 3, heads, D): the
    views qkv.unbind(-3), for attention / attention_varlen. In eager mode their gradients come
    back as one buffer in qkv's layout, written so by the attention kernels, not three tensors
    that autograd would copy into one (a read and a write of every gradient element)."""
    if not isinstance(qkv, Tensor) or qkv.dim() < 4 or qkv.shape[-3] != 3:
        raise ValueError("qkv must be a tensor of shape (..., rows, 3, heads, head_dim), got "
                         f"{tuple(qkv.shape) if isinstance(qkv, Tensor) else type(qkv).__name__}")
    if torch.compiler.is_compiling() or not (torch.is_grad_enabled() and qkv.requires_grad):
        return qkv.unbind(-3)
    return _SplitQKV.apply(qkv)


# ---------------------------------------------------------------------------------------------
# torch backend: the reference, differentiable through autograd.

def _torch_dropout_keep(shape, dropout_p, seed, device):
    # Compiled (see dropout_seed), even with a given seed: a graph holds no Generator.
    if isinstance(seed, Tensor) or torch.compiler.is_compiling():
        return torch.rand(shape, device=device) >= dropout_p
    return seeded_keep(shape, dropout_p, seed, device)


def _torch_dense(q, k, v, key_mask, causal, scale, dropout_p, seed, window=(-1, -1), softcap=0.0,
                 alibi=None):
    keep = None
    if dropout_p > 0:
        keep = _torch_dropout_keep((q.shape[0], q.shape[2], q.shape[1], k.shape[1]), dropout_p,
                                   seed, q.device)
    return reference.attention(q, k, v, causal=causal, key_mask=key_mask, softmax_scale=scale,
                               dropout_p=dropout_p, dropout_keep=keep, window=window,
                               softcap=softcap, alibi_slopes=alibi)


def _packed_rows(cu, total, seq):
    """For packed rows 0..total-1: their index in a (batch * seq) right-padded layout, and the
    sequences' lengths; computed on the device (no host read, static shapes)."""
    rows = torch.arange(total, device=cu.device, dtype=cu.dtype)
    which = torch.bucketize(rows, cu[1:], right=True)
    return which * seq + (rows - cu[which]), cu.diff()


def _torch_varlen(q, k, v, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p, seed,
                  window=(-1, -1), softcap=0.0, alibi=None):
    """The reference over packed sequences: each padded on the right to max_seqlen, one dense
    batch with a mask (static shapes: what torch.compile can trace). In eager mode, where that
    padding would multiply the work by more than 4 (one long sequence among short ones), one
    dense call per sequence instead (reading the offsets, which a trace cannot)."""
    batch = cu_q.numel() - 1
    if batch == 0 or q.shape[0] == 0:
        return q.new_zeros(q.shape), q.new_full((q.shape[1], q.shape[0]), float("-inf"),
                                                 dtype=torch.float32)
    if not torch.compiler.is_compiling():
        lens_q, lens_k = cu_q.diff().long(), cu_k.diff().long()
        if batch * max_q * max_k > 4 * int((lens_q * lens_k).sum()):
            return _torch_varlen_loop(q, k, v, cu_q, cu_k, causal, scale, dropout_p, seed, window,
                                      softcap, alibi)
    idx_q, lens_q = _packed_rows(cu_q, q.shape[0], max_q)
    lens_k = cu_k.diff()
    pad_q = pad(q, idx_q, batch, max_q)
    pad_k, pad_v = (padded_rows(t, cu_k, max_k) for t in (k, v))
    key_mask = torch.arange(max_k, device=q.device) < lens_k[:, None]
    keep = None
    if dropout_p > 0:
        keep = _torch_varlen_keep(cu_q, cu_k, q.shape[1], max_q, max_k, dropout_p, seed, q.device)
    o, lse = reference.attention(pad_q, pad_k, pad_v, causal=causal, key_mask=key_mask,
                                 softmax_scale=scale, dropout_p=dropout_p, dropout_keep=keep,
                                 lengths=(lens_q, lens_k), window=window, softcap=softcap,
                                 alibi_slopes=alibi)
    return (o.flatten(0, 1).index_select(0, idx_q),
            lse.transpose(0, 1).flatten(1).index_select(1, idx_q).float())


def padded_rows(t, cu, seq):
    """Packed rows (total, ...) -> (sequences, seq, ...), each sequence right-padded with zeros;
    rows after the last sequence are dropped (through a spare slot: no host read)."""
    batch = cu.numel() - 1
    idx, _ = _packed_rows(cu, t.shape[0], seq)
    spare = batch * seq
    out = t.new_zeros((spare + 1, *t.shape[1:])).index_copy(0, idx.clamp(max=spare), t)
    return out[:spare].view(batch, seq, *t.shape[1:])


def _torch_varlen_keep(cu_q, cu_k, heads, max_q, max_k, dropout_p, seed, device):
    """The torch backend's keep-mask for packed sequences, (batch, heads, max_q, max_k): sequence
    i draws (heads, len_q, len_k) from seed + i, as the one-call-per-sequence path does, so both
    paths (and flash_attn_interface's S_dmask) see the same pattern. Under torch.compile one
    dense draw from the default generator serves (nothing is read back)."""
    batch = cu_q.numel() - 1
    if isinstance(seed, Tensor) or torch.compiler.is_compiling():
        return _torch_dropout_keep((batch, heads, max_q, max_k), dropout_p, seed, device)
    keep = torch.zeros((batch, heads, max_q, max_k), dtype=torch.bool, device=device)
    for i, (lq, lk) in enumerate(zip(cu_q.diff().tolist(), cu_k.diff().tolist())):
        keep[i, :, :lq, :lk] = _torch_dropout_keep((1, heads, lq, lk), dropout_p, seed + i, device)[0]
    return keep


def _torch_varlen_loop(q, k, v, cu_q, cu_k, causal, scale, dropout_p, seed, window, softcap,
                       alibi):
    outs, lses = [], []
    cq, ck = cu_q.tolist(), cu_k.tolist()
    for i in range(len(cq) - 1):
        o, l = _torch_dense(q[None, cq[i]:cq[i + 1]], k[None, ck[i]:ck[i + 1]],
                            v[None, ck[i]:ck[i + 1]], None, causal, scale, dropout_p, seed + i,
                            window, softcap,
                            alibi[i:i + 1] if alibi is not None and alibi.dim() == 2 else alibi)
        outs.append(o[0])
        lses.append(l[0])
    return torch.cat(outs), torch.cat(lses, dim=1).float()


# ---------------------------------------------------------------------------------------------
# Validation and public API.

_SHAPES = {"packed": "(total, heads, head_dim)", "bshd": "(batch, seq, heads, head_dim)",
           "bhsd": "(batch, heads, seq, head_dim)"}


def _check_tensors(q, k, v, layout):
    """Type, rank and dtype of q, k, v as the caller passed them (before any transpose)."""
    want = 3 if layout == "packed" else 4
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dim() != want:
            raise ValueError(f"{name} must have shape {_SHAPES[layout]} (layout='{layout}'), "
                             f"got {tuple(t.shape)}")
        if not t.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {t.dtype}")


def _check_qkv(q, k, v, packed):
    """Shapes of q, k, v against each other, in the (batch, seq, heads, D) or packed
    (total, heads, D) order: a 'bhsd' call is transposed first, so that heads are heads."""
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name} must have q's dtype {q.dtype}, got {t.dtype}")
        if t.device != q.device:
            raise ValueError(f"{name} is on {t.device} but q is on {q.device}")
    if v.shape != k.shape:
        raise ValueError(f"v must have k's shape {tuple(k.shape)}, got {tuple(v.shape)}")
    if k.shape[-1] != q.shape[-1]:
        raise ValueError(f"k must have q's head_dim {q.shape[-1]}, got {k.shape[-1]}")
    if not packed and k.shape[0] != q.shape[0]:
        raise ValueError(f"k must have q's batch size {q.shape[0]}, got {k.shape[0]}")
    h, hk = q.shape[-2], k.shape[-2]
    if hk == 0 or h % hk != 0:
        raise ValueError(f"k's heads ({hk}) must divide q's heads ({h}) (grouped-query attention)")
    if q.shape[-1] == 0:
        raise ValueError(f"q must have a head_dim > 0, got shape {tuple(q.shape)}")


def _case(q, window, softcap, alibi, causal, seq_k):
    """AttentionCase's values (a plain tuple: see dispatch.select)."""
    return (q.device.type, q.dtype, q.shape[-1], window != (-1, -1), softcap > 0, alibi is not None,
            bool(causal), seq_k if type(seq_k) is int else 0)


def _check_window(window_size):
    """flash-attn's window_size as (left, right) ints, each >= -1 (-1: unbounded). Integers of
    any kind (a 0-d integer tensor, as flash-attn's own tests pass) are taken; floats and bools
    are refused, never rounded."""
    try:
        left, right = window_size
    except (TypeError, ValueError):
        raise TypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}") from None
    sides = []
    for side in (left, right):
        try:
            boolean = isinstance(side, bool) or (isinstance(side, Tensor) and side.dtype == torch.bool)
            side = None if boolean else operator.index(side)
        except TypeError:
            side = None
        if side is None or side < -1:
            raise ValueError(f"window_size must be two ints >= -1 (-1: unbounded), got {window_size!r}")
        sides.append(side)
    return tuple(sides)


def _check_softcap(softcap):
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)) or not softcap >= 0:
        raise ValueError(f"softcap must be a float >= 0 (0: off), got {softcap!r}")
    return float(softcap)


def _check_alibi(alibi_slopes, batch, heads, device):
    """flash-attn's alibi_slopes: None, or float32 (heads,) or (batch, heads)."""
    if alibi_slopes is None:
        return None
    if not isinstance(alibi_slopes, Tensor):
        raise TypeError(f"alibi_slopes must be a torch.Tensor or None, got {type(alibi_slopes).__name__}")
    if alibi_slopes.dtype != torch.float32:
        raise TypeError(f"alibi_slopes must be float32, got {alibi_slopes.dtype}")
    if tuple(alibi_slopes.shape) not in ((heads,), (batch, heads)):
        raise ValueError(f"alibi_slopes must have shape ({heads},) or ({batch}, {heads}), got "
                         f"{tuple(alibi_slopes.shape)}")
    if alibi_slopes.device != device:
        raise ValueError(f"alibi_slopes is on {alibi_slopes.device} but q is on {device}")
    return alibi_slopes.contiguous()


def _check_options(dropout_p, softmax_scale, seed):
    check_dropout(dropout_p, seed)
    if softmax_scale is not None and not isinstance(softmax_scale, (int, float)):
        raise TypeError(f"softmax_scale must be a float or None, got {softmax_scale!r}")


def _key_mask_for(backend, attention_mask):
    """The padding mask as the kernels take it, nonzero = attend, rebuilt at every call (nothing
    is cached on a caller's tensor: writes through numpy or .data leave no trace on it). The
    Triton kernels compare each element with 0 in its own dtype, so they take a bool (as int8)
    or integer mask as it is; the CUDA C++ ones take int8, made by comparing with 0 (a cast
    would turn 256 into 0, "do not attend")."""
    if attention_mask.dtype == torch.bool:
        return attention_mask.contiguous().view(torch.int8)
    if backend == "triton":
        return attention_mask.contiguous()
    return (attention_mask != 0).contiguous().view(torch.int8)


def attention(q: Tensor, k: Tensor, v: Tensor, *, causal: bool = False,
              attention_mask: Optional[Tensor] = None, dropout_p: float = 0.0,
              softmax_scale: Optional[float] = None, layout: str = "bshd",
              seed: Optional[int] = None, return_lse: bool = False,
              deterministic: bool = False, window_size: Tuple[int, int] = (-1, -1),
              softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
              backend: Optional[str] = None):
    """softmax(q k^T * scale + mask) v, fused: the scores are never stored.

    layout 'bshd': q (batch, seq_q, heads, D), k and v (batch, seq_k, kv_heads, D); 'bhsd': the
    (batch, heads, seq, D) layout Hugging Face models produce, taken by strides (no copy); the
    output has q's layout. kv_heads may divide heads (grouped / multi-query attention).
    `causal` masks bottom-right: query i sees key j iff j <= i + seq_k - seq_q.
    `window_size` (left, right): a sliding (local) window, query i sees keys
    i + seq_k - seq_q - left <= j <= i + seq_k - seq_q + right (-1: unbounded; with causal the
    right side is 0), as flash-attn's; Mistral's sliding_window W is (W - 1, 0).
    `softcap` > 0: the scaled scores s become softcap * tanh(s / softcap) (Gemma 2's logit
    softcapping, flash-attn's softcap).
    `alibi_slopes`: float32 (heads,) or (batch, heads); -slope * |i + seq_k - seq_q - j| is
    added to the scaled score of query i and key j (ALiBi, flash-attn's convention).
    `attention_mask`: (batch, seq_k), nonzero/True = attend (Hugging Face's attention_mask).
    A query that sees no key gets zeros. `dropout_p` drops attention probabilities inside the
    kernel (seeded: see the module docstring). softmax_scale defaults to D ** -0.5.
    `return_lse`: also return the log-sum-exp (batch, heads, seq_q), natural log, float32
    (-inf for a query that sees no key).
    The kernels use no atomics by default, so a process reproduces its results exactly; on a
    GPU their block sizes are autotuned, and `deterministic=True` pins them instead, so that
    results are bitwise equal across processes too (at some cost in speed). The opt-in
    FUSEDLM_TRITON_ATOMIC_DQ=1 backward adds dQ with atomics (dQ's last bits then vary from run
    to run); `deterministic=True` never takes it.
    """
    if layout not in ("bshd", "bhsd"):
        raise ValueError(f"layout must be 'bshd' or 'bhsd', got {layout!r}")
    _check_tensors(q, k, v, layout)
    if layout == "bhsd":
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
    _check_qkv(q, k, v, packed=False)
    _check_options(dropout_p, softmax_scale, seed)
    window, softcap = _check_window(window_size), _check_softcap(softcap)
    batch, seq_q, heads, head_dim = q.shape
    alibi = _check_alibi(alibi_slopes, batch, heads, q.device)
    seq_k = k.shape[1]
    if attention_mask is not None:
        if not isinstance(attention_mask, Tensor):
            raise TypeError(f"attention_mask must be a torch.Tensor or None, got {type(attention_mask).__name__}")
        if attention_mask.shape != (batch, seq_k):
            raise ValueError(f"attention_mask must have shape (batch, seq_k) = ({batch}, {seq_k}), "
                             f"got {tuple(attention_mask.shape)}")
        if attention_mask.device != q.device:
            raise ValueError(f"attention_mask is on {attention_mask.device} but q is on {q.device}")
        if attention_mask.is_floating_point():
            raise TypeError("attention_mask must be bool or integer (nonzero = attend), got "
                            f"{attention_mask.dtype}; additive float masks are not accepted")
    q, k, v = autocast_inputs(q, k, v)
    scale = float(softmax_scale) if softmax_scale is not None else head_dim ** -0.5
    seed = dropout_seed(dropout_p, seed, batch * heads, q.device)
    case = _case(q, window, softcap, alibi, causal, seq_k)
    chosen = dispatch.select("attention", case, backend)
    if chosen == "torch":
        out, lse = _torch_dense(q, k, v, attention_mask, causal, scale, float(dropout_p), seed,
                                window, softcap, alibi)
        lse = lse.float()
    else:
        key_mask = None if attention_mask is None else _key_mask_for(chosen, attention_mask)
        o, lse2 = _fused(*map(unit_stride, (q, k, v)), key_mask, None, None, seq_q, seq_k,
                         causal, scale, float(dropout_p), seed, bool(deterministic), *window,
                         softcap, alibi, attention_kernels.kernel_for(chosen, case))
        out, lse = o, (_natural_lse(lse2) if return_lse else None)  # kernel launches: only when asked
    if layout == "bhsd":
        out = out.transpose(1, 2)
    return (out, lse) if return_lse else out


def _max_seqlen(name, mx):
    """max_seqlen as a Python int (numpy and 0-d integer types are taken by operator.index)."""
    try:
        if isinstance(mx, bool):
            raise TypeError
        mx = operator.index(mx)
    except TypeError:
        raise TypeError(f"{name} must be an int, got {mx!r}") from None
    if mx < 0:
        raise ValueError(f"{name} must be >= 0, got {mx}")
    return mx


def check_varlen_offsets(name, cu, total, mx, to_the_end=True):
    """cu must rise from 0 to `total` (the packed rows; with to_the_end=False, to at most
    `total`) with no sequence longer than `mx`: a kernel trusting bad offsets reads and writes
    out of bounds, or leaves rows unwritten. attention_varlen checks at every call unless told
    not to (a check cached on the tensor missed writes through numpy or .data); on a GPU or
    compiled, on the device (see `require`): about ten small kernels. fusedlm's models check a
    caller's offsets once a forward with this, not once a layer."""
    ok = (cu[0] == 0) & ((cu[-1] == total) if to_the_end else (cu[-1] <= total))
    lens = cu.diff()
    if lens.numel():
        ok = ok & (lens.min() >= 0) & (lens.max() <= mx)
    require(ok, f"{name} must rise from 0 to {'' if to_the_end else 'at most '}{total} (the "
                f"packed rows) with no sequence longer than max_seqlen={mx}")


def attention_varlen(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
                     max_seqlen_q: int, max_seqlen_k: int, *, causal: bool = False,
                     dropout_p: float = 0.0, softmax_scale: Optional[float] = None,
                     seed: Optional[int] = None, return_lse: bool = False,
                     deterministic: bool = False, window_size: Tuple[int, int] = (-1, -1),
                     softcap: float = 0.0, alibi_slopes: Optional[Tensor] = None,
                     backend: Optional[str] = None, check_offsets: bool = True):
    """Attention over packed sequences: q (total_q, heads, D), k and v (total_k, kv_heads, D);
    sequence i is rows cu_seqlens[i]:cu_seqlens[i + 1] (int32, starting at 0). No work is spent
    on padding. Every query row belongs to a sequence (cu_seqlens_q ends at total_q); key rows
    after cu_seqlens_k[-1] belong to none, are read by no query and get gradient 0 (how
    `unpad_static` gives padding rows no keys). Returns out (total_q, heads, D) [and lse
    (heads, total_q)]. window_size, softcap and alibi_slopes ((heads,) or (sequences, heads)):
    see `attention`, within each sequence.
    `check_offsets=False` skips the check of the offsets' values (a few small kernels a call,
    run on the device): only for offsets already checked (`ops.attention.check_varlen_offsets`)
    or made by fusedlm (`unpad`, `unpad_static`); bad offsets make the kernels read and write out
    of bounds. Their dtype, shape and device are checked either way."""
    _check_tensors(q, k, v, "packed")
    _check_qkv(q, k, v, packed=True)
    _check_options(dropout_p, softmax_scale, seed)
    window, softcap = _check_window(window_size), _check_softcap(softcap)
    for name, cu, total in (("cu_seqlens_q", cu_seqlens_q, q.shape[0]),
                            ("cu_seqlens_k", cu_seqlens_k, k.shape[0])):
        if not isinstance(cu, Tensor) or cu.dim() != 1 or cu.numel() < 1:
            raise ValueError(f"{name} must be a 1-D tensor of batch + 1 offsets")
        if cu.dtype not in (torch.int32, torch.int64):
            raise TypeError(f"{name} must be int32, got {cu.dtype}")
        if cu.device != q.device:
            raise ValueError(f"{name} is on {cu.device} but q is on {q.device}")
    if cu_seqlens_q.numel() != cu_seqlens_k.numel():
        raise ValueError("cu_seqlens_q and cu_seqlens_k must have the same length (batch + 1)")
    max_seqlen_q = _max_seqlen("max_seqlen_q", max_seqlen_q)
    max_seqlen_k = _max_seqlen("max_seqlen_k", max_seqlen_k)
    if check_offsets:
        check_varlen_offsets("cu_seqlens_q", cu_seqlens_q, q.shape[0], max_seqlen_q)
        if (cu_seqlens_k is not cu_seqlens_q or k.shape[0] != q.shape[0]
                or max_seqlen_k != max_seqlen_q):  # self-attention passes one tensor twice: once
            check_varlen_offsets("cu_seqlens_k", cu_seqlens_k, k.shape[0], max_seqlen_k,
                                 to_the_end=False)
    q, k, v = autocast_inputs(q, k, v)
    head_dim = q.shape[-1]
    scale = float(softmax_scale) if softmax_scale is not None else head_dim ** -0.5
    seed = dropout_seed(dropout_p, seed, (cu_seqlens_q.numel() - 1) * q.shape[1], q.device)
    alibi = _check_alibi(alibi_slopes, cu_seqlens_q.numel() - 1, q.shape[1], q.device)
    case = _case(q, window, softcap, alibi, causal, max_seqlen_k)
    chosen = dispatch.select("attention", case, backend)
    if chosen == "torch":
        out, lse = _torch_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                 max_seqlen_k, causal, scale, float(dropout_p), seed, window,
                                 softcap, alibi)
    else:
        cu_q = cu_seqlens_q.to(torch.int32).contiguous()
        cu_k = cu_seqlens_k.to(torch.int32).contiguous()
        out, lse2 = _fused(*map(unit_stride, (q, k, v)), None, cu_q, cu_k, max_seqlen_q,
                           max_seqlen_k, causal, scale, float(dropout_p), seed, bool(deterministic),
                           *window, softcap, alibi, attention_kernels.kernel_for(chosen, case))
        lse = _natural_lse(lse2) if return_lse else None
    return (out, lse) if return_lse else out


def dropout_mask(batch, heads, seq_q, seq_k, dropout_p, seed, device="cuda", backend="triton",
                 cu_seqlens=None):
    """The keep-mask (batch, heads, seq_q, seq_k) bool that `backend` draws for a dense call with
    this seed (for tests to feed the reference, and flash_attn_interface's S_dmask), or, with
    cu_seqlens=(cu_q, cu_k), for a packed call with max_seqlen seq_q, seq_k: sequence i's draws
    at [i, :, :len_q, :len_k]. The CUDA C++ kernels have no dropout: dispatch sends dropout to
    Triton."""
    seed = dropout_seed(dropout_p, seed, batch * heads)  # eager: an int
    if backend == "torch":
        if cu_seqlens is not None:
            return _torch_varlen_keep(*cu_seqlens, heads, seq_q, seq_k, dropout_p, seed, device)
        return _torch_dropout_keep((batch, heads, seq_q, seq_k), dropout_p, seed, device)
    # The Triton kernels draw sequence i's (query, key) from the stream of batch row i with the
    # dense layout's offsets (query * max_seqlen_k + key): one mask serves both.
    out = torch.empty((batch, heads, seq_q, seq_k), dtype=torch.int8, device=device)
    _triton.run("attention", "dropout_mask", out, seed, dropout_p)
    return out.bool()
