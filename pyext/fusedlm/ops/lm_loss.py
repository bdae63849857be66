"""Fused masked-LM / causal-LM loss: vocabulary projection + cross-entropy, logits never whole.

Flow of a call: validate -> shift (causal LM) -> dispatch.select -> the chunked driver:
  1. compact the labelled rows (MLM: ~15% of tokens), so work scales with predictions:
     exactly in eager mode (the host reads the count, and the indices when some rows are
     ignored), or up to a fixed `capacity` with no host sync
     (always under torch.compile, so a compiled step can be a CUDA graph);
  2. per chunk of C labelled rows: logits = h_c @ W.T + b into one reused (C, V) buffer (cuBLAS,
     the fastest matmul there is), then one cross-entropy kernel per row (the backend's: Triton,
     CUDA C++ or torch) writes loss, log-sum-exp and argmax hit, and overwrites the logits with
     their gradient;
  3. d_hidden_c = dlogits @ W, d_weight += dlogits.T @ h_c, d_bias += colsum(dlogits).
For reduction 'mean'/'sum' the gradients are computed in the forward (the logits are projected
once, not twice) and the backward only scales them by the incoming scalar. For 'none' the
backward recomputes the chunks with the incoming per-row scales. Memory beyond the inputs and
the gradients: the (C, V) buffer, C chosen so that it is about 256 MiB.

d_weight: each chunk's product accumulates in fp32 inside the GEMM; across chunks the sum is
kept in the weight's dtype, so a bf16 weight's gradient is rounded once per chunk (with 32
chunks about 2x the error of one unchunked GEMM's, measured on CPU): an fp32 accumulator would
cost twice the gradient's memory, so it is opt-in (`accum_dtype=torch.float32`). Under autocast
the weight is usually fp32 (mixed-precision training's master weight): then its gradient is
fp32 anyway, so the chunks accumulate into it in fp32 at no extra memory, with each chunk's
product rounded at most once (not at all where torch's addmm takes an fp32 output for half
inputs: CUDA in recent torch), instead of the rounding of the running sum per chunk plus the
cast that casting the weight ahead of the op gave.

On a GPU, a vocabulary that is not a multiple of 8 (GPT-2's 50257, BERT's 30522) is zero-padded
to one for the GEMMs (a copy of the weight, and of the bias, per call): the vocabulary is the contiguous
extent of the logits, and cuBLAS's vectorized tensor-core kernels need that extent to be a
multiple of 16 bytes. The pad columns project to 0 and the cross-entropy kernel never writes
them (its 16-byte loads may read them, and ignore what they read), so their gradient stays 0 and
the GEMMs' results are exact.

Eager calls go through an autograd.Function; under torch.compile the same driver runs behind the
custom ops `fusedlm::lm_loss_fwd` / `fusedlm::lm_loss_bwd`, always with the static selection.
"""
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import _core, reference
from . import _triton, dispatch
from ._tensors import (autocast_inputs, autocast_off, dtype_differs, first_derivative_only,
                       require, unit_stride)

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)
_REDUCTIONS = ("mean", "sum", "none")
# Bytes of the reused (chunk, V) logits buffer the default chunk size aims at.
_CHUNK_BYTES = 1 << 28


class LMLossOutput(NamedTuple):
    loss: Tensor      # the reduced loss (cross-entropy + z-loss), or per-token for 'none'
    z_loss: Tensor    # mean z-loss term over labelled tokens (included in `loss`), no gradient
    accuracy: Tensor  # fraction of labelled tokens whose argmax is the label, no gradient
    count: Tensor     # number of labelled tokens (int64)


# ---------------------------------------------------------------------------------------------
# What each backend serves.

class LossCase(NamedTuple):
    """The dispatch case of lm_loss."""
    device_type: str
    dtype: torch.dtype  # hidden's (and weight's)
    vocab: int          # weight's rows: the measured table's size bucket

def _dtype_problem(dtype, what):
    if dtype not in _FLOATS:
        return f"{what} takes float32, float16 or bfloat16, got {dtype}"
    return None


def _triton_why_not(case):
    device, dtype = case.device_type, case.dtype
    why = _triton.device_problem("lm_loss", device)
    if why is None and device == "cpu" and dtype == torch.bfloat16:
        why = "bfloat16 is not supported by the Triton interpreter (numpy has no bfloat16)"
    return why or _dtype_problem(dtype, "the Triton kernel")


def _cuda_why_not(case):
    return _core.device_problem(case.device_type) or _dtype_problem(case.dtype, "the CUDA C++ kernel")


# Both row kernels passed the GPU suite on an H100 and ran at the same speed there
# (benchmarks/results/2026-11-23-h100); Triton first, CUDA C++ where Triton cannot serve, unless
# the measured table orders them for the GPU, dtype and vocabulary (`fusedlm bench lm_loss --tune`).
dispatch.register(dispatch.OpBackends(
    "lm_loss", LossCase, {"torch": lambda case: None, "triton": _triton_why_not, "cuda": _cuda_why_not},
    cuda_order=("triton", "cuda", "torch"), gpu_verified=("torch", "triton", "cuda")))


# ---------------------------------------------------------------------------------------------
# The chunked driver, shared by the eager path and the custom ops. h: (T, H); labels: (T,).

def default_chunk_size(vocab, dtype):
    """Rows per chunk: a power of two with chunk * vocab * itemsize about _CHUNK_BYTES."""
    rows = max(_CHUNK_BYTES // (vocab * dtype.itemsize), 128)
    return 1 << (rows.bit_length() - 1)


def _cross_entropy_rows(backend, logits, labels, loss, lse, hit, smoothing, z_loss, grad_scale,
                        compute_grad):
    # grad_scale: a (rows,) tensor of per-row scales, a float, or None without gradients.
    row_scale = grad_scale if isinstance(grad_scale, Tensor) else None
    scale = float(grad_scale) if isinstance(grad_scale, (float, int)) else 1.0
    if backend == "torch":
        out = reference.ce_rows(logits, labels, label_smoothing=smoothing, z_loss=z_loss,
                                grad_scale=row_scale if row_scale is not None else scale,
                                compute_grad=compute_grad)
        for dst, src in zip((loss, lse, hit), out):
            dst.copy_(src)
    elif backend == "triton":
        _triton.run("lm_loss", "ce_rows", logits, labels, loss, lse, hit,
                    label_smoothing=smoothing, z_loss=z_loss, row_scale=row_scale, scale=scale,
                    compute_grad=compute_grad)
    else:
        d = _core.dl
        _core._C.lm_ce_rows(d(logits), d(labels), d(loss), d(lse), d(hit), d(row_scale), scale,
                            float(smoothing), float(z_loss), compute_grad, _core.stream_of(logits))


class _Rows(NamedTuple):
    """The rows the driver computes and how each counts."""
    idx: Optional[Tensor]     # rows of h, in order of computation (None: all rows, in order)
    labels: Tensor            # their labels, each in [0, V): safe to hand to a kernel
    weight: Optional[Tensor]  # static selection: 1.0 where the row counts, 0.0 at an ignored one
    count: Optional[int]      # labelled rows, read on the host (exact selection), else None
    count_t: Tensor           # labelled rows as an int64 device scalar (no host-to-device copy)


def _exact_rows(labels, ignore_index, vocab):
    """The labelled rows exactly (None when every row is labelled) and their labels.
    Raises ValueError for a label outside [0, vocab) that is not ignore_index.

    One host sync reads the count and the range together; finding the indices costs a second
    one only when some rows are ignored (callers that compacted already pay just the first)."""
    valid = labels != ignore_index
    if labels.numel() == 0:
        return _Rows(None, labels, None, 0, valid.sum())
    # The range of the labelled entries: the ignored ones read as 0, which is in range.
    facts = torch.stack([valid.sum(), *torch.aminmax(labels * valid)])
    count, lo, hi = facts.tolist()
    if count and (lo < 0 or hi >= vocab):
        raise ValueError(f"labels must be in [0, {vocab}) (the vocabulary size, weight's first "
                         f"dimension) or equal ignore_index={ignore_index}, got {lo if lo < 0 else hi}")
    if count == labels.numel():
        return _Rows(None, labels, None, count, facts[0])
    idx = valid.nonzero().squeeze(1)
    return _Rows(idx, labels.index_select(0, idx), None, count, facts[0])


def compact_labels(labels: Tensor, capacity: int, ignore_index: int = -100):
    """The first `capacity` labelled positions of `labels` (1-D) with shapes that do not depend
    on the data: (idx (capacity,) or None when the capacity holds every position, their labels,
    the labelled count as a device scalar). Labelled positions come first, in order, then
    ignored ones fill the capacity. More labelled positions than the capacity is an error
    (`_tensors.require`: raised on a CPU, a device-side assert on a GPU), never a smaller loss.
    Nothing is read back to the host on a GPU, so this runs under CUDA graphs."""
    valid = labels != ignore_index
    count = valid.sum()
    if capacity >= labels.numel():
        return None, labels, count
    require(count <= capacity, f"more labelled rows than capacity={capacity}: raise the capacity "
                               "(for BERT's 15% masking, 20-25% of the tokens)")
    # A stable sort by "is ignored" puts the labelled positions first, in order.
    idx = torch.argsort((~valid).to(torch.uint8), stable=True)[:capacity]
    return idx, labels.index_select(0, idx), count


def _static_rows(labels, ignore_index, vocab, capacity):
    """At most `capacity` rows, chosen with no host sync; labels checked on the device."""
    idx, picked, count = compact_labels(labels, capacity, ignore_index)
    counted = picked != ignore_index
    in_range = (picked >= 0) & (picked < vocab)
    require((in_range | ~counted).all(),
            f"labels must be in [0, {vocab}) (the vocabulary size, weight's first dimension) or "
            f"equal ignore_index={ignore_index}")
    return _Rows(idx, torch.where(counted & in_range, picked, 0), counted.float(), None, count)


# Elements the GEMMs' vocabulary extent is padded to on a GPU (see the module docstring); 1 turns
# the padding off (benchmarks/gpu_run.sh's lm-loss-align step times both).
GEMM_ALIGN = 8


def _gemm_align(device):
    # cuBLAS's rule for its aligned kernels. A CPU has no such kernels: there the copy only costs.
    return GEMM_ALIGN if device.type == "cuda" else 1


def logits_pitch(padded, dtype):
    """The logits buffer's row pitch: the (padded) vocabulary rounded up to 16 bytes, so every
    row starts 16-byte aligned (the row kernels' vector loads, cuBLAS's aligned kernels) and no
    more. On a GPU the padded vocabulary already is a multiple of 16 bytes: the buffer is then
    contiguous, an `out=` that cuBLASLt can write with the bias in its epilogue and whose column
    sum (d_bias) reads contiguous memory (a wider pitch made it strided)."""
    row = 16 // dtype.itemsize
    return -(-padded // row) * row


def _gemm_operands(weight, bias, dtype):
    """weight (V, H) and bias (V,) in `dtype` (the projection's: autocast may hand over an fp32
    weight with half hidden states), zero-padded to a multiple of _gemm_align rows: one copy
    for both, and none when neither is needed."""
    vocab, hidden = weight.shape
    align = _gemm_align(weight.device)
    padded = -(-vocab // align) * align
    if padded == vocab:
        return weight.to(dtype), None if bias is None else bias.to(dtype)

    def pad(t, shape):
        out = t.new_empty(shape, dtype=dtype)
        out[:vocab].copy_(t)
        out[vocab:].zero_()
        return out
    return pad(weight, (padded, hidden)), None if bias is None else pad(bias, (padded,))


_WIDE_ADDMM = {}  # device -> whether torch.addmm adds half products into an fp32 out


def _wide_addmm(device):
    """Whether torch.addmm(out_dtype=float32) accumulates half-precision products into an fp32
    tensor in place on `device` (CUDA in recent torch; not on CPU, and earlier releases wanted
    the added tensor in the inputs' dtype). Probed once per device on 2x2 tensors, the result
    checked; never during a CUDA-graph capture (the check reads a value back)."""
    if device.type != "cuda":
        return False
    if device not in _WIDE_ADDMM:
        if torch.cuda.is_current_stream_capturing():
            return False
        try:
            a = torch.ones((2, 2), dtype=torch.bfloat16, device=device)
            out = torch.full((2, 2), 0.5, dtype=torch.float32, device=device)
            torch.addmm(out, a, a, out_dtype=torch.float32, out=out)
            ok = bool((out == 2.5).all())
        except (RuntimeError, TypeError):
            ok = False
        _WIDE_ADDMM[device] = ok
    return _WIDE_ADDMM[device]


def _weight_grad_gemm(dw, a, b, first):
    """dw = a @ b (first chunk) or dw += a @ b. dw is in a's dtype, or fp32 (`_chunked`'s wide
    accumulation): then the sum across chunks is exact in fp32 and each product is rounded at
    most once, at its own magnitude (where addmm cannot write fp32, the product in a's dtype)."""
    if dw.dtype == a.dtype:
        if first:
            torch.mm(a, b, out=dw)
        else:
            dw.addmm_(a, b)
    elif _wide_addmm(dw.device):
        torch.addmm(dw, a, b, beta=0 if first else 1, out_dtype=torch.float32, out=dw)
    elif first:
        dw.copy_(torch.mm(a, b))
    else:
        dw.add_(torch.mm(a, b))


def _chunked(backend, h, weight, bias, labels, ignore_index, smoothing, z_loss, grad_scale,
             chunk_size, need_dh, need_dw, need_db, capacity=None, fp32_accum=False):
    """Runs the loss over the labelled rows. grad_scale: None (no gradients), "mean" (each
    row's loss scaled by 1/count), a float (each row's loss scaled alike: 1 for 'sum') or a (T,)
    tensor of per-row scales ('none'; the upstream gradient). capacity: None selects the
    labelled rows exactly (a host sync, label errors raised); an int selects at most that many
    with no host sync (`_static_rows`, label errors checked on the device). Returns the rows'
    (loss, lse, hit), each (n,) in the order of `sel.idx` (at a static selection's filler rows:
    finite values that `sel.weight` zeroes), the selection `sel`, and dh (T, H), dw, db or None.

    Every aten op here is a kernel launch on a GPU, a few microseconds of host time each: what
    the kernels write whole is allocated empty, a first chunk writes its sums instead of adding
    to zeros, and nothing is scattered back to the tokens that the caller does not need."""
    tokens, hidden = h.shape
    vocab = weight.shape[0]
    sel = (_exact_rows(labels, ignore_index, vocab) if capacity is None else
           _static_rows(labels, ignore_index, vocab, capacity))
    idx, picked = sel.idx, sel.labels
    n = picked.numel()  # rows computed
    if isinstance(grad_scale, Tensor):
        grad_scale = (grad_scale if idx is None else grad_scale.index_select(0, idx)).float()
    if sel.weight is not None and grad_scale is not None:  # static: every scale per row
        if isinstance(grad_scale, str):
            grad_scale = sel.weight / sel.count_t.clamp_min(1)
        else:
            grad_scale = sel.weight * grad_scale
    elif isinstance(grad_scale, str):  # "mean", exact selection: the count is known now
        grad_scale = 1.0 / max(sel.count, 1)
    if isinstance(grad_scale, Tensor):
        grad_scale = grad_scale.contiguous()
    compute_grad = grad_scale is not None and (need_dh or need_dw or need_db)
    rows = h if idx is None else h.index_select(0, idx)
    # loss, lse, hit: the row kernels write every row
    stats = torch.empty((3, n), dtype=torch.float32, device=h.device)
    w_g, b_g = _gemm_operands(weight, bias, h.dtype) if n else (weight, bias)
    padded = w_g.shape[0]
    dh_c = torch.empty((n, hidden), dtype=h.dtype, device=h.device) if compute_grad and need_dh else None
    # The first chunk writes d_weight and d_bias; with no rows at all they are zeros. A weight
    # wider than the projection's dtype (autocast's fp32 master weight) gets an fp32 gradient,
    # accumulated in fp32 (`_weight_grad_gemm`); `fp32_accum` asks the same for a half weight.
    # A projection in fp32 or fp64 accumulates in its own dtype, never narrower.
    half = h.dtype in (torch.float16, torch.bfloat16)
    dw_dtype = torch.float32 if half and (fp32_accum or weight.dtype != h.dtype) else h.dtype
    dw = ((torch.empty if n else torch.zeros)((padded, hidden), dtype=dw_dtype, device=h.device)
          if compute_grad and need_dw else None)
    db = ((torch.empty if n else torch.zeros)(padded, dtype=torch.float32, device=h.device)
          if compute_grad and need_db else None)
    chunk = min(chunk_size or default_chunk_size(vocab, h.dtype), max(n, 1))
    pitch = logits_pitch(padded, h.dtype)
    buf = torch.empty((chunk, pitch), dtype=h.dtype, device=h.device)[:, :padded] if n else None
    for c0 in range(0, n, chunk):
        c1 = min(c0 + chunk, n)
        h_c, logits_g = rows[c0:c1], buf[:c1 - c0]
        logits = logits_g[:, :vocab]  # what the cross-entropy sees; the pad columns stay 0
        if b_g is not None:
            torch.addmm(b_g, h_c, w_g.t(), out=logits_g)
        else:
            torch.mm(h_c, w_g.t(), out=logits_g)
        scale = grad_scale[c0:c1] if isinstance(grad_scale, Tensor) else grad_scale
        _cross_entropy_rows(backend, logits, picked[c0:c1], *(t[c0:c1] for t in stats),
                            smoothing, z_loss, scale, compute_grad)
        if not compute_grad:
            continue
        if dh_c is not None:
            torch.mm(logits_g, w_g, out=dh_c[c0:c1])
        if dw is not None:
            _weight_grad_gemm(dw, logits_g.t(), h_c, c0 == 0)
        if db is not None:
            if c0 == 0:
                torch.sum(logits_g, 0, dtype=torch.float32, out=db)  # the pad columns' is 0
            else:
                db += logits_g.sum(0, dtype=torch.float32)
    if dw is not None:
        # A contiguous view (the pad rows' gradient is 0 and is dropped), in the weight's dtype.
        dw = dw[:vocab].to(weight.dtype)
    dh = dh_c
    if dh_c is not None and idx is not None:
        dh = torch.zeros_like(h).index_copy_(0, idx, dh_c)
    if db is not None and bias is not None:
        db = db[:vocab].to(bias.dtype)
    return stats[0], stats[1], stats[2], sel, dh, dw, db


def _reduce(loss_rows, sel, tokens, reduction):
    """The loss of the computed rows, reduced; 'none': one entry per token, 0 at ignored ones."""
    weight = sel.weight  # static selection: 0.0 at filler rows, which count for nothing
    if reduction == "none":
        if weight is not None:
            loss_rows = loss_rows * weight
        if sel.idx is None:
            return loss_rows
        return loss_rows.new_zeros(tokens).index_copy_(0, sel.idx, loss_rows)
    if reduction == "mean" and sel.count:  # exact selection: the computed rows are the labelled
        return loss_rows.mean()
    total = loss_rows.sum() if weight is None else torch.dot(loss_rows, weight)
    if reduction == "sum" or sel.count == 0:  # no labelled row: 0, not torch's NaN
        return total
    return total / sel.count_t.clamp_min(1)


def _detail_sums(lse, hit, sel):
    """(2,) float32: the sum of lse^2 and the number of argmax hits over the labelled rows."""
    both = torch.stack([lse * lse, hit])
    return both.sum(1) if sel.weight is None else torch.mv(both, sel.weight)


def _forward_scale(reduction, wants_grad):
    if not wants_grad:
        return None
    return {"mean": "mean", "sum": 1.0}.get(reduction)  # 'none': gradients in the backward


def _forward(backend, h, weight, bias, labels, ignore_index, smoothing, z_loss, reduction,
             chunk_size, need_dh, need_dw, need_db, capacity=None, details=False,
             fp32_accum=False):
    """-> (loss, detail sums or None, labelled-row count as a tensor, dh, dw, db); with a
    reduction, the gradients the need_* flags ask for come from the same pass (scaled for it),
    else None. The detail sums (`_detail_sums`) only when `details`."""
    scale = _forward_scale(reduction, need_dh or need_dw or need_db)
    loss_rows, lse, hit, sel, dh, dw, db = _chunked(
        backend, h, weight, bias, labels, ignore_index, smoothing, z_loss, scale, chunk_size,
        need_dh, need_dw, need_db, capacity, fp32_accum)
    sums = _detail_sums(lse, hit, sel) if details else None
    return _reduce(loss_rows, sel, labels.numel(), reduction), sums, sel.count_t, dh, dw, db


# ---------------------------------------------------------------------------------------------
# Eager path.

class _LMLossFunction(torch.autograd.Function):
    # The settings come as one tuple: apply costs about 0.2 us per argument.
    @staticmethod
    def forward(ctx, h, weight, bias, labels, settings):
        (ignore_index, smoothing, z_loss, reduction, chunk_size, need_dh, need_dw, need_db,
         backend, capacity, details, fp32_accum) = settings
        loss, sums, n, dh, dw, db = _forward(
            backend, h, weight, bias, labels, ignore_index, smoothing, z_loss, reduction,
            chunk_size, need_dh, need_dw, need_db, capacity, details, fp32_accum)
        ctx.meta = (ignore_index, smoothing, z_loss, reduction, chunk_size, backend, need_dh,
                    need_dw, need_db, capacity, fp32_accum)
        if reduction == "none":
            ctx.save_for_backward(h, weight, bias, labels)
        else:  # the inputs too, only as anchors for first_derivative_only (no copies)
            ctx.save_for_backward(dh, dw, db, h, weight, bias)
        if sums is not None:
            ctx.mark_non_differentiable(sums)
        # No zero gradients made for the outputs that have none (three launches a backward).
        ctx.set_materialize_grads(False)
        return loss, sums, n

    @staticmethod
    @first_derivative_only("lm_loss")
    def backward(ctx, grad, _dsums, _dn):
        (ignore_index, smoothing, z_loss, reduction, chunk_size, backend, need_dh, need_dw,
         need_db, capacity, fp32_accum) = ctx.meta
        if grad is None:
            dh = dw = db = None
        elif reduction == "none":
            h, weight, bias, labels = ctx.saved_tensors
            _, _, _, _, dh, dw, db = _chunked(backend, h, weight, bias, labels, ignore_index,
                                              smoothing, z_loss, grad, chunk_size, need_dh,
                                              need_dw, need_db, capacity, fp32_accum)
        else:
            # A 0-dim float32 factor keeps the gradient's dtype (type promotion) in one launch.
            dh, dw, db = (None if t is None else t * grad for t in ctx.saved_tensors[:3])
        return dh, dw, db, None, None


# ---------------------------------------------------------------------------------------------
# torch.compile path: custom ops with fake kernels and autograd.

@torch.library.custom_op("fusedlm::lm_loss_fwd", mutates_args=())
def lm_loss_fwd_op(h: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                   ignore_index: int, smoothing: float, z_loss: float, reduction: str,
                   chunk_size: int, need_dh: bool, need_dw: bool, need_db: bool,
                   backend: str, capacity: int, details: bool,
                   fp32_accum: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """The driver with the static row selection (no host sync: a compiled step may be a CUDA
    graph) of at most `capacity` rows. Returns (loss, detail sums ((2,), or (0,) unless
    `details`), labelled count, dh, dw, db), a (0,) tensor for each gradient not computed."""
    loss, sums, n, dh, dw, db = _forward(
        backend, h, weight, bias, labels, ignore_index, smoothing, z_loss, reduction,
        chunk_size or None, need_dh, need_dw, need_db, capacity, details, fp32_accum)
    f32_empty = lambda: h.new_empty(0, dtype=torch.float32)  # one each: outputs may not alias
    return (loss, sums if sums is not None else f32_empty(), n,
            dh if dh is not None else h.new_empty(0), dw if dw is not None else weight.new_empty(0),
            db if db is not None else f32_empty() if bias is None else bias.new_empty(0))


@lm_loss_fwd_op.register_fake
def _(h, weight, bias, labels, ignore_index, smoothing, z_loss, reduction, chunk_size, need_dh,
      need_dw, need_db, backend, capacity, details, fp32_accum):
    tokens = h.shape[0]
    grads = reduction != "none"
    f32 = dict(dtype=torch.float32)
    return (h.new_empty((tokens,) if reduction == "none" else (), **f32),
            h.new_empty((2,) if details else (0,), **f32),
            h.new_empty((), dtype=torch.int64),
            h.new_empty(h.shape if grads and need_dh else (0,)),
            weight.new_empty(weight.shape if grads and need_dw else (0,)),
            h.new_empty((weight.shape[0],) if grads and need_db else (0,),
                        dtype=bias.dtype if bias is not None else torch.float32))


@torch.library.custom_op("fusedlm::lm_loss_bwd", mutates_args=())
def lm_loss_bwd_op(h: Tensor, weight: Tensor, bias: Optional[Tensor], labels: Tensor,
                   grad_rows: Tensor, ignore_index: int, smoothing: float, z_loss: float,
                   chunk_size: int, need_dh: bool, need_dw: bool, need_db: bool,
                   backend: str, capacity: int, fp32_accum: bool) -> Tuple[Tensor, Tensor, Tensor]:
    """Gradients of sum_i grad_rows[i] * loss_i (reduction 'none'), recomputing the chunks."""
    _, _, _, _, dh, dw, db = _chunked(backend, h, weight, bias, labels, ignore_index, smoothing,
                                      z_loss, grad_rows, chunk_size or None, need_dh, need_dw,
                                      need_db, capacity, fp32_accum)
    return (dh if dh is not None else h.new_empty(0), dw if dw is not None else weight.new_empty(0),
            db if db is not None else h.new_empty(0, dtype=torch.float32))


@lm_loss_bwd_op.register_fake
def _(h, weight, bias, labels, grad_rows, ignore_index, smoothing, z_loss, chunk_size, need_dh,
      need_dw, need_db, backend, capacity, fp32_accum):
    return (h.new_empty(h.shape if need_dh else (0,)),
            weight.new_empty(weight.shape if need_dw else (0,)),
            h.new_empty((weight.shape[0],) if need_db else (0,),
                        dtype=bias.dtype if bias is not None else torch.float32))


def _setup_context(ctx, inputs, output):
    (h, weight, bias, labels, ignore_index, smoothing, z_loss, reduction, chunk_size, need_dh,
     need_dw, need_db, backend, capacity, _details, fp32_accum) = inputs
    ctx.meta = (ignore_index, smoothing, z_loss, reduction, chunk_size, backend, need_dh, need_dw,
                need_db, capacity, fp32_accum)
    if reduction == "none":
        ctx.save_for_backward(h, weight, bias, labels)
    else:
        ctx.save_for_backward(*output[3:])


def _op_backward(ctx, grad, _dsums, _dn, _ddh, _ddw, _ddb):
    (ignore_index, smoothing, z_loss, reduction, chunk_size, backend, need_dh, need_dw, need_db,
     capacity, fp32_accum) = ctx.meta
    if reduction == "none":
        h, weight, bias, labels = ctx.saved_tensors
        dh, dw, db = torch.ops.fusedlm.lm_loss_bwd(h, weight, bias, labels, grad.contiguous(),
                                                   ignore_index, smoothing, z_loss, chunk_size,
                                                   need_dh, need_dw, need_db, backend, capacity,
                                                   fp32_accum)
    else:
        dh, dw, db = (t * grad for t in ctx.saved_tensors)  # a 0-dim factor keeps their dtype
    return (dh if need_dh else None, dw if need_dw else None, db if need_db else None,
            None, None, None, None, None, None, None, None, None, None, None, None, None)


lm_loss_fwd_op.register_autograd(_op_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public functional API.

def _validate(hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, z_loss,
              chunk_size, capacity, accum_dtype):
    for name, t in (("hidden", hidden), ("weight", weight), ("labels", labels)):
        if not isinstance(t, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not hidden.is_floating_point():
        raise TypeError(f"hidden must be a floating-point tensor, got dtype {hidden.dtype}")
    if hidden.dim() < 2 or hidden.shape[-1] == 0:
        raise ValueError(f"hidden must have shape (tokens, H) or (batch, seq, H) with H > 0, got "
                         f"{tuple(hidden.shape)}")
    if weight.dim() != 2 or weight.shape[1] != hidden.shape[-1] or weight.shape[0] == 0:
        raise ValueError(f"weight must have shape (vocab, {hidden.shape[-1]}) (vocab > 0, H = "
                         f"hidden's last dimension), got {tuple(weight.shape)}")
    # Under autocast both are cast to the autocast dtype (autocast_inputs), so they may differ.
    if dtype_differs(weight, hidden):
        raise TypeError(f"weight must have hidden's dtype {hidden.dtype}, got {weight.dtype} "
                        "(under autocast both are cast to the autocast dtype)")
    if labels.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"labels must be an int64 or int32 tensor, got dtype {labels.dtype}")
    if labels.shape != hidden.shape[:-1]:
        raise ValueError(f"labels must have shape {tuple(hidden.shape[:-1])} (hidden's without its "
                         f"last dimension), got {tuple(labels.shape)}")
    if bias is not None:
        if not isinstance(bias, Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if bias.shape != (weight.shape[0],):
            raise ValueError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
        if dtype_differs(bias, hidden):
            raise TypeError(f"bias must have hidden's dtype {hidden.dtype}, got {bias.dtype}")
    for name, t in (("weight", weight), ("labels", labels), ("bias", bias)):
        if t is not None and t.device != hidden.device:
            raise ValueError(f"{name} is on {t.device} but hidden is on {hidden.device}")
    if hidden.device.type == "meta":
        raise ValueError("hidden is a meta tensor: lm_loss reads the labels' values (which rows are "
                         "labelled), which meta tensors do not have; torch.compile's fake tensors "
                         "are served by the custom op's shape function instead")
    if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
        raise TypeError(f"ignore_index must be an int, got {ignore_index!r}")
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {', '.join(_REDUCTIONS)}, got {reduction!r}")
    if not isinstance(label_smoothing, (int, float)) or not 0.0 <= label_smoothing <= 1.0:
        raise ValueError(f"label_smoothing must be a float in [0, 1], got {label_smoothing!r}")
    if not isinstance(z_loss, (int, float)) or not z_loss >= 0.0:
        raise ValueError(f"z_loss must be a non-negative float, got {z_loss!r}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or isinstance(chunk_size, bool)
                                   or chunk_size < 1):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if capacity is not None and (not isinstance(capacity, int) or isinstance(capacity, bool)
                                 or capacity < 1):
        raise ValueError(f"capacity must be a positive int (labelled rows computed at most) or "
                         f"None, got {capacity!r}")
    check_accum_dtype(accum_dtype)


def check_accum_dtype(accum_dtype, name="accum_dtype"):
    """lm_loss's `accum_dtype` check, also run by the modules and model configs that pass one on
    (at construction, where a wrong value is the caller's)."""
    if accum_dtype not in (None, torch.float32):
        raise ValueError(f"{name} must be None or torch.float32 (the dtype the weight's "
                         f"gradient is summed in across chunks), got {accum_dtype!r}")


def lm_loss(hidden: Tensor, weight: Tensor, labels: Tensor, bias: Optional[Tensor] = None, *,
            ignore_index: int = -100, reduction: str = "mean", label_smoothing: float = 0.0,
            z_loss: float = 0.0, shift: bool = False, return_details: bool = False,
            chunk_size: Optional[int] = None, capacity: Optional[int] = None,
            accum_dtype: Optional[torch.dtype] = None, backend: Optional[str] = None):
    """F.cross_entropy(hidden @ weight.T + bias, labels) without materializing the logits.

    hidden: (tokens, H) or (batch, seq, H); weight: (V, H), e.g. the tied embedding; labels:
    hidden's shape without H, `ignore_index` where nothing is predicted. Only labelled rows are
    computed. `shift=True` is the causal-LM loss: position t predicts labels[..., t + 1].
    `z_loss` adds z_loss * logsumexp(logits)^2 per labelled token. reduction: 'mean' (over
    labelled tokens; 0 when there are none, where torch gives NaN), 'sum' or 'none' (per token,
    0 at ignored ones). With `return_details`, returns an LMLossOutput (loss, z_loss, accuracy,
    count) from the same pass. `chunk_size`: labelled rows projected at a time (default: a
    ~256 MiB logits buffer). `backend`: 'torch', 'triton' or 'cuda' (None: dispatch chooses).

    `capacity`: the most labelled rows computed, chosen with no host synchronization (so the
    call can be captured in a CUDA graph). None: in eager mode the labelled rows exactly (one
    host sync reads their count; a label out of range raises ValueError); under torch.compile
    every row (capacity = tokens). With a capacity, and under torch.compile, what only the labels'
    values show (a label out of range, more labelled rows than the capacity) is checked on the
    device: a ValueError on a CPU, a device-side assert with the message on a GPU (PyTorch's
    own index checks do the same; the CUDA context is unusable afterwards). For BERT's 15%
    masking, a capacity of 20-25% of the tokens is many standard deviations above the count.

    `accum_dtype`: the dtype the weight's gradient is summed in across chunks. None: fp32 for
    an fp32 weight under autocast (mixed-precision training; it is the gradient's own dtype),
    else the weight's dtype (a bf16 weight's gradient is then rounded once per chunk: about 2x
    one GEMM's error at 32 chunks). torch.float32 sums a half weight's in fp32 too, rounded once
    at the end, for an fp32 buffer of the weight's size (twice a bf16 gradient's memory); fp32
    and fp64 projections always sum in their own dtype.
    """
    _validate(hidden, weight, labels, bias, ignore_index, reduction, label_smoothing, z_loss,
              chunk_size, capacity, accum_dtype)
    # Under autocast the projection runs in the autocast dtype, as nn.Linear's would; the weight
    # and bias are cast inside (`_gemm_operands`), so that an fp32 weight's gradient accumulates
    # in fp32 and comes back fp32 directly (see the module docstring).
    hidden, = autocast_inputs(hidden)
    chosen = dispatch.select("lm_loss", (hidden.device.type, hidden.dtype, weight.shape[0]), backend)
    if shift:
        # Position t predicts t + 1; the last position of each sequence predicts nothing.
        pad = labels.new_full(labels.shape[:-1] + (1,), ignore_index)
        labels = torch.cat([labels[..., 1:], pad], dim=-1)
    out_shape = labels.shape
    h2 = unit_stride(hidden.reshape(-1, hidden.shape[-1]))
    w = unit_stride(weight)
    # The row kernels index labels by row: a strided or expanded (stride 0) view is copied.
    y = labels.reshape(-1).long().contiguous()
    grad_on = torch.is_grad_enabled()
    needs = (grad_on and h2.requires_grad, grad_on and w.requires_grad,
             grad_on and bias is not None and bias.requires_grad)
    args = (ignore_index, float(label_smoothing), float(z_loss), reduction)
    tokens = y.numel()
    details = bool(return_details)
    wide = accum_dtype is not None  # validated: torch.float32
    with autocast_off(hidden.device.type):
        if torch.compiler.is_compiling():
            cap = min(capacity or tokens, tokens)
            loss, sums, n, *_ = torch.ops.fusedlm.lm_loss_fwd(h2, w, bias, y, *args,
                                                              chunk_size or 0, *needs, chosen,
                                                              cap, details, wide)
        else:
            cap = None if capacity is None else min(capacity, tokens)
            if not any(needs):  # inference: the driver alone (autograd's apply costs ~35 us)
                loss, sums, n, *_ = _forward(chosen, h2, w, bias, y, *args, chunk_size, *needs,
                                             cap, details, wide)
            else:
                loss, sums, n = _LMLossFunction.apply(
                    h2, w, bias, y, (*args, chunk_size, *needs, chosen, cap, details, wide))
    if reduction == "none":
        loss = loss.view(out_shape)
        if shift:
            loss = loss[..., :-1]
    if not details:
        return loss
    per_row = sums / n.clamp_min(1)  # (mean lse^2, accuracy) over the labelled rows
    return LMLossOutput(loss, (z_loss * per_row[0]).detach(), per_row[1].detach(), n)
