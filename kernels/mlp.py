"""The MLP's activation backward, with the activation recomputed (fusedlm.ops.mlp).

A transformer MLP, y = act(pre) @ W2^T + b2 with pre = x @ W1^T + b1, needs two (rows, F)
tensors in its backward: pre (for act') and A = act(pre) (for W2's gradient, dy^T A). The
forward keeps pre alone; from pre and dA (y's gradient through W2) one pass over the tile
writes A again, dpre = dA * act'(pre), and the column sums of dpre (b1's gradient) as one row
of partial sums per program, which layer norm's column-sum kernel adds up in a fixed order
(deterministic for a given grid). Unfused, that is an activation forward (read pre, write A)
beside the activation backward (read dA and pre, write dpre) and a column sum (read dpre).

GATED (Llama's SwiGLU, GeGLU): the MLP's hidden is A = act(pre) * up, up = x @ Wu^T + bu a
second projection. The forward keeps pre and up; one pass reads pre, up and dA and writes A,
dpre = dA * up * act'(pre) and dup = dA * act(pre), with both biases' partial sums. Unfused,
autograd keeps act(pre) and A as well and makes two passes more.

Math in fp32 from the inputs' dtype, results rounded once to it, as torch's gelu and
gelu_backward do: "gelu" is the exact erf form (BERT's), "gelu_tanh" the tanh approximation
(GPT-2's gelu_new), "relu" max(pre, 0) with gradient 0 at 0 (torch's), "silu" pre * sigmoid(pre)
(Llama's).
"""
import triton
import triton.language as tl

from ._host import cdiv
from .layer_norm import column_sum

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")  # ACT's values, in order
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
    elif ACT == 2:  # relu
        return tl.maximum(p, 0.0), tl.where(p > 0.0, 1.0, 0.0)
    else:  # silu: p * s, s = sigmoid(p); derivative s * (1 + p * (1 - s))
        sig = 1.0 / (1.0 + tl.exp(-p))
        return p * sig, sig * (1.0 + p * (1.0 - sig))


@triton.jit
def _act_bwd_kernel(
    PRE, UP, DA, A, DPRE, DUP, DB_PART, DBU_PART,
    stride_pre, stride_up, stride_da, stride_a, stride_dpre, stride_dup,
    n_rows, N, rows_per_program,
    ACT: tl.constexpr, GATED: tl.constexpr, STORE_A: tl.constexpr, HAS_DB: tl.constexpr,
    HAS_DBU: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < N
    row0 = pid_m * rows_per_program
    row_end = tl.minimum(row0 + rows_per_program, n_rows)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    dbu = tl.zeros([BLOCK_N], dtype=tl.float32)
    for r in range(row0, row_end, BLOCK_M):
        rows = r + tl.arange(0, BLOCK_M)
        m = (rows < row_end)[:, None] & cmask[None, :]
        rows = rows.to(tl.int64)[:, None]  # offsets past 2**31 elements
        p = tl.load(PRE + rows * stride_pre + cols[None, :], mask=m, other=0.0).to(tl.float32)
        da = tl.load(DA + rows * stride_da + cols[None, :], mask=m, other=0.0).to(tl.float32)
        a, g = _act_and_grad(p, ACT)
        if GATED:
            u = tl.load(UP + rows * stride_up + cols[None, :], mask=m, other=0.0).to(tl.float32)
            du = da * a
            dp = da * u * g
            a = a * u
            tl.store(DUP + rows * stride_dup + cols[None, :], du.to(DUP.dtype.element_ty), mask=m)
            if HAS_DBU:
                dbu += tl.sum(du, axis=0)
        else:
            dp = da * g
        if STORE_A:
            tl.store(A + rows * stride_a + cols[None, :], a.to(A.dtype.element_ty), mask=m)
        tl.store(DPRE + rows * stride_dpre + cols[None, :], dp.to(DPRE.dtype.element_ty), mask=m)
        if HAS_DB:  # masked elements loaded as 0 give dp = 0 (and du = 0)
            db += tl.sum(dp, axis=0)
    if HAS_DB:
        tl.store(DB_PART + pid_m * N + cols, db, mask=cmask)
    if HAS_DBU:
        tl.store(DBU_PART + pid_m * N + cols, dbu, mask=cmask)


def partial_rows(rows, n, sm_count):
    """Programs along the rows (the partial-sum buffer's height): about four programs an SM
    over the whole grid, each with whole tiles of rows."""
    along_columns = max(cdiv(n, BLOCK_N), 1)
    return max(1, min(cdiv(rows, BLOCK_M), cdiv(4 * sm_count, along_columns)))


def activation_backward(pre, da, a, dpre, db_part, dbias, activation, up=None, dup=None,
                        dbu_part=None, dbias_up=None):
    """pre, da, a, dpre: (rows, N) with unit column stride (a: None when A is not wanted; dpre
    may be da itself, written in place); db_part: (programs, N) fp32 scratch (`partial_rows`
    high) and dbias (N,) the bias's gradient, or both None. Gated: up and dup (rows, N) too (A
    is then act(pre) * up), and dbu_part, dbias_up for up's bias like db_part, dbias."""
    rows, n = pre.shape
    if n == 0:  # every output is empty
        return
    parts_of = db_part if db_part is not None else dbu_part
    # Without partial sums, no reason for long programs: four tiles each.
    programs = parts_of.shape[0] if parts_of is not None else max(cdiv(rows, 4 * BLOCK_M), 1)
    parts = 0  # rows of the partial buffers written
    if rows > 0:
        rows_per_program = cdiv(cdiv(rows, programs), BLOCK_M) * BLOCK_M
        grid = (cdiv(rows, rows_per_program), cdiv(n, BLOCK_N))
        gated = up is not None
        _act_bwd_kernel[grid](
            pre, up if gated else pre, da, a if a is not None else dpre, dpre,
            dup if gated else dpre, db_part if db_part is not None else dpre,
            dbu_part if dbu_part is not None else dpre,
            pre.stride(0), up.stride(0) if gated else 0, da.stride(0),
            a.stride(0) if a is not None else 0, dpre.stride(0), dup.stride(0) if gated else 0,
            rows, n, rows_per_program,
            ACT=ACTIVATIONS.index(activation), GATED=gated, STORE_A=a is not None,
            HAS_DB=db_part is not None, HAS_DBU=dbu_part is not None,
            BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, num_warps=4,
        )
        parts = grid[0]
    for part, out in ((db_part, dbias), (dbu_part, dbias_up)):
        if part is not None:
            column_sum(part, out, parts)
