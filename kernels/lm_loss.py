"""Cross-entropy over a chunk of projected logits, loss and gradient in one kernel.

The LM-loss driver (fusedlm.ops.lm_loss) projects a chunk of labelled rows to the vocabulary
with one matmul, calls this kernel on the (rows, V) logits, then multiplies the gradient it left
in place by the weight (d_hidden) and the hidden rows (d_weight). Only a chunk of logits ever
exists; this kernel never holds more than a BLOCK_V tile of a row.

One program per row, two passes over the row:
  1. tile by tile over V: running max m and sum s of exp(x - m) (online log-sum-exp), the sum of
     the logits (label smoothing), the first argmax (accuracy). lse = m + log(s).
     loss = (1 - eps) (lse - x_label) + eps (lse - mean(x)) + z * lse^2
  2. (COMPUTE_GRAD) over V again, writing in place
     dx_j = scale * (softmax_j (1 + 2 z lse) - (1 - eps) [j == label] - eps / V)
All arithmetic is fp32 whatever the logits' dtype.
"""
import triton
import triton.language as tl

from ._host import next_power_of_2


@triton.jit
def _load_tile(base, cols, V, other, MASKED: tl.constexpr, VEC: tl.constexpr):
    # Whole tiles load unmasked and the last tile up to V rounded up to whole VEC-element
    # vectors (readable: the host checked the row pitch): a mask constant over every vector keeps
    # 16-byte loads at any V; the columns past V are replaced after the load. The mask `cols < V`
    # made them 2-byte loads whenever V was not a multiple of 16 (BERT's 30522, GPT-2's 50257).
    if MASKED:
        x = tl.load(base + cols, mask=cols < tl.cdiv(V, VEC) * VEC, other=other)
        return tl.where(cols < V, x.to(tl.float32), other)
    else:
        return tl.load(base + cols).to(tl.float32)


@triton.jit
def _stats_tile(base, start, offs, V, m, s, total, best, MASKED: tl.constexpr,
                SMOOTH: tl.constexpr, VEC: tl.constexpr):
    """The online statistics of the row, updated with the tile at `start`."""
    cols = start + offs
    x = _load_tile(base, cols, V, -float("inf"), MASKED, VEC)
    tile_max = tl.max(x, axis=0)
    # The first maximal column wins, as in torch.argmax: a later tile only on a strict rise.
    best = tl.where(tile_max > m, start + tl.argmax(x, axis=0), best)
    new_m = tl.maximum(m, tile_max)
    # While every logit so far is -inf (a bias can mask a whole tile), exp(-inf - -inf) would
    # be NaN: shift by 0 instead, which adds exact zeros.
    shift = tl.where(new_m == -float("inf"), 0.0, new_m)
    s = s * tl.exp(m - shift) + tl.sum(tl.exp(x - shift), axis=0)
    if SMOOTH:
        total += tl.sum(tl.where(cols < V, x, 0.0), axis=0)
    return new_m, s, total, best


@triton.jit
def _grad_tile(base, start, offs, V, label, lse, p_scale, scale, smoothing,
               MASKED: tl.constexpr, SMOOTH: tl.constexpr, VEC: tl.constexpr):
    """Overwrites the tile at `start` with its gradient (columns past V untouched)."""
    cols = start + offs
    x = _load_tile(base, cols, V, 0.0, MASKED, VEC)
    g = tl.exp(x - lse) * p_scale
    g -= tl.where(cols == label, (1.0 - smoothing) * scale, 0.0)
    if SMOOTH:
        g -= smoothing / V * scale
    g = g.to(base.dtype.element_ty)
    if MASKED:
        tl.store(base + cols, g, mask=cols < V)
    else:
        tl.store(base + cols, g)


@triton.jit
def _ce_rows_kernel(
    LOGITS, LABELS, LOSS, LSE, HIT, ROW_SCALE,
    stride_vecs, V, smoothing, z_loss, grad_scale,
    COMPUTE_GRAD: tl.constexpr, HAS_ROW_SCALE: tl.constexpr, SMOOTH: tl.constexpr,
    BLOCK_V: tl.constexpr, VEC: tl.constexpr,
):
    row = tl.program_id(0)
    # The pitch in VEC-element vectors, so that the compiler knows every row 16-byte aligned
    # whatever the pitch's value (Triton's own hint needs a multiple of 16 elements: GPT-2's
    # padded 50264 is not, and its rows compiled to 2-byte loads throughout).
    base = LOGITS + row.to(tl.int64) * stride_vecs * VEC
    label = tl.load(LABELS + row)
    offs = tl.arange(0, BLOCK_V)
    whole = V // BLOCK_V * BLOCK_V  # the columns in whole tiles; a masked tile takes the rest

    m = -float("inf")
    s = 0.0
    total = 0.0
    best = 0
    for start in range(0, whole, BLOCK_V):
        m, s, total, best = _stats_tile(base, start, offs, V, m, s, total, best, False, SMOOTH,
                                        VEC)
    if whole < V:
        m, s, total, best = _stats_tile(base, whole, offs, V, m, s, total, best, True, SMOOTH,
                                        VEC)
    lse = m + tl.log(s)
    # An out-of-range label (rejected by the Python API before launch) reads nothing: NaN loss.
    x_label = tl.load(base + label, mask=(label >= 0) & (label < V), other=float("nan")).to(tl.float32)
    loss = (1.0 - smoothing) * (lse - x_label)
    if SMOOTH:
        loss += smoothing * (lse - total / V)
    loss += z_loss * lse * lse
    tl.store(LOSS + row, loss)
    tl.store(LSE + row, lse)
    tl.store(HIT + row, (best == label).to(tl.float32))

    if COMPUTE_GRAD:
        if HAS_ROW_SCALE:
            scale = tl.load(ROW_SCALE + row)
        else:
            scale = grad_scale
        p_scale = scale * (1.0 + 2.0 * z_loss * lse)
        for start in range(0, whole, BLOCK_V):
            _grad_tile(base, start, offs, V, label, lse, p_scale, scale, smoothing, False, SMOOTH,
                       VEC)
        if whole < V:
            _grad_tile(base, whole, offs, V, label, lse, p_scale, scale, smoothing, True, SMOOTH,
                       VEC)


def ce_rows(logits, labels, loss, lse, hit, *, label_smoothing, z_loss, row_scale, scale,
            compute_grad):
    """logits: (rows, V), unit column stride (overwritten by the gradient when `compute_grad`);
    labels: (rows,) int64 in [0, V); loss, lse, hit: (rows,) float32 outputs. The gradient of
    row i is scaled by row_scale[i] ((rows,) float32) when given, else by `scale`."""
    rows, vocab = logits.shape
    if rows == 0:
        return
    block_v = min(next_power_of_2(vocab), 4096)
    vec = _vector_width(logits)
    _ce_rows_kernel[(rows,)](
        logits, labels, loss, lse, hit, row_scale if row_scale is not None else loss,
        logits.stride(0) // vec, vocab, float(label_smoothing), float(z_loss), float(scale),
        COMPUTE_GRAD=compute_grad, HAS_ROW_SCALE=row_scale is not None,
        SMOOTH=label_smoothing != 0.0, BLOCK_V=block_v, VEC=vec,
        num_warps=8 if block_v >= 2048 else 4,
    )


def _vector_width(logits):
    """Elements in 16 bytes when every row starts 16-byte aligned and may be read up to V rounded
    up to whole 16-byte vectors (the last row included: within the storage); else 1. The LM-loss
    driver's logits buffer always qualifies (lm_loss.logits_pitch)."""
    rows, vocab = logits.shape
    vec = 16 // logits.element_size()
    readable = logits.storage_offset() + (rows - 1) * logits.stride(0) + -(-vocab // vec) * vec
    if (logits.data_ptr() % 16 or logits.stride(0) % vec
            or readable * logits.element_size() > logits.untyped_storage().nbytes()):
        return 1
    return vec
