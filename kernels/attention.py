"""Flash attention forward and backward: dense batches (with an optional key-padding mask) and
packed variable-length batches, causal or not, grouped-query heads, dropout.

Forward: one program per (block of BLOCK_M queries, batch, query head). It streams key/value
blocks, keeping a running max m and sum l of the softmax in fp32 (base 2: scores are scaled by
softmax_scale * log2(e) so exp2 serves), and stores the output and the log-sum-exp per query
(log2 domain; +inf for a query that sees no key, so that its probabilities recompute as 0 and
its output is 0, never NaN).

Backward, deterministic by construction (no atomics) by default: `_attn_bwd_dkdv` owns a block of keys of
one key head and loops over every query head of its group and every query block, accumulating
dK and dV in registers; `_attn_bwd_dq` owns a block of queries and loops over the keys. Both
recompute P = exp2(S - lse) from the saved log-sum-exp: no sequence x sequence matrix is stored.
dQ runs first and also leaves delta = rowsum(dO * O) of its rows for dK/dV, which needs every
row's: no launch and no pass over dO of its own.

Masks: causal is aligned bottom-right (query i sees key j iff j <= i + Sk - Sq); a sliding
window (WINDOW, flash-attn's window_size) bounds it to i + Sk - Sq - left <= j <= i + Sk - Sq +
right, every block in the window's range then taking the edge path's tests; the key mask
(batch, Sk) marks keys to attend with nonzero; the forward and dQ stop after the last attended
key of the row and dK/dV skip key blocks it hides entirely, so a right-padded batch spends no work
on its padding keys (its padding queries are still computed: their outputs are defined); a packed
batch gives each sequence's rows through cu_seqlens, so no work is spent on padding at all. Dropout keeps a probability when its Philox word
(stream seed + batch * heads + head; four keys a draw, see `_keep` and csrc/common/philox.h) is
at least p * 2^32, and scales it by 1/(1 - p); the backward regenerates the same draws. The seed comes by value, or (SEED_PTR, under torch.compile)
from a one-element tensor on the device, which the kernels read (_dropout.seed_of).

FUSEDLM_TRITON_ATOMIC_DQ=1 (opt-in until timed on a GPU) takes FlashAttention-2's backward
instead at head dims up to 128: dK/dV also adds dQ's shares into an fp32 accumulator with
atomics, 5 matrix products a block pair instead of 7, not bitwise reproducible (see ATOMIC_DQ
below).

On Hopper, FUSEDLM_TRITON_TMA=1 (opt-in until it has run on a GPU) moves the three kernels'
tiles through tensor descriptors (TMA) and warp-specializes the forward's key loop; see TMA
below.
"""
import inspect
import os

import triton
import triton.language as tl

from ._dropout import seed_args, seed_of
from ._host import cdiv, next_power_of_2

LOG2E = 1.4426950408889634
MAX_HEAD_DIM = 256  # one BLOCK_D tile of the head dim in registers; larger ones spill


# Integer arguments that change from call to call (a batch's longest sequence, packed or
# dynamically padded; the dropout seed, drawn per call). Triton would otherwise compile a variant
# for each value class it specializes on (divisible by 16, equal to 1): seconds of compiling in
# the middle of a training run, each time a batch or seed falls in a new class.
_PER_CALL = ["seq_q", "seq_k", "seed"]


@triton.jit
def _seq_bounds(CU_Q, CU_K, b, seq_q, seq_k, IS_VARLEN: tl.constexpr):
    """(first row of this sequence in the packed tensors, its length) for queries and keys."""
    if IS_VARLEN:
        q0 = tl.load(CU_Q + b)
        q_len = tl.load(CU_Q + b + 1) - q0
        k0 = tl.load(CU_K + b)
        k_len = tl.load(CU_K + b + 1) - k0
    else:
        q0 = b * 0
        q_len = seq_q
        k0 = b * 0
        k_len = seq_k
    return q0, q_len, k0, k_len


@triton.jit
def _head(X, b, row0, h, s_b, s_s, s_h):
    """Row `row0` of batch b, head h of a (batch, seq, heads, D) or packed tensor (64-bit
    offsets: a long pack's rows times its stride pass 2^31)."""
    return X + b.to(tl.int64) * s_b + row0.to(tl.int64) * s_s + h * s_h


@triton.jit
def _query_program(CU_Q, CU_K, seq_q, seq_k, n_heads, group, IS_VARLEN: tl.constexpr):
    """What a program of the forward or dQ kernel owns (axis 1: batch x query heads): its
    (batch x head) index, batch, head, key head, and its sequence's bounds."""
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    q0, q_len, k0, k_len = _seq_bounds(CU_Q, CU_K, b, seq_q, seq_k, IS_VARLEN)
    return bh, b, h, h // group, q0, q_len, k0, k_len


@triton.jit
def _tile_mask(rows, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """Which elements of a (rows, BLOCK_D) tile exist: rows before n_rows, columns before
    HEAD_DIM (tested only when the head dim is not a power of two)."""
    mask = rows[:, None] < n_rows
    if HEAD_DIM != BLOCK_D:
        mask = mask & (offs_d[None, :] < HEAD_DIM)
    return mask


@triton.jit
def _load_rows(ptr, rows, stride, n_rows, offs_d, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr):
    """A (rows, BLOCK_D) tile; zeros past n_rows and past HEAD_DIM."""
    return tl.load(ptr + rows[:, None] * stride + offs_d[None, :],
                   mask=_tile_mask(rows, n_rows, offs_d, HEAD_DIM, BLOCK_D), other=0.0)


@triton.jit
def _load_block(src, row0, rows, stride, n_rows, offs_d, HEAD_DIM: tl.constexpr,
                BLOCK_D: tl.constexpr, TMA: tl.constexpr):
    """The (rows, BLOCK_D) tile starting at row0: through a tensor descriptor (a TMA copy on
    Hopper; rows past the descriptor's shape read as zeros) or through masked loads."""
    if TMA:
        tile = src.load([row0, 0])
    else:  # (not an early return: Triton compiles the code after one, a descriptor there fails)
        tile = _load_rows(src, rows, stride, n_rows, offs_d, HEAD_DIM, BLOCK_D)
    return tile


@triton.jit
def _key_mask(KMASK, offs_n, k_len):
    return tl.load(KMASK + offs_n, mask=offs_n < k_len, other=0) != 0


@triton.jit
def _attended_end(KMASK, k_len, CHUNK: tl.constexpr):
    """One past the last key the padding mask lets through (0 if none): the forward and dQ stop
    there, so a right-padded batch (BERT's) spends no work on its padding keys. One pass over
    the mask row: k_len bytes against the k_len * HEAD_DIM * 4 bytes of K and V read after it."""
    offs = tl.arange(0, CHUNK)
    end = 0
    for start in range(0, k_len, CHUNK):
        idx = start + offs
        attended = _key_mask(KMASK, idx, k_len)
        end = tl.maximum(end, tl.max(tl.where(attended, idx + 1, 0), 0))
    return end


@triton.jit
def _scores(q, k, offs_m, offs_n, q_len, k_len, KMASK, scale_log2, win_left, win_right, cap,
            slope,
            ON_EDGE: tl.constexpr, CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr,
            WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
                HAS_ALIBI: tl.constexpr):
    """Scores (queries x keys) in the log2 domain with -inf where a key may not be attended.
    Off the edge (a key block wholly inside the sequence and, when causal, wholly visible to the
    query block) only the padding mask can apply, which spares the bounds and causal tests on
    most blocks. Query rows past the sequence are never masked: they are not stored."""
    s = _raw_scores(tl.dot(q, tl.trans(k)), scale_log2, cap, SOFTCAP)
    if HAS_ALIBI:
        s = s - _alibi_penalty(slope, offs_m[:, None], offs_n[None, :], q_len, k_len)
    if ON_EDGE:
        valid = offs_n[None, :] < k_len
        if CAUSAL:
            valid = valid & (offs_n[None, :] <= offs_m[:, None] + (k_len - q_len))
        if WINDOW:
            valid = valid & _in_window(offs_m[:, None], offs_n[None, :], q_len, k_len, win_left,
                                       win_right)
        if HAS_KMASK:
            valid = valid & _key_mask(KMASK, offs_n, k_len)[None, :]
        s = tl.where(valid, s, float("-inf"))
    elif HAS_KMASK:
        s = tl.where(_key_mask(KMASK, offs_n, k_len)[None, :], s, float("-inf"))
    return s


@triton.jit
def _raw_scores(qk, scale_log2, cap, SOFTCAP: tl.constexpr):
    """q k^T in the log2 domain: scaled, or soft-capped (Gemma 2's logit softcapping, flash-attn's
    softcap): cap * tanh(qk * scale / softcap) with cap = softcap * log2(e)."""
    if SOFTCAP:
        x = qk * (scale_log2 / cap)
        return cap * (1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0))  # tanh, finite for any x
    return qk * scale_log2


@triton.jit
def _alibi_penalty(slope, rows_q, cols_k, q_len, k_len):
    """ALiBi's -bias: slope * |i + Sk - Sq - j| for query positions rows_q and key positions
    cols_k (broadcast against each other: either orientation), subtracted from the (capped)
    scores."""
    return slope * tl.abs(rows_q + (k_len - q_len) - cols_k).to(tl.float32)


@triton.jit
def _alibi_slope(ALIBI, b, h, s_ab, scale_log2, HAS_ALIBI: tl.constexpr):
    """Head h's ALiBi slope in the log2 domain (slopes per head, or per batch and head with
    s_ab their batch stride); 0 without ALiBi."""
    if HAS_ALIBI:
        return tl.load(ALIBI + b * s_ab + h) * 1.4426950408889634
    return scale_log2 * 0.0


@triton.jit
def _capped_grad(s, cap):
    """d(capped score)/d(scaled score) = 1 - tanh^2 at capped scores s (log2 domain); 0 where s
    is -inf (a masked entry, whose probability is 0 anyway)."""
    t = tl.where(s == float("-inf"), 0.0, s / cap)
    return 1.0 - t * t


@triton.jit
def _keep(seed, offs_m, start_n, seq_k, p_drop, BLOCK_N: tl.constexpr, TRANSPOSED: tl.constexpr):
    """Dropout's keep-mask, (queries x keys BLOCK_N from start_n, a multiple of 4), or (keys x
    queries) if TRANSPOSED: the same draws. One Philox draw gives four 32-bit words: key j of
    query i takes word j % 4 of the draw at counter i * ceil(seq_k / 4) + j // 4, kept when the
    word is at least p * 2^32 (an integer compare: dropped with probability p to within 2^-32).
    (queries x keys): a draw per four keys, a quarter of the draws of one per probability.
    (keys x queries), dK/dV's: a draw per probability, its word picked. Joining the four words
    along the keys there needs a permute, whose layout change made ptxas serialize the dK/dV
    kernel's wgmma on Triton 3.9 (benchmarks/kernel_facts.py). (One return: Triton also
    compiles the code after an early one, whose shape differs when BLOCK_M != BLOCK_N; the
    interpreter does not.)"""
    per_row = (seq_k + 3) // 4
    least = (tl.cast(p_drop, tl.float32) * 4294967296.0).to(tl.uint32)  # p as fp32, as compiled
    if TRANSPOSED:
        keys = start_n + tl.arange(0, BLOCK_N)
        r0, r1, r2, r3 = tl.randint4x(seed, offs_m[None, :] * per_row + (keys // 4)[:, None])
        word = (keys % 4)[:, None]
        keep = tl.where(word == 0, r0, tl.where(word == 1, r1, tl.where(word == 2, r2, r3))) >= least
    else:
        groups = start_n // 4 + tl.arange(0, BLOCK_N // 4)
        r0, r1, r2, r3 = tl.randint4x(seed, offs_m[:, None] * per_row + groups[None, :])
        # [..., g, a, b]: word 2a + b of group g
        words = tl.join(tl.join(r0 >= least, r2 >= least), tl.join(r1 >= least, r3 >= least))
        keep = tl.reshape(words, (offs_m.shape[0], BLOCK_N))
    return keep


@triton.jit
def _causal_split(pid_m, q_len, k_len, KMASK, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr):
    """Key range of a query block: [0, full) needs no bounds or causal test, [full, hi) does;
    keys past hi are never seen (causal is bottom-right: query i sees key j iff j <= i + k_len - q_len;
    with a padding mask, no key after the last attended one)."""
    hi = k_len
    full = k_len // BLOCK_N * BLOCK_N
    if CAUSAL:
        shift = k_len - q_len
        hi = tl.minimum(k_len, tl.maximum((pid_m + 1) * BLOCK_M + shift, 0))
        full = tl.minimum(full, tl.maximum(pid_m * BLOCK_M + shift + 1, 0) // BLOCK_N * BLOCK_N)
    if HAS_KMASK:
        hi = tl.minimum(hi, _attended_end(KMASK, k_len, 512))
        full = tl.minimum(full, hi // BLOCK_N * BLOCK_N)
    return full, hi


@triton.jit
def _one_loop_keys(pid_m, q_len, k_len, KMASK, win_left, win_right, BLOCK_M: tl.constexpr,
                   BLOCK_N: tl.constexpr, CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr,
                   WINDOW: tl.constexpr):
    """Key range [lo, hi) of a query block walked in one loop whose every block takes the edge
    tests: a window's range, or every key up to the last one visible."""
    if WINDOW:
        lo, hi = _window_keys(pid_m, q_len, k_len, KMASK, win_left, win_right, BLOCK_M, BLOCK_N,
                              HAS_KMASK)
    else:
        lo = 0
        hi = _causal_split(pid_m, q_len, k_len, KMASK, BLOCK_M, BLOCK_N, CAUSAL, HAS_KMASK)[1]
    return lo, hi


@triton.jit
def _rows_descriptor(ptr, n_rows, stride, HEAD_DIM: tl.constexpr, BLOCK_R: tl.constexpr,
                     BLOCK_D: tl.constexpr):
    """A tensor descriptor (TMA on Hopper) over one sequence's rows of one head: rows past
    n_rows and columns past HEAD_DIM read as zeros and are not written. An empty sequence (a
    packed batch's key sequence of length 0) still gets one row: a TMA descriptor's extents must
    be positive, and no block of it is read (its key range is empty)."""
    return tl.make_tensor_descriptor(ptr, shape=[tl.maximum(n_rows, 1), HEAD_DIM],
                                     strides=[stride, 1], block_shape=[BLOCK_R, BLOCK_D])


@triton.jit
def _in_window(i, j, q_len, k_len, win_left, win_right):
    """May query i see key j under the sliding window (both bounds finite: the launcher passes a
    bound past every sequence for an unbounded side)?"""
    shift = k_len - q_len
    return (j >= i + shift - win_left) & (j <= i + shift + win_right)


@triton.jit
def _window_keys(pid_m, q_len, k_len, KMASK, win_left, win_right, BLOCK_M: tl.constexpr,
                 BLOCK_N: tl.constexpr, HAS_KMASK: tl.constexpr):
    """Key range [lo, hi) of a query block under a sliding window (whole key blocks; the
    causal bound is the window's right side), cut at the last attended key."""
    shift = k_len - q_len
    lo = tl.maximum(pid_m * BLOCK_M + shift - win_left, 0) // BLOCK_N * BLOCK_N
    hi = tl.minimum(k_len, tl.maximum((pid_m + 1) * BLOCK_M + shift + win_right, 0))
    if HAS_KMASK:
        hi = tl.minimum(hi, _attended_end(KMASK, k_len, 512))
    return lo, tl.maximum(hi, lo)


@triton.jit
def _window_queries(pid_n, q_len, k_len, win_left, win_right, BLOCK_M: tl.constexpr,
                    BLOCK_N: tl.constexpr):
    """Query range [lo, hi) (whole query blocks) that can see a key block under the window."""
    shift = k_len - q_len
    lo = tl.maximum(pid_n * BLOCK_N - shift - win_right, 0) // BLOCK_M * BLOCK_M
    hi = tl.minimum(q_len, tl.maximum((pid_n + 1) * BLOCK_N - shift + win_left, 0))
    return lo, tl.maximum(hi, lo)


@triton.jit
def _fwd_blocks(acc, m_i, l_i, q, k_ptr, v_ptr, s_ks, s_vs, lo, hi, offs_m, offs_n, offs_d,
                q_len, k_len, KMASK, scale_log2, seed, p_drop, seq_k, win_left, win_right, cap, slope,
                HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
                ON_EDGE: tl.constexpr, CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr,
                DROPOUT: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
                HAS_ALIBI: tl.constexpr, TMA: tl.constexpr):
    """k_ptr, v_ptr: the key head's rows, or (TMA) tensor descriptors over them; with TMA the
    loop is warp-specialized (Triton's producer/consumer warpgroups on Hopper)."""
    for start_n in tl.range(lo, hi, BLOCK_N, warp_specialize=TMA):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        kn = start_n + offs_n
        k = _load_block(k_ptr, start_n, kn, s_ks, k_len, offs_d, HEAD_DIM, BLOCK_D, TMA)
        s = _scores(q, k, offs_m, kn, q_len, k_len, KMASK, scale_log2, win_left, win_right, cap, slope,
                    ON_EDGE, CAUSAL, HAS_KMASK, WINDOW, SOFTCAP, HAS_ALIBI)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if ON_EDGE or HAS_KMASK:  # a row may have seen no key yet: keep exp2's argument finite
            m_new_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        else:
            m_new_safe = m_new
        alpha = tl.exp2(m_i - m_new_safe)
        p = tl.exp2(s - m_new_safe[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if DROPOUT:
            keep = _keep(seed, offs_m, start_n, seq_k, p_drop, BLOCK_N, False)
            p = tl.where(keep, p * (1.0 / (1.0 - p_drop)), 0.0)
        v = _load_block(v_ptr, start_n, kn, s_vs, k_len, offs_d, HEAD_DIM, BLOCK_D, TMA)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None])
        m_i = m_new
    return acc, m_i, l_i


@triton.jit(do_not_specialize=_PER_CALL)
def _attn_fwd(
    Q, K, V, O, LSE, KMASK, CU_Q, CU_K, ALIBI, SEED,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_os, s_oh,
    s_lb, s_lh, s_mb, s_ab,
    seq_q, seq_k, n_heads, group, scale_log2, seed, p_drop, win_left, win_right, cap, seq_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr,
    DROPOUT: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    TMA: tl.constexpr, SEED_PTR: tl.constexpr,
):
    pid_m = tl.program_id(0)
    seed = seed_of(seed, SEED, SEED_PTR)
    bh, b, h, hk, q0, q_len, k0, k_len = _query_program(CU_Q, CU_K, seq_q, seq_k, n_heads, group,
                                                        IS_VARLEN)
    if pid_m * BLOCK_M < q_len:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        q_ptr = _head(Q, b, q0, h, s_qb, s_qs, s_qh)
        k_ptr = _head(K, b, k0, hk, s_kb, s_ks, s_kh)
        v_ptr = _head(V, b, k0, hk, s_vb, s_vs, s_vh)
        if TMA:
            q_ptr = _rows_descriptor(q_ptr, q_len, s_qs, HEAD_DIM, BLOCK_M, BLOCK_D)
            k_ptr = _rows_descriptor(k_ptr, k_len, s_ks, HEAD_DIM, BLOCK_N, BLOCK_D)
            v_ptr = _rows_descriptor(v_ptr, k_len, s_vs, HEAD_DIM, BLOCK_N, BLOCK_D)
        kmask = KMASK + b * s_mb
        slope = _alibi_slope(ALIBI, b, h, s_ab, scale_log2, HAS_ALIBI)
        q = _load_block(q_ptr, pid_m * BLOCK_M, offs_m, s_qs, q_len, offs_d, HEAD_DIM, BLOCK_D,
                        TMA)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if WINDOW or TMA:
            # One loop, every block taking the edge tests: the blocks of a window's range, or
            # (TMA) every block up to the last visible key, as Triton's warp specializer takes
            # only a kernel's single loop (two in a row failed to compile, Triton 3.6 and 3.9).
            lo, hi = _one_loop_keys(pid_m, q_len, k_len, kmask, win_left, win_right, BLOCK_M,
                                    BLOCK_N, CAUSAL, HAS_KMASK, WINDOW)
            acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, k_ptr, v_ptr, s_ks, s_vs, lo, hi,
                                        offs_m, offs_n, offs_d, q_len, k_len, kmask, scale_log2,
                                        seed + bh, p_drop, seq_k, win_left, win_right, cap,
                                        slope, HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL,
                                        HAS_KMASK, DROPOUT, WINDOW, SOFTCAP, HAS_ALIBI, TMA)
        else:  # keys [0, full) need no bounds or causal test, [full, hi) do
            full, hi = _causal_split(pid_m, q_len, k_len, kmask, BLOCK_M, BLOCK_N, CAUSAL,
                                     HAS_KMASK)
            acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, k_ptr, v_ptr, s_ks, s_vs, 0, full,
                                        offs_m, offs_n, offs_d, q_len, k_len, kmask, scale_log2,
                                        seed + bh, p_drop, seq_k, win_left, win_right, cap,
                                        slope, HEAD_DIM, BLOCK_D, BLOCK_N, False, CAUSAL,
                                        HAS_KMASK, DROPOUT, False, SOFTCAP, HAS_ALIBI, False)
            acc, m_i, l_i = _fwd_blocks(acc, m_i, l_i, q, k_ptr, v_ptr, s_ks, s_vs, full, hi,
                                        offs_m, offs_n, offs_d, q_len, k_len, kmask, scale_log2,
                                        seed + bh, p_drop, seq_k, win_left, win_right, cap,
                                        slope, HEAD_DIM, BLOCK_D, BLOCK_N, True, CAUSAL,
                                        HAS_KMASK, DROPOUT, False, SOFTCAP, HAS_ALIBI, False)
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        o_ptr = _head(O, b, q0, h, s_ob, s_os, s_oh)
        if TMA:
            _rows_descriptor(o_ptr, q_len, s_os, HEAD_DIM, BLOCK_M, BLOCK_D).store(
                [pid_m * BLOCK_M, 0], out.to(O.dtype.element_ty))
        else:
            o_mask = _tile_mask(offs_m, q_len, offs_d, HEAD_DIM, BLOCK_D)
            tl.store(o_ptr + offs_m[:, None] * s_os + offs_d[None, :],
                     out.to(O.dtype.element_ty), mask=o_mask)
        l_ptr = LSE + b.to(tl.int64) * s_lb + h * s_lh + q0
        tl.store(l_ptr + offs_m, lse, mask=offs_m < q_len)


@triton.jit
def _dkdv_block(dk, dv, k, v, q_ptr, do_ptr, l_ptr, d_ptr, dq_ptr, s_qs, s_dos, s_dqs, start_m,
                start_n, offs_n, offs_m0, offs_d, key_ok, q_len, k_len, scale_log2, seed, p_drop, seq_k,
                win_left, win_right, cap, slope, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                ON_EDGE: tl.constexpr, CAUSAL: tl.constexpr, DROPOUT: tl.constexpr,
                WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                TMA: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """dK, dV of one key block updated with the query block at start_m, in the transposed form
    (keys x queries): P^T comes out of the mma as the next mma's operand, with no transpose in
    between. Query rows past the sequence load as zeros with lse = +inf, so their P is 0; keys
    past it or under the padding mask only touch their own rows of dK, dV, which the caller
    drops. q_ptr, do_ptr: the query head's rows, or (TMA) tensor descriptors over them.
    ATOMIC_DQ: also this block pair's share of dQ, dS K, added in fp32 to the query rows at
    dq_ptr (FlashAttention-2's backward: 5 matrix products a block pair, not 7); key_ok (keys
    in the sequence and under the mask) then zeroes the other keys' P, which would reach dQ."""
    offs_m = start_m + offs_m0
    q = _load_block(q_ptr, start_m, offs_m, s_qs, q_len, offs_d, HEAD_DIM, BLOCK_D, TMA)
    lse = tl.load(l_ptr + offs_m, mask=offs_m < q_len, other=float("inf"))
    capped_t = _raw_scores(tl.dot(k, tl.trans(q)), scale_log2, cap, SOFTCAP)
    s_t = capped_t
    if HAS_ALIBI:
        s_t = capped_t - _alibi_penalty(slope, offs_m[None, :], offs_n[:, None], q_len, k_len)
    p_t = tl.exp2(s_t - lse[None, :])
    if ATOMIC_DQ:  # (a key row past the sequence scores 0: its P may even be inf)
        p_t = tl.where(key_ok[:, None], p_t, 0.0)
    if ON_EDGE and CAUSAL:
        p_t = tl.where(offs_n[:, None] <= offs_m[None, :] + (k_len - q_len), p_t, 0.0)
    if WINDOW:
        p_t = tl.where(_in_window(offs_m[None, :], offs_n[:, None], q_len, k_len, win_left,
                                  win_right), p_t, 0.0)
    do = _load_block(do_ptr, start_m, offs_m, s_dos, q_len, offs_d, HEAD_DIM, BLOCK_D, TMA)
    delta = tl.load(d_ptr + offs_m, mask=offs_m < q_len, other=0.0)
    dp_t = tl.dot(v, tl.trans(do))
    if DROPOUT:
        keep = _keep(seed, offs_m, start_n, seq_k, p_drop, offs_n.shape[0], True)
        keep_scale = 1.0 / (1.0 - p_drop)  # a product per probability, not a division
        dv = tl.dot(tl.where(keep, p_t * keep_scale, 0.0).to(do.dtype), do, dv)
        dp_t = tl.where(keep, dp_t * keep_scale, 0.0)
    else:
        dv = tl.dot(p_t.to(do.dtype), do, dv)
    ds_t = p_t * (dp_t - delta[None, :])
    if SOFTCAP:  # tanh's derivative at the capped score, before ALiBi's bias
        ds_t = ds_t * _capped_grad(capped_t, cap)
    dk = tl.dot(ds_t.to(q.dtype), q, dk)
    if ATOMIC_DQ:
        dq = tl.dot(tl.trans(ds_t.to(k.dtype)), k)
        tl.atomic_add(dq_ptr + offs_m[:, None] * s_dqs + offs_d[None, :], dq,
                      mask=_tile_mask(offs_m, q_len, offs_d, HEAD_DIM, BLOCK_D), sem="relaxed")
    return dk, dv


@triton.jit
def _dkdv_blocks(dk, dv, k, v, q_ptr, do_ptr, l_ptr, d_ptr, dq_ptr, s_qs, s_dos, s_dqs, lo, hi,
                 start_n, offs_n, offs_m0, offs_d, key_ok, q_len, k_len, scale_log2, seed, p_drop, seq_k,
                 win_left, win_right, cap, slope, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
                 BLOCK_M: tl.constexpr, ON_EDGE: tl.constexpr, CAUSAL: tl.constexpr,
                 DROPOUT: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
                 HAS_ALIBI: tl.constexpr, TMA: tl.constexpr, ATOMIC_DQ: tl.constexpr):
    """dK, dV (and with ATOMIC_DQ, dQ's shares) of one key block over one query head's query
    blocks [lo, hi)."""
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        dk, dv = _dkdv_block(dk, dv, k, v, q_ptr, do_ptr, l_ptr, d_ptr, dq_ptr, s_qs, s_dos,
                             s_dqs, start_m, start_n, offs_n, offs_m0, offs_d, key_ok, q_len, k_len,
                             scale_log2, seed, p_drop, seq_k, win_left, win_right, cap, slope,
                             HEAD_DIM, BLOCK_D, ON_EDGE, CAUSAL, DROPOUT, WINDOW, SOFTCAP,
                             HAS_ALIBI, TMA, ATOMIC_DQ)
    return dk, dv


@triton.jit(do_not_specialize=_PER_CALL)
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, DQ_ACC, KMASK, CU_Q, CU_K, ALIBI, SEED,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_dob, s_dos, s_doh,
    s_dkb, s_dks, s_dkh, s_accb, s_accs, s_acch, s_lb, s_lh, s_mb, s_ab,
    seq_q, seq_k, n_heads, group, scale_log2, sm_scale, seed, p_drop, win_left, win_right, cap,
    seq_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr,
    DROPOUT: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    GROUPED: tl.constexpr, TMA: tl.constexpr, ATOMIC_DQ: tl.constexpr,
    SEED_PTR: tl.constexpr,
):
    """dK, dV of a block of BLOCK_N keys of one key head; with ATOMIC_DQ also every query row's
    dQ, summed in fp32 at DQ_ACC (zeroed by _attn_bwd_delta) in the order the programs reach
    it, so that the last bits of dQ vary from run to run."""
    pid_n = tl.program_id(0)
    seed = seed_of(seed, SEED, SEED_PTR)
    bhk = tl.program_id(1)
    n_kv_heads = n_heads // group
    b = bhk // n_kv_heads
    hk = bhk % n_kv_heads
    q0, q_len, k0, k_len = _seq_bounds(CU_Q, CU_K, b, seq_q, seq_k, IS_VARLEN)
    if pid_n * BLOCK_N < k_len:
        start_n = pid_n * BLOCK_N
        offs_n = start_n + tl.arange(0, BLOCK_N)
        offs_m0 = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        k = _load_rows(_head(K, b, k0, hk, s_kb, s_ks, s_kh), offs_n,
                       s_ks, k_len, offs_d, HEAD_DIM, BLOCK_D)
        v = _load_rows(_head(V, b, k0, hk, s_vb, s_vs, s_vh), offs_n,
                       s_vs, k_len, offs_d, HEAD_DIM, BLOCK_D)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        # The query blocks [lo, hi) that see this key block: under a window, those of its range;
        # causal, from the first diagonal one (those in [lo, full) see part of the key block, those
        # from `full` on all of it); a key block the padding mask hides entirely gets none.
        lo = 0
        full = 0
        hi = q_len
        if WINDOW:
            lo, hi = _window_queries(pid_n, q_len, k_len, win_left, win_right, BLOCK_M, BLOCK_N)
        elif CAUSAL:
            shift = k_len - q_len
            lo = tl.maximum(pid_n * BLOCK_N - shift, 0) // BLOCK_M * BLOCK_M
            full = tl.cdiv(tl.maximum((pid_n + 1) * BLOCK_N - 1 - shift, 0), BLOCK_M) * BLOCK_M
            full = tl.minimum(full, q_len)
        key_ok = offs_n < k_len
        if HAS_KMASK:
            key_ok = _key_mask(KMASK + b * s_mb, offs_n, k_len)
            hi = tl.where(tl.max(key_ok.to(tl.int32)) > 0, hi, 0)
        if GROUPED:
            # Every query head of the group, in one loop over (head, query block) pairs, every
            # block taking the causal test: a loop over heads around the query loops costs
            # registers that the pipelined inner loops then spill (benchmarks/kernel_facts.py:
            # 72-1920 bytes at head dim 128 on Triton 3.6).
            n_blocks = tl.cdiv(tl.maximum(hi - lo, 0), BLOCK_M)
            for t in range(0, group * n_blocks):
                h = hk * group + t // n_blocks
                start_m = tl.multiple_of(lo + t % n_blocks * BLOCK_M, BLOCK_M)
                dk, dv = _dkdv_block(
                    dk, dv, k, v, _head(Q, b, q0, h, s_qb, s_qs, s_qh),
                    _head(DO, b, q0, h, s_dob, s_dos, s_doh),
                    LSE + b.to(tl.int64) * s_lb + h * s_lh + q0,
                    DELTA + b.to(tl.int64) * s_lb + h * s_lh + q0,
                    _head(DQ_ACC, b, q0, h, s_accb, s_accs, s_acch), s_qs, s_dos, s_accs,
                    start_m, start_n, offs_n, offs_m0, offs_d, key_ok, q_len, k_len, scale_log2,
                    seed + b * n_heads + h, p_drop, seq_k, win_left, win_right, cap,
                    _alibi_slope(ALIBI, b, h, s_ab, scale_log2, HAS_ALIBI), HEAD_DIM, BLOCK_D,
                    True, CAUSAL, DROPOUT, WINDOW, SOFTCAP, HAS_ALIBI, False, ATOMIC_DQ)
        else:  # one query head: the diagonal blocks take the causal test, the others none
            h = hk
            q_ptr = _head(Q, b, q0, h, s_qb, s_qs, s_qh)
            do_ptr = _head(DO, b, q0, h, s_dob, s_dos, s_doh)
            if TMA:  # one head's rows: one descriptor each for the whole program
                q_ptr = _rows_descriptor(q_ptr, q_len, s_qs, HEAD_DIM, BLOCK_M, BLOCK_D)
                do_ptr = _rows_descriptor(do_ptr, q_len, s_dos, HEAD_DIM, BLOCK_M, BLOCK_D)
            l_ptr = LSE + b.to(tl.int64) * s_lb + h * s_lh + q0
            d_ptr = DELTA + b.to(tl.int64) * s_lb + h * s_lh + q0
            dq_ptr = _head(DQ_ACC, b, q0, h, s_accb, s_accs, s_acch)
            seed_h = seed + b * n_heads + h
            slope = _alibi_slope(ALIBI, b, h, s_ab, scale_log2, HAS_ALIBI)
            if WINDOW:  # every block of the window's range takes the edge tests
                dk, dv = _dkdv_blocks(dk, dv, k, v, q_ptr, do_ptr, l_ptr, d_ptr, dq_ptr, s_qs,
                                      s_dos, s_accs, lo, hi, start_n, offs_n, offs_m0, offs_d, key_ok,
                                      q_len, k_len, scale_log2, seed_h, p_drop, seq_k, win_left,
                                      win_right, cap, slope, HEAD_DIM, BLOCK_D, BLOCK_M, True,
                                      CAUSAL, DROPOUT, True, SOFTCAP, HAS_ALIBI, TMA, ATOMIC_DQ)
            else:
                if CAUSAL:
                    dk, dv = _dkdv_blocks(dk, dv, k, v, q_ptr, do_ptr, l_ptr, d_ptr, dq_ptr,
                                          s_qs, s_dos, s_accs, lo, tl.minimum(full, hi), start_n, offs_n,
                                          offs_m0, offs_d, key_ok, q_len, k_len, scale_log2,
                                          seed_h, p_drop, seq_k, win_left, win_right, cap, slope,
                                          HEAD_DIM, BLOCK_D, BLOCK_M, True, CAUSAL, DROPOUT,
                                          False, SOFTCAP, HAS_ALIBI, TMA, ATOMIC_DQ)
                dk, dv = _dkdv_blocks(dk, dv, k, v, q_ptr, do_ptr, l_ptr, d_ptr, dq_ptr, s_qs,
                                      s_dos, s_accs, full, hi, start_n, offs_n, offs_m0, offs_d, key_ok,
                                      q_len, k_len, scale_log2, seed_h, p_drop, seq_k, win_left,
                                      win_right, cap, slope, HEAD_DIM, BLOCK_D, BLOCK_M, False,
                                      CAUSAL, DROPOUT, False, SOFTCAP, HAS_ALIBI, TMA, ATOMIC_DQ)
        out_mask = _tile_mask(offs_n, k_len, offs_d, HEAD_DIM, BLOCK_D)
        if HAS_KMASK:  # a masked key gets no gradient (its rows above are meaningless)
            dk = tl.where(key_ok[:, None], dk, 0.0)
            dv = tl.where(key_ok[:, None], dv, 0.0)
        dk_off = (b.to(tl.int64) * s_dkb + k0.to(tl.int64) * s_dks + hk * s_dkh
                  + offs_n[:, None] * s_dks + offs_d[None, :])
        tl.store(DK + dk_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=out_mask)
        tl.store(DV + dk_off, dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _dq_blocks(dq, q, do, lse, delta, k_ptr, v_ptr, s_ks, s_vs, lo, hi, offs_m, offs_n0, offs_d,
               q_len, k_len, KMASK, scale_log2, seed, p_drop, seq_k, win_left, win_right, cap, slope,
               HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
               ON_EDGE: tl.constexpr, CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr,
               DROPOUT: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
               HAS_ALIBI: tl.constexpr, TMA: tl.constexpr):
    """k_ptr, v_ptr: the key head's rows, or (TMA) tensor descriptors over them, as in
    _fwd_blocks. Not warp-specialized: Triton's pass failed on this loop (3.6 and 3.9, an MLIR
    assertion), so the TMA copies run under the software pipeliner."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        kn = start_n + offs_n0
        k = _load_block(k_ptr, start_n, kn, s_ks, k_len, offs_d, HEAD_DIM, BLOCK_D, TMA)
        v = _load_block(v_ptr, start_n, kn, s_vs, k_len, offs_d, HEAD_DIM, BLOCK_D, TMA)
        s = _scores(q, k, offs_m, kn, q_len, k_len, KMASK, scale_log2, win_left, win_right, cap, slope,
                    ON_EDGE, CAUSAL, HAS_KMASK, WINDOW, SOFTCAP, HAS_ALIBI)
        p = tl.exp2(s - lse[:, None])
        dp = tl.dot(do, tl.trans(v))
        if DROPOUT:
            keep = _keep(seed, offs_m, start_n, seq_k, p_drop, BLOCK_N, False)
            dp = tl.where(keep, dp * (1.0 / (1.0 - p_drop)), 0.0)
        ds = p * (dp - delta[:, None])
        if SOFTCAP:  # tanh's derivative at the capped score, before ALiBi's bias
            capped = s
            if HAS_ALIBI:
                capped = s + _alibi_penalty(slope, offs_m[:, None], kn[None, :], q_len, k_len)
            ds = ds * _capped_grad(capped, cap)
        dq = tl.dot(ds.to(k.dtype), k, dq)
    return dq


@triton.jit(do_not_specialize=_PER_CALL)
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, O, KMASK, CU_Q, CU_K, ALIBI, SEED,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_dob, s_dos, s_doh,
    s_dqb, s_dqs, s_dqh, s_ob, s_os, s_oh, s_lb, s_lh, s_mb, s_ab,
    seq_q, seq_k, n_heads, group, scale_log2, sm_scale, seed, p_drop, win_left, win_right, cap,
    seq_bucket,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr,
    DROPOUT: tl.constexpr, WINDOW: tl.constexpr, SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
    TMA: tl.constexpr, SEED_PTR: tl.constexpr,
):
    pid_m = tl.program_id(0)
    seed = seed_of(seed, SEED, SEED_PTR)
    bh, b, h, hk, q0, q_len, k0, k_len = _query_program(CU_Q, CU_K, seq_q, seq_k, n_heads, group,
                                                        IS_VARLEN)
    if pid_m * BLOCK_M < q_len:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        q = _load_rows(_head(Q, b, q0, h, s_qb, s_qs, s_qh), offs_m,
                       s_qs, q_len, offs_d, HEAD_DIM, BLOCK_D)
        do = _load_rows(_head(DO, b, q0, h, s_dob, s_dos, s_doh), offs_m,
                        s_dos, q_len, offs_d, HEAD_DIM, BLOCK_D)
        o = _load_rows(_head(O, b, q0, h, s_ob, s_os, s_oh), offs_m,
                       s_os, q_len, offs_d, HEAD_DIM, BLOCK_D)
        l_off = b.to(tl.int64) * s_lb + h * s_lh + q0 + offs_m
        lse = tl.load(LSE + l_off, mask=offs_m < q_len, other=float("inf"))
        # delta = rowsum(dO * O), fp32: this block's rows, stored for the dK/dV launch after.
        delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
        tl.store(DELTA + l_off, delta, mask=offs_m < q_len)
        k_ptr = _head(K, b, k0, hk, s_kb, s_ks, s_kh)
        v_ptr = _head(V, b, k0, hk, s_vb, s_vs, s_vh)
        if TMA:
            k_ptr = _rows_descriptor(k_ptr, k_len, s_ks, HEAD_DIM, BLOCK_N, BLOCK_D)
            v_ptr = _rows_descriptor(v_ptr, k_len, s_vs, HEAD_DIM, BLOCK_N, BLOCK_D)
        kmask = KMASK + b * s_mb
        slope = _alibi_slope(ALIBI, b, h, s_ab, scale_log2, HAS_ALIBI)
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        if WINDOW or TMA:  # one loop, every block taking the edge tests (see _attn_fwd)
            lo, hi = _one_loop_keys(pid_m, q_len, k_len, kmask, win_left, win_right, BLOCK_M,
                                    BLOCK_N, CAUSAL, HAS_KMASK, WINDOW)
            dq = _dq_blocks(dq, q, do, lse, delta, k_ptr, v_ptr, s_ks, s_vs, lo, hi, offs_m,
                            offs_n0, offs_d, q_len, k_len, kmask, scale_log2, seed + bh, p_drop,
                            seq_k, win_left, win_right, cap, slope, HEAD_DIM, BLOCK_D, BLOCK_N,
                            True, CAUSAL, HAS_KMASK, DROPOUT, WINDOW, SOFTCAP, HAS_ALIBI, TMA)
        else:  # keys [0, full) need no bounds or causal test, [full, hi) do
            full, hi = _causal_split(pid_m, q_len, k_len, kmask, BLOCK_M, BLOCK_N, CAUSAL,
                                     HAS_KMASK)
            dq = _dq_blocks(dq, q, do, lse, delta, k_ptr, v_ptr, s_ks, s_vs, 0, full, offs_m,
                            offs_n0, offs_d, q_len, k_len, kmask, scale_log2, seed + bh, p_drop,
                            seq_k, win_left, win_right, cap, slope, HEAD_DIM, BLOCK_D, BLOCK_N,
                            False, CAUSAL, HAS_KMASK, DROPOUT, False, SOFTCAP, HAS_ALIBI, False)
            dq = _dq_blocks(dq, q, do, lse, delta, k_ptr, v_ptr, s_ks, s_vs, full, hi, offs_m,
                            offs_n0, offs_d, q_len, k_len, kmask, scale_log2, seed + bh, p_drop,
                            seq_k, win_left, win_right, cap, slope, HEAD_DIM, BLOCK_D, BLOCK_N,
                            True, CAUSAL, HAS_KMASK, DROPOUT, False, SOFTCAP, HAS_ALIBI, False)
        q_mask = _tile_mask(offs_m, q_len, offs_d, HEAD_DIM, BLOCK_D)
        dq_off = (b.to(tl.int64) * s_dqb + q0.to(tl.int64) * s_dqs + h * s_dqh
                  + offs_m[:, None] * s_dqs + offs_d[None, :])
        tl.store(DQ + dq_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit(do_not_specialize=["seq_q", "seq_k"])
def _attn_bwd_delta(
    O, DO, DELTA, DQ_ACC, CU_Q, CU_K,
    s_ob, s_os, s_oh, s_dob, s_dos, s_doh, s_accb, s_accs, s_acch, s_lb, s_lh,
    seq_q, seq_k, n_heads,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr,
    IS_VARLEN: tl.constexpr,
):
    """The atomic-dQ backward's first pass (the dQ kernel's preamble otherwise): delta =
    rowsum(dO * O) of BLOCK_M query rows of one head, fp32, for dK/dV, and the same rows of the
    dQ accumulator zeroed (no memset launch of its own)."""
    pid_m = tl.program_id(0)
    bh, b, h, hk, q0, q_len, k0, k_len = _query_program(CU_Q, CU_K, seq_q, seq_k, n_heads, 1,
                                                        IS_VARLEN)
    if pid_m * BLOCK_M < q_len:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        o = _load_rows(_head(O, b, q0, h, s_ob, s_os, s_oh), offs_m,
                       s_os, q_len, offs_d, HEAD_DIM, BLOCK_D)
        do = _load_rows(_head(DO, b, q0, h, s_dob, s_dos, s_doh), offs_m,
                        s_dos, q_len, offs_d, HEAD_DIM, BLOCK_D)
        l_off = b.to(tl.int64) * s_lb + h * s_lh + q0 + offs_m
        tl.store(DELTA + l_off, tl.sum(o.to(tl.float32) * do.to(tl.float32), 1),
                 mask=offs_m < q_len)
        acc = _head(DQ_ACC, b, q0, h, s_accb, s_accs, s_acch)
        tl.store(acc + offs_m[:, None] * s_accs + offs_d[None, :],
                 tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32),
                 mask=_tile_mask(offs_m, q_len, offs_d, HEAD_DIM, BLOCK_D))


@triton.jit
def _dropout_mask_kernel(OUT, seed, p_drop, seq_q, seq_k,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keep-mask the kernels draw for one (batch, head): exposed for tests."""
    bh = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    for start_n in range(0, seq_k, BLOCK_N):
        kn = start_n + tl.arange(0, BLOCK_N)
        keep = _keep(seed + bh, offs_m, start_n, seq_k, p_drop, BLOCK_N, False)
        tl.store(OUT + bh.to(tl.int64) * seq_q * seq_k + offs_m[:, None] * seq_k + kn[None, :],
                 keep.to(tl.int8), mask=(offs_m[:, None] < seq_q) & (kn[None, :] < seq_k))


# ---------------------------------------------------------------------------------------------
# Launchers. q, k, v, o, do: (batch, seq, heads, D) views with unit stride on D (any other
# strides), or packed (total, heads, D) with cu_seqlens (batch stride 0).

def _blocks(head_dim):
    """The pinned configuration: (BLOCK_D, block) used under the interpreter and when a caller
    asks for bitwise reproducibility across processes (autotuning may pick another config in
    another process, and block sizes change the fp32 summation order)."""
    block_d = max(next_power_of_2(head_dim), 16)
    block = 64 if block_d <= 64 else 32 if block_d <= 128 else 16
    return block_d, block


# On a GPU each kernel is autotuned once per class: head dim, mask kind, dropout, dtype and a
# sequence-length bucket (`seq_bucket`, a kernel argument only so that the autotuner can key on
# it: the best blocks for 512 keys need not be the best for 8192, and a choice outlives the
# process, see _CACHE_RESULTS). Configs that do not fit the device's shared memory are skipped by
# the autotuner. The forward and dQ walk keys for a block of queries (large BLOCK_M); dK/dV walk
# queries for a block of keys (large BLOCK_N).
_TUNE_KEY = ["HEAD_DIM", "IS_VARLEN", "CAUSAL", "HAS_KMASK", "DROPOUT", "WINDOW", "SOFTCAP",
             "HAS_ALIBI", "seq_bucket"]


def _seq_bucket(seq_q, seq_k):
    """The longer length rounded up to a power of two, within [128, 4096]: six buckets."""
    return min(max(next_power_of_2(max(seq_q, seq_k)), 128), 4096)


# Autotuning candidates, (BLOCK_M, BLOCK_N, warps, stages), per BLOCK_D (head dims up to 64,
# 128, 256). Drawn from benchmarks/tune_attention.py's sweeps (timings: benchmarks/results/
# 2026-11-23-h100-s2) among the configurations that compile for sm_90a without register spills
# on Triton 3.6 and 3.9 (benchmarks/kernel_facts.py; CI fails on a spill): a candidate that
# spills at one head dim is left out there, not everywhere. Short causal sequences need the
# forward's (128, 32, 4, 4). At d128 dK/dV, (64, 64, 8, 3) stands in for the sweep's winners
# (64, 64, 4, 2) and (64, 128, 8, 3), which spill: same query and key blocks, twice the warps
# (unmeasured). At head dim 256, dK/dV's one spill-free block (16 x 32, 4 warps)
# is too small for wgmma and runs on mma.sync: every larger one spills (its dK and dV
# accumulators alone, 2 x BLOCK_N x 256 fp32, fill a thread's registers).
CANDIDATES = {
    "fwd": {64: ((128, 64, 8, 4), (128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3),
                 (128, 32, 4, 4), (64, 64, 4, 3), (64, 32, 4, 2)),
            128: ((128, 64, 8, 4), (128, 64, 8, 3), (128, 128, 8, 3), (128, 32, 8, 3),
                  (128, 32, 4, 4), (64, 64, 4, 3), (64, 32, 4, 2)),
            256: ((128, 32, 8, 3), (64, 32, 4, 2))},
    "dkdv": {64: ((32, 128, 8, 3), (64, 64, 4, 3), (64, 128, 8, 3), (64, 64, 4, 2),
                  (32, 64, 4, 2)),
             128: ((32, 128, 8, 3), (64, 64, 8, 3), (32, 128, 8, 2), (32, 64, 4, 2),
                   (16, 64, 4, 3)),
             256: ((16, 32, 4, 2),)},
    # dK/dV with dQ's atomic shares (ATOMIC_DQ; FUSEDLM_TRITON_ATOMIC_DQ): dK/dV's blocks, less
    # those that spill with the extra product (64 x 64 at 3 stages on Triton 3.6, with TMA or a
    # window) or serialize its wgmma (32 x 128 with a window or grouped heads), plus 64 x 64 on
    # 8 warps and 64 x 32, the one block that neither spills nor serializes in any class the
    # models train in (its products with 32 keys run on mma.sync). At head dim 128 the one block
    # of 14 tried that does neither in any class, 64 x 32 on 8 warps (mostly mma.sync too); none
    # past 128, which keep the dQ kernel (benchmarks/results/kernel-facts/README.md).
    "dkdv_dq": {64: ((64, 128, 8, 3), (64, 64, 4, 2), (32, 64, 4, 2), (64, 64, 8, 2),
                     (64, 32, 4, 2)),
                128: ((64, 32, 8, 2),)},
    "dq": {64: ((128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 4, 3), (64, 32, 4, 3)),
           128: ((128, 64, 8, 3), (64, 64, 4, 3), (128, 32, 8, 3), (64, 32, 4, 3)),
           256: ((128, 32, 8, 3), (128, 32, 8, 2), (64, 32, 8, 2))},
}
# Candidates that spill (or serialize their wgmma) in a class of calls, compiled by
# kernel_facts.py on Triton 3.6 or 3.9: the flags that make the class (all of them on), and per
# kernel and head-dim class the blocks it leaves out. Dropout's Philox draws take registers;
# packed sequences (IS_VARLEN, fusedlm's BERT and packed batches) and a padding mask with dropout
# (Hugging Face's BERT patched) change the loops' bounds and loads.
SPILLS_IN_CLASS = (
    (("DROPOUT",), {
        "fwd": {64: ((128, 128, 8, 3), (128, 64, 4, 3)), 128: ((128, 128, 8, 3), (128, 32, 4, 4)),
                256: ((64, 32, 4, 2),)},
        "dkdv": {64: ((64, 64, 4, 3), (64, 128, 8, 3), (64, 64, 4, 2)),
                 128: ((32, 128, 8, 3), (64, 64, 8, 3), (32, 128, 8, 2), (32, 64, 4, 2))},
        "dkdv_dq": {64: ((64, 128, 8, 3), (64, 64, 4, 2))},
        # dQ joins four Philox words into the (queries x keys) tile (_keep): 24-80 bytes of
        # spill at these on Triton 3.6, 8-16 at (128, 32, 8, 2) on 3.9 (2026-12-01).
        "dq": {64: ((128, 32, 4, 3),), 128: ((128, 64, 8, 3), (64, 64, 4, 3)),
               256: ((64, 32, 8, 2), (128, 32, 8, 2))}}),
    (("IS_VARLEN",), {
        "fwd": {256: ((128, 32, 8, 3),)},
        "dkdv": {64: ((64, 64, 4, 3), (64, 128, 8, 3)), 128: ((64, 64, 8, 3),)},
        "dkdv_dq": {64: ((32, 64, 4, 2),)},
        "dq": {128: ((128, 64, 8, 3),)}}),
    (("IS_VARLEN", "DROPOUT"), {
        "dkdv_dq": {64: ((64, 64, 8, 2),)}}),
    (("HAS_KMASK", "DROPOUT"), {
        "fwd": {128: ((128, 64, 8, 4), (128, 64, 8, 3), (64, 64, 4, 3))},
        "dkdv_dq": {64: ((32, 64, 4, 2), (64, 64, 8, 2))},
        "dq": {64: ((128, 64, 8, 3), (64, 64, 4, 3)), 128: ((128, 64, 8, 3), (64, 64, 4, 3))}}),
)
# One triton.Config per distinct candidate: the autotuner holds them all and keeps, per call,
# those of the call's BLOCK_D and class (_candidates_of).
_CONFIG = {shape: triton.Config({"BLOCK_M": shape[0], "BLOCK_N": shape[1]}, num_warps=shape[2],
                                num_stages=shape[3])
           for by_dim in CANDIDATES.values() for shapes in by_dim.values() for shape in shapes}


def configs(name, block_d, **flags):
    """The spill-free autotuning candidates of kernel `name` ("fwd", "dkdv", "dq", "dkdv_dq") at
    BLOCK_D block_d for calls with these kernel flags (DROPOUT=True, IS_VARLEN=True, ...; the
    others off): CANDIDATES less the blocks of every SPILLS_IN_CLASS class the flags make. Empty
    where none is left (dkdv_dq past head dim 128)."""
    dims = CANDIDATES[name]
    fits = [d for d in dims if d >= block_d]
    if not fits:
        return []
    dim = min(fits)
    spill = {shape for needs, by_kernel in SPILLS_IN_CLASS if all(flags.get(f) for f in needs)
             for shape in by_kernel.get(name, {}).get(dim, ())}
    return [_CONFIG[shape] for shape in dims[dim] if shape not in spill]


def _all_configs(name):
    return list(dict.fromkeys(c for block_d in CANDIDATES[name] for c in configs(name, block_d)))


def _candidates_of(name):
    """The autotuner's early_config_prune: the candidates of the call's BLOCK_D and class; a
    class that spills at every candidate (the forward at head dim 256, packed with dropout) keeps
    them all."""
    def prune(all_configs, named_args, **kwargs):  # kwargs: the call's constexprs
        return configs(name, kwargs["BLOCK_D"], **kwargs) or configs(name, kwargs["BLOCK_D"])
    return prune


def _tuner(name, kernel, key, **options):
    return triton.autotune(_all_configs(name), key=key,
                           prune_configs_by={"early_config_prune": _candidates_of(name)},
                           **_CACHE_RESULTS, **options)(kernel)


_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
# The autotuner's choice per class is kept in Triton's cache directory (keyed by the GPU target,
# Triton's version, the kernel's source and the config list), so that a machine tunes a class
# once, not in every process (seconds a class). Triton before 3.4 has no such option and tunes in
# every process.
_CACHE_RESULTS = ({"cache_results": True}
                  if "cache_results" in inspect.signature(triton.autotune).parameters else {})


class Tuning:
    """The attention kernels' autotuners and the configuration each chose per class (the
    autotuner's key: kernel, dtype, flags, sequence-length bucket). A launcher asks the autotuner
    once per class and launches its choice directly afterwards: the autotuner's own look-up
    (dicts over ~30 arguments at every call) cost 23 us a launch on a 2-core CPU. A sweep that
    must tune again at every shape uses remember=False (benchmarks/tune_attention.py)."""

    def __init__(self, tuners, remember=True):
        self.tuners, self.remember, self.chosen = dict(tuners), remember, {}


# The launchers' tuning; replace it (not its parts) to tune with other configurations.
TUNING = Tuning({} if _INTERPRETED else {
    "fwd": _tuner("fwd", _attn_fwd, [*_TUNE_KEY, "TMA"]),
    "dkdv": _tuner("dkdv", _attn_bwd_dkdv, [*_TUNE_KEY, "GROUPED", "TMA"]),
    # Each timed run adds into the accumulator: zeroed before each, and before the chosen one.
    "dkdv_dq": _tuner("dkdv_dq", _attn_bwd_dkdv, [*_TUNE_KEY, "GROUPED", "TMA"],
                      reset_to_zero=["DQ_ACC"]),
    "dq": _tuner("dq", _attn_bwd_dq, [*_TUNE_KEY, "TMA"]),
})


def _pinned_config(name, block, blocks):
    if isinstance(blocks, dict) and blocks.get(name) is not None:
        return blocks[name]
    block_m, block_n = blocks if isinstance(blocks, tuple) else (block, block)
    # Stages chosen to compile without spills on Triton 3.6 and 3.9 (kernel_facts.py): at head
    # dim 128, 3.9 spilled dQ at one stage and dK/dV at two.
    return triton.Config({"BLOCK_M": block_m, "BLOCK_N": block_n}, num_warps=4,
                         num_stages=1 if name.startswith("dkdv") else 2)


def _launch(name, kernel, rows, grid_y, pinned, head_dim, bucket, args, flags, blocks=None,
            tuning=None):
    """Runs `kernel` (one program per block of `rows` along grid x), autotuned unless pinned;
    `bucket` (see _seq_bucket) is the kernel's last runtime argument.
    blocks: (BLOCK_M, BLOCK_N) to pin instead of the default (for tests of block edges), or
    {kernel name: triton.Config} to pin the named kernels' whole configuration (the others
    take the default pinned one). tuning: a Tuning (default TUNING)."""
    tuning = tuning or TUNING
    block_d, block = _blocks(head_dim)
    flags = dict(flags, HEAD_DIM=head_dim, BLOCK_D=block_d)
    args = (*args, bucket)
    along = "BLOCK_N" if name.startswith("dkdv") else "BLOCK_M"  # dkdv, dkdv_dq: key blocks
    if pinned or blocks is not None or name not in tuning.tuners:
        config = _pinned_config(name, block, blocks)
    else:
        # The class is the autotuner's key: the flags, the bucket and the tensors' dtypes, which
        # q's fixes.
        cls = (name, args[0].dtype, bucket, *flags.values())
        config = tuning.chosen.get(cls)
        if config is None:
            tuner = tuning.tuners[name]
            tuner[lambda meta: (cdiv(rows, meta[along]), grid_y)](*args, **flags)
            if tuning.remember:
                tuning.chosen[cls] = tuner.best_config
            return
    grid = (cdiv(rows, config.kwargs[along]), grid_y)
    kernel[grid](*args, **flags, **config.kwargs, num_warps=config.num_warps,
                 num_stages=config.num_stages)


# Hopper's paths in the three kernels: K and V (and the forward's Q, O; dK/dV's Q and dO, one
# query head a key head) through tensor descriptors, made on the device (TMA copies; rows past
# a sequence read as zeros), and the forward's key loop warp-specialized (a producer warpgroup
# feeding consumer ones). Opt-in,
# FUSEDLM_TRITON_TMA=1, until a GPU run has passed the suite with it and timed it against the
# default path (benchmarks/results/README.md); what it compiles to:
# benchmarks/results/kernel-facts/.
TMA = os.environ.get("FUSEDLM_TRITON_TMA", "0") == "1"

# FlashAttention-2's backward: the dK/dV kernel also adds each block pair's dS K into an fp32 dQ
# accumulator with atomics (5 matrix products a block pair instead of 7, no dQ kernel); a pass
# before it computes delta and zeroes the accumulator, a scale-and-cast after it writes dQ. The
# order of the additions varies, so dQ's last bits vary from run to run: never taken with
# deterministic=True (pinned), nor where it has no spill-free blocks (head dims over 128). Opt-in,
# FUSEDLM_TRITON_ATOMIC_DQ=1, until a GPU run has timed it against the dQ kernel
# (`fusedlm bench attention --impl "fusedlm[triton-atomic-dq]"`).
ATOMIC_DQ = os.environ.get("FUSEDLM_TRITON_ATOMIC_DQ", "0") == "1"
DELTA_BLOCK_M = 64  # rows a program of _attn_bwd_delta (bandwidth-bound: not tuned)


def _tma_ok(*tensors):
    """Can tensor descriptors cover these (batch, seq, heads, D) or packed (total, heads, D)
    tensors: a 16-byte aligned start, unit stride on D, every other stride and a row of D a
    multiple of 16 bytes (so that every head's and sequence's first row is aligned too)?"""
    for t in tensors:
        size = t.element_size()
        if (t.data_ptr() % 16 or t.stride(-1) != 1 or t.shape[-1] * size % 16
                or any(st * size % 16 for st in t.stride()[:-1])):
            return False
    return True


def _use_tma(q, *tensors):
    """Whether this call takes the TMA path (the forward, dQ and, with one query head a key head,
    dK/dV kernels): asked for, operands aligned for descriptors, a Hopper or later GPU (or the
    interpreter)."""
    if not (TMA and _tma_ok(q, *tensors)):
        return False
    if not _INTERPRETED:
        if not _has_tma(q.device):
            return False
        _set_tma_allocator()
    return True


def _has_tma(device):
    """Hopper (sm_90) or later: TMA copies and warpgroup register reallocation."""
    import torch
    return torch.cuda.get_device_capability(device)[0] >= 9


def _set_tma_allocator():
    """Descriptors made on the device need scratch memory from Triton's allocator hook: torch's
    caching allocator serves it (set once per process; it replaces any hook set before)."""
    global _ALLOCATOR_SET
    if not _ALLOCATOR_SET:
        import torch
        triton.set_allocator(lambda size, alignment, stream: torch.empty(size, dtype=torch.int8,
                                                                         device="cuda"))
        _ALLOCATOR_SET = True


_ALLOCATOR_SET = False


def _strides(t, varlen):
    s = t.stride()
    return (0, s[0], s[1]) if varlen else s[:3]  # packed (total, heads, D): no batch dimension


def _common(q, k, lse, key_mask, cu_q, varlen, max_q, max_k):
    n_heads, head_dim = q.shape[-2], q.shape[-1]
    group = n_heads // k.shape[-2]
    if varlen:
        batch, seq_q, seq_k = cu_q.numel() - 1, max_q, max_k
        s_lb, s_lh = 0, lse.stride(0)
    else:
        batch, seq_q, seq_k = q.shape[0], q.shape[1], k.shape[1]
        s_lb, s_lh = lse.stride(0), lse.stride(1)
    s_mb = key_mask.stride(0) if key_mask is not None else 0
    return batch, seq_q, seq_k, n_heads, head_dim, group, s_lb, s_lh, s_mb


def _window_bounds(window, causal, seq_q, seq_k):
    """(left, right) as the kernels take them: an unbounded side (-1) becomes a bound past every
    sequence, and causal bounds the right side at 0 (flash-attn's rule)."""
    if window is None:
        return 0, 0
    far = seq_q + seq_k + 1
    left, right = (far if w < 0 else w for w in window)
    return left, 0 if causal else right


def _alibi_stride(alibi):
    return alibi.stride(0) if alibi is not None and alibi.dim() == 2 else 0


def forward(q, k, v, o, lse, *, key_mask, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p,
            seed, window=None, softcap=0.0, alibi=None, pinned=False, blocks=None):
    """lse: (batch, heads, seq_q) fp32, or (heads, total_q) for packed input; log2 domain.
    window: None, or flash-attn's (left, right) sliding window (-1: unbounded side); softcap:
    > 0 caps the scaled scores at softcap * tanh(s / softcap) (0: off); alibi: None, or fp32
    slopes (heads,) or (batch, heads), contiguous in heads: -slope * |i + Sk - Sq - j| is
    added to the scaled scores.
    pinned: use the fixed block configuration instead of the autotuned one; blocks: pin this
    (BLOCK_M, BLOCK_N), or per kernel a triton.Config (see `_launch`)."""
    varlen = cu_q is not None
    batch, seq_q, seq_k, n_heads, head_dim, group, s_lb, s_lh, s_mb = _common(
        q, k, lse, key_mask, cu_q, varlen, max_q, max_k)
    if batch == 0 or seq_q == 0:
        return
    dummy = lse
    seed_t, seed, seed_ptr = seed_args(seed, dummy)
    args = (q, k, v, o, lse, key_mask if key_mask is not None else dummy,
            cu_q if varlen else dummy, cu_k if varlen else dummy,
            alibi if alibi is not None else dummy, seed_t,
            *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(o, varlen),
            s_lb, s_lh, s_mb, _alibi_stride(alibi), seq_q, seq_k, n_heads, group, scale * LOG2E, seed, dropout_p,
            *_window_bounds(window, causal, seq_q, seq_k), softcap * LOG2E)
    flags = dict(IS_VARLEN=varlen, CAUSAL=causal, HAS_KMASK=key_mask is not None,
                 DROPOUT=dropout_p > 0.0, WINDOW=window is not None, SOFTCAP=softcap > 0.0,
                 HAS_ALIBI=alibi is not None)
    tma = _use_tma(q, k, v, o)
    _launch("fwd", _attn_fwd, seq_q, batch * n_heads, pinned, head_dim, _seq_bucket(seq_q, seq_k),
            args, dict(flags, TMA=tma, SEED_PTR=seed_ptr), blocks)


def backward(q, k, v, o, do, lse, delta, dq, dk, dv, *, key_mask, cu_q, cu_k, max_q, max_k,
             causal, scale, dropout_p, seed, window=None, softcap=0.0, alibi=None, pinned=False,
             blocks=None, atomic_dq=False):
    """o: the forward's output; delta: fp32 scratch laid out as lse, where the dQ launch leaves
    rowsum(do * o) for the dK/dV launch after it (no launch of its own, no pass of its own over
    dO; with ATOMIC_DQ the delta pass leaves it). dq has q's shape; dk and dv k's shape and the
    same strides as each other (kv heads). atomic_dq: take the atomic-dQ backward where it
    serves (as ATOMIC_DQ does everywhere; never when pinned)."""
    varlen = cu_q is not None
    batch, seq_q, seq_k, n_heads, head_dim, group, s_lb, s_lh, s_mb = _common(
        q, k, lse, key_mask, cu_q, varlen, max_q, max_k)
    if batch == 0 or seq_k == 0 or seq_q == 0:  # no query sees a key: every gradient is 0
        dq.zero_()
        dk.zero_()
        dv.zero_()
        return
    dummy = lse
    seed_t, seed, seed_ptr = seed_args(seed, dummy)
    flags = dict(IS_VARLEN=varlen, CAUSAL=causal, HAS_KMASK=key_mask is not None,
                 DROPOUT=dropout_p > 0.0, WINDOW=window is not None, SOFTCAP=softcap > 0.0,
                 HAS_ALIBI=alibi is not None, SEED_PTR=seed_ptr)
    masks = (key_mask if key_mask is not None else dummy, cu_q if varlen else dummy,
             cu_k if varlen else dummy, alibi if alibi is not None else dummy, seed_t)
    strides = (*_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(do, varlen))
    scalars = (seq_q, seq_k, n_heads, group, scale * LOG2E, scale, seed, dropout_p,
               *_window_bounds(window, causal, seq_q, seq_k), softcap * LOG2E)
    n_kv_heads = k.shape[-2]
    bucket = _seq_bucket(seq_q, seq_k)
    tma = _use_tma(q, k, v)
    # dK/dV reads Q and dO through descriptors with one query head a key head (a grouped
    # program walks several heads' rows).
    tma_dkdv = tma and group == 1 and _tma_ok(do)
    dkdv_flags = dict(flags, GROUPED=group > 1, TMA=tma_dkdv)
    block_d = _blocks(head_dim)[0]
    # (Asked first: the default path pays nothing for the class check.)
    if (ATOMIC_DQ or atomic_dq) and not pinned and configs("dkdv_dq", block_d, **flags):
        import torch
        acc = torch.empty(q.shape, dtype=torch.float32, device=q.device)  # zeroed by the delta pass
        acc_strides = _strides(acc, varlen)
        _attn_bwd_delta[(cdiv(seq_q, DELTA_BLOCK_M), batch * n_heads)](
            o, do, delta, acc, masks[1], masks[2], *_strides(o, varlen), *_strides(do, varlen),
            *acc_strides, s_lb, s_lh, seq_q, seq_k, n_heads, HEAD_DIM=head_dim, BLOCK_D=block_d,
            BLOCK_M=DELTA_BLOCK_M, IS_VARLEN=varlen)
        _launch("dkdv_dq", _attn_bwd_dkdv, seq_k, batch * n_kv_heads, pinned, head_dim, bucket,
                (q, k, v, do, lse, delta, dk, dv, acc, *masks, *strides, *_strides(dk, varlen),
                 *acc_strides, s_lb, s_lh, s_mb, _alibi_stride(alibi), *scalars),
                dict(dkdv_flags, ATOMIC_DQ=True), blocks)
        torch.mul(acc, scale, out=dq)
        return
    # dQ first: it leaves delta for dK/dV.
    _launch("dq", _attn_bwd_dq, seq_q, batch * n_heads, pinned, head_dim, bucket,
            (q, k, v, do, lse, delta, dq, o, *masks, *strides, *_strides(dq, varlen),
             *_strides(o, varlen), s_lb, s_lh, s_mb, _alibi_stride(alibi), *scalars),
            dict(flags, TMA=tma), blocks)
    _launch("dkdv", _attn_bwd_dkdv, seq_k, batch * n_kv_heads, pinned, head_dim, bucket,
            (q, k, v, do, lse, delta, dk, dv, dummy, *masks, *strides, *_strides(dk, varlen),
             0, 0, 0, s_lb, s_lh, s_mb, _alibi_stride(alibi), *scalars),
            dict(dkdv_flags, ATOMIC_DQ=False), blocks)


def dropout_mask(out, seed, dropout_p):
    """out: (batch, heads, seq_q, seq_k) int8, contiguous; filled with the kernels' keep-mask."""
    bh, seq_q, seq_k = out.shape[0] * out.shape[1], out.shape[2], out.shape[3]
    _dropout_mask_kernel[(cdiv(seq_q, 32), bh)](
        out, seed, dropout_p, seq_q, seq_k, BLOCK_M=32, BLOCK_N=32)
