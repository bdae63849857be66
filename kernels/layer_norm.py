"""Layer norm and RMSNorm over the last dimension, with an optional fused residual add.

Forward:  z = x + residual (rounded to x's dtype, as the unfused `x + residual` would be)
          y = (z - mean) * rstd * w + b          (RMSNorm: y = z * rstd * w, no mean)
With DROPOUT, x is dropped out first (z = dropout(x) + residual, each kept element scaled by
1 / (1 - p)): the keep-mask comes from Philox draws at the call's seed, four columns a draw
(`_kept`), drawn again by the backward, never stored. The seed is a scalar argument,
or (SEED_PTR, under torch.compile) read from a one-element device tensor, so that a compiled
step draws it on the device and a CUDA graph replays a new draw each step.
Statistics are fp32 and the row is held in registers, so a row is read once and written once.

Backward: one program owns a contiguous block of rows; it writes dz for each row (with
DROPOUT also dx = dz * keep / (1 - p), x's gradient, dz staying the residual's) and keeps the
row-sums of dy * xhat (dweight) and dy (dbias) in fp32 registers, which it stores as one row of
a (programs, N) partial buffer. A second kernel sums that buffer column by column in a fixed
order, so dweight and dbias are deterministic for a given grid.
"""
import triton
import triton.language as tl

from ._dropout import seed_args, seed_of
from ._host import cdiv, next_power_of_2

# A row lives in registers: past this many columns the kernels would spill heavily.
MAX_COLUMNS = 65536


@triton.jit
def _kept(seed, p_drop, row, N, BLOCK_N: tl.constexpr):
    """The dropout keep-mask of a row's BLOCK_N columns. One Philox draw gives four 32-bit words:
    column c of the row takes word c % 4 of the draw at counter row * ceil(N / 4) + c // 4
    (row: an int64 scalar, so that the counter does not wrap), kept when the word is at least
    p * 2^32 (dropped with probability p to within 2^-32): a quarter of the draws of one per
    element, which made a dropout call issue-bound on the draws."""
    counter = row * ((N + 3) // 4) + tl.arange(0, BLOCK_N // 4)
    r0, r1, r2, r3 = tl.randint4x(seed, counter)
    least = (tl.cast(p_drop, tl.float32) * 4294967296.0).to(tl.uint32)  # p as fp32, as compiled
    # [g, a, b]: word 2a + b of group g
    words = tl.join(tl.join(r0 >= least, r2 >= least), tl.join(r1 >= least, r3 >= least))
    return tl.reshape(words, (BLOCK_N,))


# The seed changes at every call: not specialized on (a variant per value class mid-run).
@triton.jit(do_not_specialize=["seed"])
def _norm_fwd_kernel(
    X, RES, W, B, Y, Z, MEAN, RSTD, SEED,
    stride_x, stride_res, stride_y, stride_z,
    N, eps, seed, p_drop, drop_scale,
    IS_RMS: tl.constexpr, HAS_RES: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    STORE_Z: tl.constexpr, DROPOUT: tl.constexpr, SEED_PTR: tl.constexpr, BLOCK_N: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    z = tl.load(X + row * stride_x + cols, mask=mask, other=0.0)
    if DROPOUT:  # rounded to x's dtype, as dropout's output is
        kept = _kept(seed_of(seed, SEED, SEED_PTR), p_drop, row, N, BLOCK_N)
        z = tl.where(kept, z.to(tl.float32) * drop_scale, 0.0).to(X.dtype.element_ty)
    if HAS_RES:
        z = z + tl.load(RES + row * stride_res + cols, mask=mask, other=0.0)
    if STORE_Z:
        tl.store(Z + row * stride_z + cols, z, mask=mask)
    z = z.to(tl.float32)
    if IS_RMS:
        zc = z
    else:
        mean = tl.sum(z, axis=0) / N
        if tl.abs(mean) > 3.0e38:  # the sum overflowed (|z| near float32's max): divide first
            mean = tl.sum(z / N, axis=0)
        tl.store(MEAN + row, mean)
        zc = tl.where(mask, z - mean, 0.0)
    var = tl.sum(zc * zc, axis=0) / N
    if var > 3.0e38:
        # The squares overflowed (|zc| beyond ~1e19): square the row scaled by its largest
        # value instead. Such a variance dwarfs eps.
        scale = tl.max(tl.abs(zc), axis=0)
        zs = zc / scale
        rstd = 1.0 / (scale * tl.sqrt(tl.sum(zs * zs, axis=0) / N))
    else:
        rstd = 1.0 / tl.sqrt(var + eps)
    tl.store(RSTD + row, rstd)
    y = zc * rstd
    if HAS_W:
        y = y * tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_B:
        y = y + tl.load(B + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(Y + row * stride_y + cols, y.to(Y.dtype.element_ty), mask=mask)


# The row count of a packed batch changes from call to call: not specialized on, so that Triton
# does not compile a variant per value class (divisible by 16, equal to 1) mid-run.
@triton.jit(do_not_specialize=["n_rows", "rows_per_program", "seed"])
def _norm_bwd_kernel(
    DY, Z, W, MEAN, RSTD, DZ_EXTRA, DZ, DX, DW_PART, DB_PART, SEED,
    stride_dy, stride_z, stride_extra, stride_dz, stride_dx,
    n_rows, N, rows_per_program, seed, p_drop, drop_scale,
    IS_RMS: tl.constexpr, HAS_W: tl.constexpr, HAS_B: tl.constexpr,
    HAS_DZ_EXTRA: tl.constexpr, NEED_DW: tl.constexpr, STORE_DZ: tl.constexpr,
    DROPOUT: tl.constexpr, SEED_PTR: tl.constexpr, BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_N)
    mask = cols < N
    if HAS_W:
        w = tl.load(W + cols, mask=mask, other=0.0).to(tl.float32)
    dw = tl.zeros([BLOCK_N], dtype=tl.float32)
    db = tl.zeros([BLOCK_N], dtype=tl.float32)
    row_start = pid * rows_per_program
    row_end = tl.minimum(row_start + rows_per_program, n_rows)
    # Row pointers advance by their strides: 64-bit offsets without 64-bit row indices.
    first = pid.to(tl.int64) * rows_per_program
    dy_ptr, z_ptr = DY + first * stride_dy, Z + first * stride_z
    dz_ptr, extra_ptr = DZ + first * stride_dz, DZ_EXTRA + first * stride_extra
    dx_ptr = DX + first * stride_dx
    row64 = first  # the row as an int64, for the dropout mask's counters
    if DROPOUT:
        seed = seed_of(seed, SEED, SEED_PTR)
    for row in range(row_start, row_end):
        dy = tl.load(dy_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        z = tl.load(z_ptr + cols, mask=mask, other=0.0).to(tl.float32)
        rstd = tl.load(RSTD + row)
        if IS_RMS:
            xhat = z * rstd
        else:
            xhat = tl.where(mask, (z - tl.load(MEAN + row)) * rstd, 0.0)
        if HAS_W:
            wdy = w * dy
            if NEED_DW:
                dw += dy * xhat
        else:
            wdy = dy
        if HAS_B:
            db += dy
        c1 = tl.sum(xhat * wdy, axis=0) / N
        if IS_RMS:
            dz = (wdy - xhat * c1) * rstd
        else:
            c2 = tl.sum(wdy, axis=0) / N
            dz = (wdy - (xhat * c1 + c2)) * rstd
        if HAS_DZ_EXTRA:
            dz += tl.load(extra_ptr + cols, mask=mask, other=0.0).to(tl.float32)
            extra_ptr += stride_extra
        if STORE_DZ:
            tl.store(dz_ptr + cols, dz.to(DZ.dtype.element_ty), mask=mask)
        if DROPOUT:
            dx = tl.where(_kept(seed, p_drop, row64, N, BLOCK_N), dz * drop_scale, 0.0)
            tl.store(dx_ptr + cols, dx.to(DX.dtype.element_ty), mask=mask)
            dx_ptr += stride_dx
            row64 += 1
        dy_ptr += stride_dy
        z_ptr += stride_z
        dz_ptr += stride_dz
    if HAS_W and NEED_DW:
        tl.store(DW_PART + pid * N + cols, dw, mask=mask)
    if HAS_B:
        tl.store(DB_PART + pid * N + cols, db, mask=mask)


@triton.jit
def _column_sum_kernel(PART, OUT, n_parts, N, BLOCK_P: tl.constexpr, BLOCK_C: tl.constexpr):
    cols = tl.program_id(0) * BLOCK_C + tl.arange(0, BLOCK_C)
    cmask = cols < N
    acc = tl.zeros([BLOCK_P, BLOCK_C], dtype=tl.float32)
    for p0 in range(0, n_parts, BLOCK_P):
        parts = p0 + tl.arange(0, BLOCK_P)
        m = (parts < n_parts)[:, None] & cmask[None, :]
        acc += tl.load(PART + parts[:, None] * N + cols[None, :], mask=m, other=0.0)
    tl.store(OUT + cols, tl.sum(acc, axis=0).to(OUT.dtype.element_ty), mask=cmask)


def _block_n(n):
    return max(next_power_of_2(n), 16)


def _num_warps(block_n):
    return min(max(block_n // 256, 1), 32)


def forward(x, residual, weight, bias, y, z, mean, rstd, eps, is_rms, dropout_p=0.0, seed=0):
    """x, residual, y, z: (rows, N) with unit column stride; mean, rstd: (rows,) fp32.
    residual, weight, bias, z, mean may be None (z: the sum is not stored; mean: RMSNorm).
    dropout_p > 0 drops x out first, its keep-mask drawn from `seed`: an int, or a one-element
    integer tensor on x's device, read by the kernel."""
    rows, n = x.shape
    if rows == 0:
        return
    block_n = _block_n(n)
    seed_t, seed_i, seed_ptr = seed_args(seed, rstd)
    _norm_fwd_kernel[(rows,)](
        x, residual if residual is not None else x,
        weight if weight is not None else x, bias if bias is not None else x,
        y, z if z is not None else y, mean if mean is not None else rstd, rstd, seed_t,
        x.stride(0), residual.stride(0) if residual is not None else 0,
        y.stride(0), z.stride(0) if z is not None else 0,
        n, eps, seed_i, dropout_p, _drop_scale(dropout_p),
        IS_RMS=is_rms, HAS_RES=residual is not None, HAS_W=weight is not None,
        HAS_B=bias is not None, STORE_Z=z is not None, DROPOUT=dropout_p > 0.0,
        SEED_PTR=seed_ptr, BLOCK_N=block_n, num_warps=_num_warps(block_n),
    )


def _drop_scale(dropout_p):
    return 1.0 / (1.0 - dropout_p)


def backward(dy, z, weight, mean, rstd, dz_extra, dz, dw_part, db_part, dweight, dbias, is_rms,
             dx=None, dropout_p=0.0, seed=0):
    """dy, z, dz_extra, dz: (rows, N); dw_part/db_part: (programs, N) fp32 scratch, one row per
    program (None when that gradient is not wanted); dweight/dbias: (N,) outputs or None.
    With dropout_p > 0, dx (rows, N) gets x's gradient (the forward's seed, int or tensor, redraws
    its mask), and dz (the residual's) may be None when there is no residual."""
    rows, n = dy.shape
    parts = dw_part if dw_part is not None else db_part
    n_programs = parts.shape[0] if parts is not None else min(rows, 1024)
    if rows > 0:
        rows_per_program = cdiv(rows, n_programs)
        block_n = _block_n(n)
        out = dz if dz is not None else dx
        seed_t, seed_i, seed_ptr = seed_args(seed, rstd)
        _norm_bwd_kernel[(n_programs,)](
            dy, z, weight if weight is not None else dy, mean if mean is not None else rstd, rstd,
            dz_extra if dz_extra is not None else dy, out, dx if dx is not None else out,
            dw_part if dw_part is not None else out, db_part if db_part is not None else out,
            seed_t, dy.stride(0), z.stride(0), dz_extra.stride(0) if dz_extra is not None else 0,
            out.stride(0), dx.stride(0) if dx is not None else 0,
            rows, n, rows_per_program, seed_i, dropout_p, _drop_scale(dropout_p),
            IS_RMS=is_rms, HAS_W=weight is not None, HAS_B=db_part is not None,
            HAS_DZ_EXTRA=dz_extra is not None, NEED_DW=dw_part is not None,
            STORE_DZ=dz is not None, DROPOUT=dropout_p > 0.0,
            SEED_PTR=seed_ptr, BLOCK_N=block_n, num_warps=_num_warps(block_n),
        )
    for part, out in ((dw_part, dweight), (db_part, dbias)):
        if part is not None:
            column_sum(part, out, part.shape[0])


def column_sum(part, out, n_parts):
    """out (N,) = the sum of part's first n_parts rows (a (programs, N) fp32 buffer of partial
    sums), in a fixed order, rounded once to out's dtype."""
    n = part.shape[1]
    block_c = 64
    _column_sum_kernel[(cdiv(n, block_c),)](part, out, n_parts, n, BLOCK_P=32, BLOCK_C=block_c,
                                             num_warps=4)
