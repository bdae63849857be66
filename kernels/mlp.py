"""The MLP's activation backward, with the activation recomputed (fusedlm.ops.mlp).

A transformer MLP, y = act(pre) @ W2^T + b2 with pre = x @ W1^T + b1, needs two (rows, F)
tensors in its backward: pre (for act') and A = act(pre) (for W2's gradient, dy^T A). The
forward keeps pre alone; from pre and dA (y's gradient through W2) one pass over the tile
writes A again, dpre = dA * act'(pre), and the column sums of dpre (b1's gradient) as one row
of partial sums per program, which layer norm's column-sum kernel adds up in a fixed order
(deterministic for a given grid). Unfused, that is an activation forward (read pre, write A)
beside the activation backward (read dA and pre, write dpre) and a column sum (read dpre).

Math in fp32 from the inputs' dtype, results rounded once to it, as torch's gelu and
gelu_backward do: "gelu" is the exact erf form (BERT's), "gelu_tanh" the tanh approximation
(GPT-2's gelu_new), "relu" max(pre, 0) with gradient 0 at 0 (torch's).
"""
import triton
import triton.language as tl

from ._host import cdiv
from .layer_norm import _column_sum_kernel

ACTIVATIONS = ("gelu", "gelu_tanh", "relu")  # ACT's values, in order
BLOCK_M = 16  # rows per tile (a program loops over its rows_per_program in tiles)
BLOCK_N = 256  # columns per program


@triton.jit
def _act_and_grad(p, ACT: tl.constexpr):
    """(act(p), act'(p)) in fp32."""
    if ACT == 0:  # exact GELU: p * Phi(p); derivative Phi(p) + p * phi(p)
        cdf = 0.5 * (1.0 + tl.erf(p * 0.7071067811865476))
        pdf = 0.3989422804014327 * tl.exp(-0.5 * p * p)
        return p * cdf, cdf + p * pdf
    elif ACT == 1:  # tanh GELU: 0.5 p (1 + tanh(u)), u = sqrt(2/pi) (p + 0.044715 p^3)
        u = 0.7978845608028654 * (p + 0.044715 * p * p * p)
        # tanh from exp: saturates to +-1 (exp's inf or 0) where a direct ratio would be nan.
        t = 1.0 - 2.0 / (tl.exp(2.0 * u) + 1.0)
        du = 0.7978845608028654 * (1.0 + 3.0 * 0.044715 * p * p)
        return 0.5 * p * (1.0 + t), 0.5 * (1.0 + t) + 0.5 * p * (1.0 - t * t) * du
    else:  # relu
        return tl.maximum(p, 0.0), tl.where(p > 0.0, 1.0, 0.0)


@triton.jit
def _act_bwd_kernel(
    PRE, DA, A, DPRE, DB_PART,
    stride_pre, stride_da, stride_a, stride_dpre,
    n_rows, N, rows_per_program,
    ACT: tl.constexpr, STORE_A: tl.constexpr, HAS_DB: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    row0 = pid_m * rows_per_program
    row_end = tl.minimum(row0 + rows_per_program, n_rows)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r in range(row0, row_end, BLOCK_M):
        rows = r + tl.arange(0, BLOCK_M)
        m = (rows < row_end)[:, None] & cmask[None, :]
        rows = rows.to(tl.int64)[:, None]  # offsets past 2**31 elements
        p = tl.load(PRE + rows * stride_pre + cols[None, :], mask=m, other=0.0).to(tl.float32)
        da = tl.load(DA + rows * stride_da + cols[None, :], mask=m, other=0.0).to(tl.float32)
        a, g = _act_and_grad(p, ACT)
        dp = da * g
        if STORE_A:
            tl.store(A + rows * stride_a + cols[None, :], a.to(A.dtype.element_ty), mask=m)
        tl.store(DPRE + rows * stride_dpre + cols[None, :], dp.to(DPRE.dtype.element_ty), mask=m)
        if HAS_DB:  # masked elements loaded as 0 give dp = 0
            db += tl.sum(dp, axis=0)
    if HAS_DB:
        tl.store(DB_PART + pid_m * N + cols, db, mask=cmask)


def partial_rows(rows, n, sm_count):
    """Programs along the rows (the partial-sum buffer's height): about four programs an SM
    over the whole grid, each with whole tiles of rows."""
    along_columns = cdiv(n, BLOCK_N)
    return max(1, min(cdiv(rows, BLOCK_M), cdiv(4 * sm_count, along_columns)))


def activation_backward(pre, da, a, dpre, db_part, dbias, activation):
    """pre, da, a, dpre: (rows, N) with unit column stride (a: None when A is not wanted; dpre
    may be da itself, written in place); db_part: (programs, N) fp32 scratch (`partial_rows`
    high) and dbias (N,) the bias's gradient, or both None."""
    rows, n = pre.shape
    # Without partial sums, no reason for long programs: four tiles each.
    programs = db_part.shape[0] if db_part is not None else max(cdiv(rows, 4 * BLOCK_M), 1)
    parts = 0  # rows of db_part written
    if rows > 0:
        rows_per_program = cdiv(cdiv(rows, programs), BLOCK_M) * BLOCK_M
        grid = (cdiv(rows, rows_per_program), cdiv(n, BLOCK_N))
        _act_bwd_kernel[grid](
            pre, da, a if a is not None else dpre, dpre, db_part if db_part is not None else dpre,
            pre.stride(0), da.stride(0), a.stride(0) if a is not None else 0, dpre.stride(0),
            rows, n, rows_per_program,
            ACT=ACTIVATIONS.index(activation), STORE_A=a is not None, HAS_DB=db_part is not None,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=4,
        )
        parts = grid[0]
    if db_part is not None:
        block_c = 64
        _column_sum_kernel[(cdiv(n, block_c),)](
            db_part, dbias, parts, n, BLOCK_P=32, BLOCK_C=block_c, num_warps=4)
