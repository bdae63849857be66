"""Flash attention forward and backward: dense batches (with an optional key-padding mask) and
packed variable-length batches, causal or not, grouped-query heads, dropout.

Forward: one program per (block of BLOCK_M queries, batch, query head). It streams key/value
blocks, keeping a running max m and sum l of the softmax in fp32 (base 2: scores are scaled by
softmax_scale * log2(e) so exp2 serves), and stores the output and the log-sum-exp per query
(log2 domain; +inf for a query that sees no key, so that its probabilities recompute as 0 and
its output is 0, never NaN).

Backward, deterministic by construction (no atomics): `_attn_bwd_dkdv` owns a block of keys of
one key head and loops over every query head of its group and every query block, accumulating
dK and dV in registers; `_attn_bwd_dq` owns a block of queries and loops over the keys. Both
recompute P = exp2(S - lse) from the saved log-sum-exp: no sequence x sequence matrix is stored.

Masks: causal is aligned bottom-right (query i sees key j iff j <= i + Sk - Sq); the key mask
(batch, Sk) marks keys to attend with nonzero; a packed batch gives each sequence's rows through
cu_seqlens, so no work is spent on padding. Dropout keeps a probability when a Philox draw
(seed + batch * heads + head, offset query * Sk + key) is >= p, and scales it by 1/(1 - p); the
backward regenerates the same draws.
"""
import os

import triton
import triton.language as tl

LOG2E = 1.4426950408889634


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
def _scores(q, k, offs_m, offs_n, q_len, k_len, KMASK, scale_log2,
            CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr):
    """Scores in the log2 domain with -inf where a key may not be attended."""
    s = tl.dot(q, tl.trans(k)) * scale_log2
    valid = (offs_n[None, :] < k_len) & (offs_m[:, None] < q_len)
    if CAUSAL:
        valid = valid & (offs_n[None, :] <= offs_m[:, None] + (k_len - q_len))
    if HAS_KMASK:
        km = tl.load(KMASK + offs_n, mask=offs_n < k_len, other=0)
        valid = valid & (km != 0)[None, :]
    return tl.where(valid, s, float("-inf"))


@triton.jit
def _keep(seed, offs_m, offs_n, seq_k_rng, p_drop):
    return tl.rand(seed, offs_m[:, None] * seq_k_rng + offs_n[None, :]) >= p_drop


@triton.jit
def _attn_fwd(
    Q, K, V, O, LSE, KMASK, CU_Q, CU_K,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_os, s_oh,
    s_lb, s_lh, s_mb,
    seq_q, seq_k, n_heads, group, scale_log2, seed, p_drop, seq_k_rng,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    hk = h // group
    q0, q_len, k0, k_len = _seq_bounds(CU_Q, CU_K, b, seq_q, seq_k, IS_VARLEN)
    if pid_m * BLOCK_M < q_len:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d[None, :] < HEAD_DIM
        q_ptr = Q + b.to(tl.int64) * s_qb + q0.to(tl.int64) * s_qs + h * s_qh
        k_ptr = K + b.to(tl.int64) * s_kb + k0.to(tl.int64) * s_ks + hk * s_kh
        v_ptr = V + b.to(tl.int64) * s_vb + k0.to(tl.int64) * s_vs + hk * s_vh
        q = tl.load(q_ptr + offs_m[:, None] * s_qs + offs_d[None, :],
                    mask=(offs_m[:, None] < q_len) & d_ok, other=0.0)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        hi = k_len
        if CAUSAL:  # keys past the block's last query (shifted bottom-right) are never seen
            hi = tl.minimum(k_len, tl.maximum((pid_m + 1) * BLOCK_M + k_len - q_len, 0))
        for start_n in range(0, hi, BLOCK_N):
            kn = start_n + offs_n
            kv_mask = (kn[:, None] < k_len) & d_ok
            k = tl.load(k_ptr + kn[:, None] * s_ks + offs_d[None, :], mask=kv_mask, other=0.0)
            s = _scores(q, k, offs_m, kn, q_len, k_len, KMASK + b * s_mb, scale_log2,
                        CAUSAL, HAS_KMASK)
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            if DROPOUT:
                keep = _keep(seed + bh, offs_m, kn, seq_k_rng, p_drop)
                p = tl.where(keep, p / (1.0 - p_drop), 0.0)
            v = tl.load(v_ptr + kn[:, None] * s_vs + offs_d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v)
            m_i = m_new
        empty = l_i == 0.0
        out = acc / tl.where(empty, 1.0, l_i)[:, None]
        lse = tl.where(empty, float("inf"), m_i + tl.log2(tl.where(empty, 1.0, l_i)))
        o_ptr = O + b.to(tl.int64) * s_ob + q0.to(tl.int64) * s_os + h * s_oh
        tl.store(o_ptr + offs_m[:, None] * s_os + offs_d[None, :], out.to(O.dtype.element_ty),
                 mask=(offs_m[:, None] < q_len) & d_ok)
        l_ptr = LSE + b.to(tl.int64) * s_lb + h * s_lh + q0
        tl.store(l_ptr + offs_m, lse, mask=offs_m < q_len)


@triton.jit
def _attn_bwd_dkdv(
    Q, K, V, DO, LSE, DELTA, DK, DV, KMASK, CU_Q, CU_K,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_os, s_oh,
    s_dkb, s_dks, s_dkh, s_lb, s_lh, s_mb,
    seq_q, seq_k, n_heads, group, scale_log2, sm_scale, seed, p_drop, seq_k_rng,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    pid_n = tl.program_id(0)
    bhk = tl.program_id(1)
    n_kv_heads = n_heads // group
    b = bhk // n_kv_heads
    hk = bhk % n_kv_heads
    q0, q_len, k0, k_len = _seq_bounds(CU_Q, CU_K, b, seq_q, seq_k, IS_VARLEN)
    if pid_n * BLOCK_N < k_len:
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_m0 = tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d[None, :] < HEAD_DIM
        kv_mask = (offs_n[:, None] < k_len) & d_ok
        k = tl.load(K + b.to(tl.int64) * s_kb + k0.to(tl.int64) * s_ks + hk * s_kh
                    + offs_n[:, None] * s_ks + offs_d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(V + b.to(tl.int64) * s_vb + k0.to(tl.int64) * s_vs + hk * s_vh
                    + offs_n[:, None] * s_vs + offs_d[None, :], mask=kv_mask, other=0.0)
        dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
        lo = 0
        if CAUSAL:  # queries before this block's first key (shifted) never see it
            lo = tl.maximum(pid_n * BLOCK_N - (k_len - q_len), 0) // BLOCK_M * BLOCK_M
        for g in range(0, group):
            h = hk * group + g
            q_ptr = Q + b.to(tl.int64) * s_qb + q0.to(tl.int64) * s_qs + h * s_qh
            do_ptr = DO + b.to(tl.int64) * s_ob + q0.to(tl.int64) * s_os + h * s_oh
            l_ptr = LSE + b.to(tl.int64) * s_lb + h * s_lh + q0
            d_ptr = DELTA + b.to(tl.int64) * s_lb + h * s_lh + q0
            for start_m in range(lo, q_len, BLOCK_M):
                offs_m = start_m + offs_m0
                q_mask = (offs_m[:, None] < q_len) & d_ok
                q = tl.load(q_ptr + offs_m[:, None] * s_qs + offs_d[None, :], mask=q_mask, other=0.0)
                do = tl.load(do_ptr + offs_m[:, None] * s_os + offs_d[None, :], mask=q_mask, other=0.0)
                lse = tl.load(l_ptr + offs_m, mask=offs_m < q_len, other=float("inf"))
                delta = tl.load(d_ptr + offs_m, mask=offs_m < q_len, other=0.0)
                s = _scores(q, k, offs_m, offs_n, q_len, k_len, KMASK + b * s_mb, scale_log2,
                            CAUSAL, HAS_KMASK)
                p = tl.exp2(s - lse[:, None])
                dp = tl.dot(do, tl.trans(v))
                if DROPOUT:
                    keep = _keep(seed + b * n_heads + h, offs_m, offs_n, seq_k_rng, p_drop)
                    p_kept = tl.where(keep, p / (1.0 - p_drop), 0.0)
                    dp = tl.where(keep, dp / (1.0 - p_drop), 0.0)
                else:
                    p_kept = p
                dv += tl.dot(tl.trans(p_kept.to(do.dtype)), do)
                ds = p * (dp - delta[:, None])
                dk += tl.dot(tl.trans(ds.to(q.dtype)), q)
        out_mask = (offs_n[:, None] < k_len) & d_ok
        dk_off = b.to(tl.int64) * s_dkb + k0.to(tl.int64) * s_dks + hk * s_dkh + offs_n[:, None] * s_dks + offs_d[None, :]
        tl.store(DK + dk_off, (dk * sm_scale).to(DK.dtype.element_ty), mask=out_mask)
        tl.store(DV + dk_off, dv.to(DV.dtype.element_ty), mask=out_mask)


@triton.jit
def _attn_bwd_dq(
    Q, K, V, DO, LSE, DELTA, DQ, KMASK, CU_Q, CU_K,
    s_qb, s_qs, s_qh, s_kb, s_ks, s_kh, s_vb, s_vs, s_vh, s_ob, s_os, s_oh,
    s_dqb, s_dqs, s_dqh, s_lb, s_lh, s_mb,
    seq_q, seq_k, n_heads, group, scale_log2, sm_scale, seed, p_drop, seq_k_rng,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    IS_VARLEN: tl.constexpr, CAUSAL: tl.constexpr, HAS_KMASK: tl.constexpr,
    DROPOUT: tl.constexpr,
):
    pid_m = tl.program_id(0)
    bh = tl.program_id(1)
    b = bh // n_heads
    h = bh % n_heads
    hk = h // group
    q0, q_len, k0, k_len = _seq_bounds(CU_Q, CU_K, b, seq_q, seq_k, IS_VARLEN)
    if pid_m * BLOCK_M < q_len:
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n0 = tl.arange(0, BLOCK_N)
        offs_d = tl.arange(0, BLOCK_D)
        d_ok = offs_d[None, :] < HEAD_DIM
        q_mask = (offs_m[:, None] < q_len) & d_ok
        q_off = b.to(tl.int64) * s_qb + q0.to(tl.int64) * s_qs + h * s_qh + offs_m[:, None] * s_qs + offs_d[None, :]
        q = tl.load(Q + q_off, mask=q_mask, other=0.0)
        do = tl.load(DO + b.to(tl.int64) * s_ob + q0.to(tl.int64) * s_os + h * s_oh
                     + offs_m[:, None] * s_os + offs_d[None, :], mask=q_mask, other=0.0)
        l_off = b.to(tl.int64) * s_lb + h * s_lh + q0 + offs_m
        lse = tl.load(LSE + l_off, mask=offs_m < q_len, other=float("inf"))
        delta = tl.load(DELTA + l_off, mask=offs_m < q_len, other=0.0)
        k_ptr = K + b.to(tl.int64) * s_kb + k0.to(tl.int64) * s_ks + hk * s_kh
        v_ptr = V + b.to(tl.int64) * s_vb + k0.to(tl.int64) * s_vs + hk * s_vh
        dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
        hi = k_len
        if CAUSAL:
            hi = tl.minimum(k_len, tl.maximum((pid_m + 1) * BLOCK_M + k_len - q_len, 0))
        for start_n in range(0, hi, BLOCK_N):
            kn = start_n + offs_n0
            kv_mask = (kn[:, None] < k_len) & d_ok
            k = tl.load(k_ptr + kn[:, None] * s_ks + offs_d[None, :], mask=kv_mask, other=0.0)
            v = tl.load(v_ptr + kn[:, None] * s_vs + offs_d[None, :], mask=kv_mask, other=0.0)
            s = _scores(q, k, offs_m, kn, q_len, k_len, KMASK + b * s_mb, scale_log2,
                        CAUSAL, HAS_KMASK)
            p = tl.exp2(s - lse[:, None])
            dp = tl.dot(do, tl.trans(v))
            if DROPOUT:
                keep = _keep(seed + bh, offs_m, kn, seq_k_rng, p_drop)
                dp = tl.where(keep, dp / (1.0 - p_drop), 0.0)
            ds = p * (dp - delta[:, None])
            dq += tl.dot(ds.to(k.dtype), k)
        dq_off = (b.to(tl.int64) * s_dqb + q0.to(tl.int64) * s_dqs + h * s_dqh
                  + offs_m[:, None] * s_dqs + offs_d[None, :])
        tl.store(DQ + dq_off, (dq * sm_scale).to(DQ.dtype.element_ty), mask=q_mask)


@triton.jit
def _dropout_mask_kernel(OUT, seed, p_drop, seq_q, seq_k, seq_k_rng,
                         BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """The keep-mask the kernels draw for one (batch, head): exposed for tests."""
    bh = tl.program_id(1)
    offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    for start_n in range(0, seq_k, BLOCK_N):
        kn = start_n + tl.arange(0, BLOCK_N)
        keep = _keep(seed + bh, offs_m, kn, seq_k_rng, p_drop)
        tl.store(OUT + bh.to(tl.int64) * seq_q * seq_k + offs_m[:, None] * seq_k + kn[None, :],
                 keep.to(tl.int8), mask=(offs_m[:, None] < seq_q) & (kn[None, :] < seq_k))


# ---------------------------------------------------------------------------------------------
# Launchers. q, k, v, o, do: (batch, seq, heads, D) views with unit stride on D (any other
# strides), or packed (total, heads, D) with cu_seqlens (batch stride 0).

def _blocks(head_dim):
    """The pinned configuration: (BLOCK_D, block) used under the interpreter and when a caller
    asks for bitwise reproducibility across processes (autotuning may pick another config in
    another process, and block sizes change the fp32 summation order)."""
    block_d = max(triton.next_power_of_2(head_dim), 16)
    block = 64 if block_d <= 64 else 32 if block_d <= 128 else 16
    return block_d, block


# On a GPU each kernel is autotuned once per (head dim, mask kind, dropout) class; configs that
# do not fit the device's shared memory are skipped by the autotuner.
_TUNE_KEY = ["HEAD_DIM", "IS_VARLEN", "CAUSAL", "HAS_KMASK", "DROPOUT"]
_FWD_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
                for m, n, w, st in ((128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 3),
                                    (64, 64, 4, 3), (64, 32, 4, 2), (32, 32, 4, 1))]
_BWD_CONFIGS = [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=st)
                for m, n, w, st in ((64, 64, 4, 2), (32, 64, 4, 2), (64, 128, 8, 2),
                                    (128, 64, 8, 2), (32, 32, 4, 1))]
_INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
_TUNED = {} if _INTERPRETED else {
    "fwd": triton.autotune(_FWD_CONFIGS, key=_TUNE_KEY)(_attn_fwd),
    "dkdv": triton.autotune(_BWD_CONFIGS, key=_TUNE_KEY)(_attn_bwd_dkdv),
    "dq": triton.autotune(_BWD_CONFIGS, key=_TUNE_KEY)(_attn_bwd_dq),
}


def _launch(name, kernel, rows, grid_y, pinned, head_dim, args, flags):
    """Runs `kernel` (one program per block of `rows` along grid x), autotuned unless pinned."""
    block_d, block = _blocks(head_dim)
    flags = dict(flags, HEAD_DIM=head_dim, BLOCK_D=block_d)
    if pinned or name not in _TUNED:
        kernel[(triton.cdiv(rows, block), grid_y)](*args, **flags, BLOCK_M=block, BLOCK_N=block,
                                                   num_warps=4, num_stages=1 if name != "fwd" else 2)
    else:
        along = "BLOCK_N" if name == "dkdv" else "BLOCK_M"
        _TUNED[name][lambda meta: (triton.cdiv(rows, meta[along]), grid_y)](*args, **flags)


def _strides(t, varlen):
    if varlen:  # (total, heads, D): no batch dimension
        return 0, t.stride(0), t.stride(1)
    return t.stride(0), t.stride(1), t.stride(2)


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


def forward(q, k, v, o, lse, *, key_mask, cu_q, cu_k, max_q, max_k, causal, scale, dropout_p,
            seed, pinned=False):
    """lse: (batch, heads, seq_q) fp32, or (heads, total_q) for packed input; log2 domain.
    pinned: use the fixed block configuration instead of the autotuned one."""
    varlen = cu_q is not None
    batch, seq_q, seq_k, n_heads, head_dim, group, s_lb, s_lh, s_mb = _common(
        q, k, lse, key_mask, cu_q, varlen, max_q, max_k)
    if batch == 0 or seq_q == 0:
        return
    dummy = lse
    args = (q, k, v, o, lse, key_mask if key_mask is not None else dummy,
            cu_q if varlen else dummy, cu_k if varlen else dummy,
            *_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(o, varlen),
            s_lb, s_lh, s_mb, seq_q, seq_k, n_heads, group, scale * LOG2E, seed, dropout_p, seq_k)
    flags = dict(IS_VARLEN=varlen, CAUSAL=causal, HAS_KMASK=key_mask is not None,
                 DROPOUT=dropout_p > 0.0)
    _launch("fwd", _attn_fwd, seq_q, batch * n_heads, pinned, head_dim, args, flags)


def backward(q, k, v, do, lse, delta, dq, dk, dv, *, key_mask, cu_q, cu_k, max_q, max_k,
             causal, scale, dropout_p, seed, pinned=False):
    """delta: rowsum(do * o) laid out as lse. dq has q's shape; dk and dv k's shape and the
    same strides as each other (kv heads)."""
    varlen = cu_q is not None
    batch, seq_q, seq_k, n_heads, head_dim, group, s_lb, s_lh, s_mb = _common(
        q, k, lse, key_mask, cu_q, varlen, max_q, max_k)
    if batch == 0 or seq_k == 0 or seq_q == 0:
        dk.zero_()
        dv.zero_()
        return
    dummy = lse
    flags = dict(IS_VARLEN=varlen, CAUSAL=causal, HAS_KMASK=key_mask is not None,
                 DROPOUT=dropout_p > 0.0)
    masks = (key_mask if key_mask is not None else dummy, cu_q if varlen else dummy,
             cu_k if varlen else dummy)
    strides = (*_strides(q, varlen), *_strides(k, varlen), *_strides(v, varlen), *_strides(do, varlen))
    scalars = (seq_q, seq_k, n_heads, group, scale * LOG2E, scale, seed, dropout_p, seq_k)
    n_kv_heads = k.shape[-2]
    _launch("dkdv", _attn_bwd_dkdv, seq_k, batch * n_kv_heads, pinned, head_dim,
            (q, k, v, do, lse, delta, dk, dv, *masks, *strides, *_strides(dk, varlen),
             s_lb, s_lh, s_mb, *scalars), flags)
    _launch("dq", _attn_bwd_dq, seq_q, batch * n_heads, pinned, head_dim,
            (q, k, v, do, lse, delta, dq, *masks, *strides, *_strides(dq, varlen), s_lb, s_lh,
             s_mb, *scalars), flags)


def dropout_mask(out, seed, dropout_p):
    """out: (batch, heads, seq_q, seq_k) int8, contiguous; filled with the kernels' keep-mask."""
    bh, seq_q, seq_k = out.shape[0] * out.shape[1], out.shape[2], out.shape[3]
    _dropout_mask_kernel[(triton.cdiv(seq_q, 32), bh)](
        out, seed, dropout_p, seq_q, seq_k, seq_k, BLOCK_M=32, BLOCK_N=32)
