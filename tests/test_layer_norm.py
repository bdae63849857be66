"""Layer norm / RMSNorm (+ residual) against the float64 reference, forward and backward."""
import pytest
import torch

import fusedlm
from fusedlm import _core, reference
from conftest import DEVICE, HAS_GPU, TOL, kernel_backends, not_emulated, rel_err

BACKENDS = ["torch"] + kernel_backends()
# The interpreter computes fp32/fp16 correctly but has no bf16 (numpy has none): GPU only.
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_GPU else [])
WIDTHS = [1, 7, 767, 1000, 4099]


def make(rows, n, dtype, *, affine=True, residual=False, seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s: torch.randn(*s, generator=g)
    x = (rnd(rows, n) * 2 + 0.5).to(DEVICE, dtype).requires_grad_()
    w = (1 + 0.5 * rnd(n)).to(DEVICE, dtype).requires_grad_() if affine else None
    b = (0.5 * rnd(n)).to(DEVICE, dtype).requires_grad_() if affine else None
    r = rnd(rows, n).to(DEVICE, dtype).requires_grad_() if residual else None
    dy = rnd(rows, n).to(DEVICE, dtype)
    dz = rnd(rows, n).to(DEVICE, dtype)
    return x, w, b, r, dy, dz


def grads(outputs, cotangents, inputs):
    live = [t for t in inputs if t is not None]
    got = torch.autograd.grad(outputs, live, cotangents)
    it = iter(got)
    return [None if t is None else next(it) for t in inputs]


def f64(t):
    return None if t is None else t.detach().double().requires_grad_()


def check_against_reference(backend, dtype, rows, n, *, rms=False, affine=True, residual=False,
                            return_residual=False):
    x, w, b, r, dy, dz = make(rows, n, dtype, affine=affine, residual=residual)
    if rms:
        b = None
    eps = 1e-5
    kw = dict(residual=r, return_residual=return_residual, backend=backend)
    out = (fusedlm.rms_norm(x, w, eps, **kw) if rms else fusedlm.layer_norm(x, w, b, eps, **kw))
    y, z = out if return_residual else (out, None)

    # The reference sees the same rounded inputs in float64. With a residual, the sum is
    # rounded to dtype first (as the unfused `x + r` is), then normalized.
    xs, ws, bs, rs = map(f64, (x, w, b, r))
    zin = xs if rs is None else reference.rounded_sum(xs, rs, dtype)
    ref = reference.rms_norm(zin, ws, eps)[0] if rms else reference.layer_norm(zin, ws, bs, eps)[0]

    assert y.dtype == dtype and y.shape == x.shape
    assert rel_err(y, ref) < TOL[dtype], rel_err(y, ref)
    if return_residual:
        ref_z = x.detach() if r is None else (x.detach() + r.detach())
        assert torch.equal(z.detach(), ref_z)

    inputs = [x, w, b, r]
    outs, cots = [y], [dy]
    if return_residual and r is not None:
        outs.append(z)
        cots.append(dz)
    got = grads(outs, cots, inputs)
    ref_outs, ref_cots = [ref], [dy.double()]
    if return_residual and r is not None:
        ref_outs.append(xs + rs)
        ref_cots.append(dz.double())
    want = grads(ref_outs, ref_cots, [xs, ws, bs, rs])
    for name, g_, w_ in zip("x w b r".split(), got, want):
        if g_ is None:
            continue
        assert g_.dtype == dtype and g_.shape == w_.shape, name
        if n == 1 and name in "xrw":
            # One column: xhat is 0, so the true dx and dweight are exactly 0 and any result is
            # rounding noise amplified by rstd = 1/sqrt(eps): bound it by that noise floor.
            floor = 4 * torch.finfo(dtype).eps * eps ** -0.5 * dy.abs().sum().item()
            assert (g_.double() - w_).abs().max().item() <= floor, name
            continue
        # Parameter gradients sum over rows: allow the accumulated rounding of their inputs.
        tol = TOL[dtype] * (1 if name in "xr" else 2)
        assert rel_err(g_, w_) < tol, (name, rel_err(g_, w_))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", WIDTHS)
@pytest.mark.parametrize("rows", [1, 33])
def test_layer_norm(backend, dtype, n, rows):
    check_against_reference(backend, dtype, rows, n)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [7, 1000])
def test_rms_norm(backend, dtype, n):
    check_against_reference(backend, dtype, 17, n, rms=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
@pytest.mark.parametrize("return_residual", [False, True], ids=["post_ln", "pre_ln"])
def test_residual(backend, rms, return_residual):
    check_against_reference(backend, torch.float16, 19, 767, rms=rms, residual=True,
                            return_residual=return_residual)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_without_affine(backend, rms):
    check_against_reference(backend, torch.float32, 9, 1000, rms=rms, affine=False)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_no_grad_path_matches_the_autograd_path(backend, rms):
    """Without gradients the kernels run outside autograd: the same numbers, no graph."""
    x, w, b, r, _, _ = make(33, 1000, torch.float16, residual=True)
    norm = fusedlm.rms_norm if rms else fusedlm.layer_norm
    bias = {} if rms else {"bias": b}
    y, z = norm(x, w, residual=r, return_residual=True, backend=backend, **bias)
    with torch.no_grad():
        y0, z0 = norm(x, w, residual=r, return_residual=True, backend=backend, **bias)
    assert y.grad_fn is not None and y0.grad_fn is None and z0.grad_fn is None
    assert torch.equal(y0, y) and torch.equal(z0, z)


@pytest.mark.parametrize("backend", BACKENDS)
def test_fp32_params_with_half_input(backend):
    x, w, b, _, dy, _ = make(13, 300, torch.float16)
    w32, b32 = (w.detach().float().requires_grad_(), b.detach().float().requires_grad_())
    y = fusedlm.layer_norm(x, w32, b32, backend=backend)
    ref = reference.layer_norm(f64(x), f64(w32), f64(b32))[0]
    assert y.dtype == torch.float16 and rel_err(y, ref) < TOL[torch.float16]
    gx, gw, gb = torch.autograd.grad(y, [x, w32, b32], dy)
    assert gw.dtype == torch.float32 and gb.dtype == torch.float32
    xs, ws, bs = f64(x), f64(w32), f64(b32)
    want = torch.autograd.grad(reference.layer_norm(xs, ws, bs)[0], [xs, ws, bs], dy.double())
    for got_, want_ in zip((gx, gw, gb), want):
        assert rel_err(got_, want_) < 2 * TOL[torch.float16]


@pytest.mark.parametrize("backend", BACKENDS)
def test_half_error_within_twice_torchs(backend):
    """In fp16 a fused kernel must be no less accurate than torch's own layer norm."""
    x, w, b, _, dy, _ = make(64, 1000, torch.float16, seed=3)
    ours = fusedlm.layer_norm(x, w, b, backend=backend)
    theirs = torch.nn.functional.layer_norm(x, (1000,), w, b)
    xs, ws, bs = f64(x), f64(w), f64(b)
    ref = reference.layer_norm(xs, ws, bs)[0]
    assert rel_err(ours, ref) <= 2 * rel_err(theirs, ref) + 1e-6
    g_ours = torch.autograd.grad(ours, [x, w, b], dy)
    g_theirs = torch.autograd.grad(theirs, [x, w, b], dy)
    g_ref = torch.autograd.grad(ref, [xs, ws, bs], dy.double())
    for o, t, r in zip(g_ours, g_theirs, g_ref):
        assert rel_err(o, r) <= 2 * rel_err(t, r) + 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input(backend):
    x = torch.randn(0, 3, 64, device=DEVICE, requires_grad=True)
    w = torch.randn(64, device=DEVICE, requires_grad=True)
    b = torch.randn(64, device=DEVICE, requires_grad=True)
    y = fusedlm.layer_norm(x, w, b, backend=backend)
    assert y.shape == (0, 3, 64)
    y.sum().backward()
    assert x.grad.shape == x.shape
    assert torch.equal(w.grad, torch.zeros(64, device=DEVICE))
    assert torch.equal(b.grad, torch.zeros(64, device=DEVICE))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["column_slice", "transposed", "row_stride"])
def test_non_contiguous_input(backend, layout):
    g = torch.Generator().manual_seed(1)
    base = torch.randn(6, 40, 130, generator=g).to(DEVICE)
    if layout == "column_slice":
        x = base[:, :, ::2]                    # last-dim stride 2: copied to unit stride
    elif layout == "transposed":
        x = base.transpose(0, 1)               # leading dims permuted, rows not uniform
    else:
        x = base[:, :, :100]                   # unit stride, rows 130 apart: used in place
    x = x.requires_grad_()
    n = x.shape[-1]
    w = torch.randn(n, generator=g).to(DEVICE).requires_grad_()
    y = fusedlm.layer_norm(x, w, None, backend=backend)
    xs, ws = f64(x), f64(w)
    ref = reference.layer_norm(xs, ws)[0]
    assert rel_err(y, ref) < TOL[torch.float32]
    dy = torch.randn(y.shape, generator=g).to(DEVICE).transpose(0, 1).contiguous().transpose(0, 1)
    gx, gw = torch.autograd.grad(y, [x, w], dy)
    rx, rw = torch.autograd.grad(ref, [xs, ws], dy.double())
    assert rel_err(gx, rx) < TOL[torch.float32] and rel_err(gw, rw) < 2 * TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_many_rows_deterministic_param_grads(backend):
    x, w, b, _, dy, _ = make(257, 96, torch.float32, seed=5)
    first = torch.autograd.grad(fusedlm.layer_norm(x, w, b, backend=backend), [w, b], dy)
    again = torch.autograd.grad(fusedlm.layer_norm(x, w, b, backend=backend), [w, b], dy)
    for a, c in zip(first, again):
        assert torch.equal(a, c)


def test_rms_norm_default_eps_matches_torch():
    x = torch.randn(4, 16, device=DEVICE)
    w = torch.randn(16, device=DEVICE)
    ours = fusedlm.rms_norm(x, w)
    theirs = torch.nn.functional.rms_norm(x, (16,), w)
    assert rel_err(ours, theirs) < 1e-6


def test_large_hidden_falls_back_to_reference_in_auto():
    """Past the fused kernels' width, dispatch runs the reference and says why."""
    x = torch.randn(2, 70000, device=DEVICE)
    y = fusedlm.layer_norm(x)
    d = fusedlm.explain("layer_norm")
    assert d.backend == "torch"
    assert rel_err(y, reference.layer_norm(x.double())[0]) < TOL[torch.float32]
    if HAS_GPU:
        assert any("exceeds" in why for _, why in d.skipped)


def test_mixed_residual_is_promoted_under_autocast_only():
    """Under autocast a sublayer's bf16 output meets the fp32 residual stream: the sum and the
    norm run in fp32 (as x + residual and torch's autocast layer_norm would); outside autocast
    the mismatch is an error."""
    x = torch.randn(6, 64, device=DEVICE).bfloat16()
    r = torch.randn(6, 64, device=DEVICE)
    w, b = torch.randn(64, device=DEVICE), torch.randn(64, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        y, z = fusedlm.layer_norm(x, w, b, residual=r, return_residual=True)
    assert y.dtype == z.dtype == torch.float32
    want = torch.nn.functional.layer_norm(x.float() + r, (64,), w, b)
    assert rel_err(y, want) < 1e-5 and torch.equal(z, x.float() + r)
    with pytest.raises(TypeError, match="residual must have x's dtype"):
        fusedlm.layer_norm(x, w, b, residual=r)


@pytest.mark.parametrize("backend", kernel_backends())
@pytest.mark.parametrize("rms", [False, True])
@pytest.mark.parametrize("scale", [1e20, 1e37])  # squares overflow; the row's sum overflows too
def test_huge_fp32_rows_match_float64(backend, rms, scale):
    """fp32 rows whose squares (and sums) overflow float32: the output is O(1), so float32 can
    hold it, and the kernels must match float64 (a sum of squares of inf gave rstd 0: all
    zeros). The torch backend is PyTorch's own layer norm, which fails here too (README)."""
    x, w, b, _, dy, _ = make(3, 767, torch.float32)
    x = (x.detach() * scale).requires_grad_()
    b = None if rms else b
    y = fusedlm.rms_norm(x, w, 1e-5, backend=backend) if rms else fusedlm.layer_norm(x, w, b, 1e-5, backend=backend)
    xs, ws, bs = map(f64, (x, w, b))
    ref = reference.rms_norm(xs, ws, 1e-5)[0] if rms else reference.layer_norm(xs, ws, bs, 1e-5)[0]
    assert rel_err(y, ref) < TOL[torch.float32]
    got = grads([y], [dy], [x, w, b])
    want = grads([ref], [dy.double()], [xs, ws, bs])
    for g_, w_ in zip(got, want):
        if g_ is not None:
            assert torch.isfinite(g_).all() and rel_err(g_, w_) < 2 * TOL[torch.float32]


# Bad input: an error naming the argument, from Python and from the compiled core. -------------

@pytest.mark.parametrize("fn", [fusedlm.layer_norm, fusedlm.rms_norm])
def test_integer_input(fn):
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        fn(torch.ones(2, 4, dtype=torch.int64))


def test_not_a_tensor():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fusedlm.layer_norm([[1.0, 2.0]])


def test_weight_shape_mismatch():
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        fusedlm.layer_norm(torch.randn(2, 8), torch.randn(7))


def test_bias_shape_mismatch():
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        fusedlm.layer_norm(torch.randn(2, 8), torch.randn(8), torch.randn(2, 8))


def test_weight_bias_dtypes_differ():
    with pytest.raises(TypeError, match="bias must have weight's dtype"):
        fusedlm.layer_norm(torch.randn(2, 8), torch.randn(8), torch.randn(8, dtype=torch.float64))


def test_tensors_on_different_devices():
    with pytest.raises(ValueError, match="weight is on meta"):
        fusedlm.layer_norm(torch.randn(2, 8), torch.randn(8, device="meta"))
    with pytest.raises(ValueError, match="residual is on meta"):
        fusedlm.layer_norm(torch.randn(2, 8), residual=torch.randn(2, 8, device="meta"))


def test_residual_mismatch():
    with pytest.raises(ValueError, match="residual must have x's shape"):
        fusedlm.layer_norm(torch.randn(2, 8), residual=torch.randn(8))
    with pytest.raises(TypeError, match="residual must have x's dtype"):
        fusedlm.layer_norm(torch.randn(2, 8), residual=torch.randn(2, 8).half())


@pytest.mark.parametrize("eps", [-1.0, float("nan"), "1e-5"])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps must be a non-negative float"):
        fusedlm.layer_norm(torch.randn(2, 8), eps=eps)


def test_empty_last_dimension():
    with pytest.raises(ValueError, match="non-empty last dimension"):
        fusedlm.layer_norm(torch.randn(2, 0))


# The compiled core validates again, naming its argument, before touching any device memory.
needs_core = pytest.mark.skipif(_core._C is None, reason="fusedlm._C is not built")


def _fwd_args(**override):
    x = torch.randn(4, 16)
    args = dict(x=x, residual=None, weight=torch.randn(16), bias=torch.randn(16),
                y=torch.empty(4, 16), z=None, mean=torch.empty(4), rstd=torch.empty(4))
    args.update(override)
    return {k: _core.dl(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


@needs_core
@pytest.mark.parametrize("override, error, match", [
    (dict(weight=torch.randn(16, dtype=torch.float64)), TypeError, "weight must be float32"),
    (dict(weight=torch.randn(15)), ValueError, r"weight must have shape \(16,\)"),
    (dict(y=torch.empty(4, 16, dtype=torch.float16)), TypeError, "y must be float32"),
    (dict(rstd=torch.empty(3)), ValueError, r"rstd must have shape \(4,\)"),
    (dict(x=torch.ones(4, 16, dtype=torch.int32)), TypeError, "x must be float32, float16 or bfloat16"),
    (dict(x=torch.randn(16, 4).t()), ValueError, "x must have unit stride"),
    (dict(mean=None), ValueError, "mean is required"),
    (dict(dropout_p=1.0), ValueError, r"dropout p must be in \[0, 1\)"),
    (dict(z=torch.empty(4, 16)), ValueError, "z .* only written with a residual or dropout"),
    (dict(dropout_p=0.1, seed_tensor=torch.tensor([1, 2])), ValueError,
     "seed_tensor must hold one element"),
    (dict(dropout_p=0.1, seed_tensor=torch.tensor(1, dtype=torch.int32)), TypeError,
     "seed_tensor must be int64"),
    pytest.param({}, ValueError, "x must be a CUDA tensor", marks=not_emulated),
])
def test_core_forward_validation(override, error, match):
    with pytest.raises(error, match=match):
        _core._C.norm_fwd(**_fwd_args(**override), eps=1e-5, rms=False, stream=0)


def _bwd_args(**override):
    dy = torch.randn(4, 16)
    args = dict(dy=dy, z=torch.randn(4, 16), weight=torch.randn(16), mean=torch.zeros(4),
                rstd=torch.ones(4), dz_extra=None, dz=torch.empty(4, 16), dw_part=None,
                db_part=None, dweight=None, dbias=None)
    args.update(override)
    return {k: _core.dl(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


@needs_core
@pytest.mark.parametrize("override, match", [
    (dict(dz=None), r"dz \(the input's gradient\) is required"),
    (dict(dx=torch.empty(4, 16)), "dx is written with dropout only"),
    (dict(dropout_p=0.1, dz=None), r"dx \(x's gradient\) is required with dropout"),
    (dict(dropout_p=0.1, dx=torch.empty(3, 16)), r"dx must have shape \(4, 16\)"),
    (dict(dropout_p=-0.5, dx=torch.empty(4, 16)), r"dropout p must be in \[0, 1\)"),
])
def test_core_backward_validation(override, match):
    """The backward's outputs follow the dropout: dz (the sum's gradient) without it, dx (x's)
    with it, where dz is optional (no residual needs it)."""
    with pytest.raises(ValueError, match=match):
        _core._C.norm_bwd(**_bwd_args(**override), rms=False, stream=0)


@needs_core
def test_core_rejects_a_non_capsule():
    args = _fwd_args()
    args["x"] = torch.randn(4, 16)
    with pytest.raises(TypeError, match="x must be an unconsumed DLPack capsule"):
        _core._C.norm_fwd(**args, eps=1e-5, rms=False, stream=0)


# ---- dropout, add & norm ----------------------------------------------------------------------

DROPOUT_BACKENDS = BACKENDS


def _kept(backend, rows, n, dtype, p, seed, rms=False):
    """The keep-mask a call with this seed draws, read back through return_residual: ones
    dropped out (plus a zero residual) are 1 / (1 - p) where kept, 0 where dropped."""
    ones = torch.ones(rows, n, dtype=dtype, device=DEVICE)
    norm = fusedlm.rms_norm if rms else fusedlm.layer_norm
    with torch.no_grad():
        _, z = norm(ones, residual=torch.zeros_like(ones), dropout_p=p, seed=seed,
                    return_residual=True, backend=backend)
    assert set(z.unique().tolist()) <= {0.0, float(torch.tensor(1 / (1 - p), dtype=dtype))}
    return z != 0


@pytest.mark.parametrize("backend", DROPOUT_BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["no_residual", "residual"])
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_dropout_add_norm_matches_reference_given_the_keep_mask(backend, dtype, residual, rms):
    check_dropout_add_norm(backend, dtype, residual, rms, 37, 767)


def check_dropout_add_norm(backend, dtype, residual, rms, rows, n):
    """norm(dropout(x) + residual) against float64 given the call's own keep-mask, forward and
    backward: x's gradient is the sum's dropped out as x was, the residual's the sum's (also
    the GPU suite's check, at model sizes)."""
    p, seed, eps = 0.3, 1234, 1e-5
    keep = _kept(backend, rows, n, dtype, p, seed, rms)
    x, w, b, r, dy, dz = make(rows, n, dtype, residual=residual)
    norm = fusedlm.rms_norm if rms else fusedlm.layer_norm
    params = (w,) if rms else (w, b)
    y, z = norm(x, *params, eps, residual=r, dropout_p=p, seed=seed, return_residual=True,
                backend=backend)
    xs, ws, bs, rs = map(f64, (x, w, b, r))
    dropped = xs * keep / (1 - p)
    dropped = dropped + (dropped.to(dtype).double() - dropped).detach()  # rounded, as stored
    zin = dropped if rs is None else reference.rounded_sum(dropped, rs, dtype)
    ref = reference.rms_norm(zin, ws, eps)[0] if rms else reference.layer_norm(zin, ws, bs, eps)[0]
    assert rel_err(y, ref) < TOL[dtype], rel_err(y, ref)
    assert rel_err(z, zin) < TOL[dtype]
    inputs = [x, *params, r]
    got = grads([y, z], [dy, dz], inputs)
    want = grads([ref, zin], [dy.double(), dz.double()], [xs, ws, *([] if rms else [bs]), rs])
    for name, g_, w_ in zip(["x", "w", *([] if rms else ["b"]), "r"], got, want):
        if g_ is None:
            continue
        assert g_.shape == w_.shape and g_.dtype == dtype, name
        assert rel_err(g_, w_) < TOL[dtype] * (1 if name in "xr" else 2), (name, rel_err(g_, w_))
    assert torch.all(got[0][~keep] == 0)  # a dropped element passes no gradient to x


@pytest.mark.parametrize("backend", DROPOUT_BACKENDS)
def test_dropout_keep_rate_seed_and_zero(backend):
    """About 1 - p of the elements are kept; a seed gives its mask again and another seed
    another mask; dropout_p=0 is the plain call, bit for bit."""
    keep = _kept(backend, 64, 1000, torch.float32, 0.25, 7)
    assert abs(keep.float().mean().item() - 0.75) < 0.01
    assert torch.equal(keep, _kept(backend, 64, 1000, torch.float32, 0.25, 7))
    assert not torch.equal(keep, _kept(backend, 64, 1000, torch.float32, 0.25, 8))
    x, w, b, r, _, _ = make(9, 100, torch.float32, residual=True)
    plain = fusedlm.layer_norm(x, w, b, residual=r, backend=backend)
    assert torch.equal(fusedlm.layer_norm(x, w, b, residual=r, dropout_p=0.0, backend=backend), plain)
    torch.manual_seed(3)  # seed=None draws from torch's generator: reproducible
    a = fusedlm.layer_norm(x, w, b, residual=r, dropout_p=0.5, backend=backend)
    torch.manual_seed(3)
    assert torch.equal(fusedlm.layer_norm(x, w, b, residual=r, dropout_p=0.5, backend=backend), a)


@pytest.mark.parametrize("bad, match", [
    (dict(dropout_p=1.0), "dropout_p must be a float in \\[0, 1\\)"),
    (dict(dropout_p=-0.1), "dropout_p must be a float in \\[0, 1\\)"),
    (dict(dropout_p="0.1"), "dropout_p must be a float"),
    (dict(dropout_p=0.1, seed=-1), "seed must be an int in \\[0, 2\\*\\*31\\)"),
    (dict(dropout_p=0.1, seed=1.5), "seed must be an int"),
])
def test_dropout_bad_arguments_are_named(bad, match):
    x = torch.randn(4, 8, device=DEVICE)
    with pytest.raises(ValueError, match=match):
        fusedlm.layer_norm(x, **bad)


@pytest.mark.skipif(_core._C is None or not hasattr(_core._C, "dropout_keep"), reason="fusedlm._C is not built")
@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("rows, n, dtype", [(37, 767, torch.float32), (5, 1024, torch.float32),
                                            (5, 1024, torch.float16), (3, 6, torch.float32)], ids=str)
def test_kernels_drop_the_mask_common_philox_defines(backend, rows, n, dtype):
    """The Triton and CUDA C++ kernels keep exactly the elements of common/philox.h's mask (run
    here on the host): four columns a Philox draw, a row's counters from row * ceil(n / 4), so
    both backends drop the same elements for a seed. n = 767 and 6 are not multiples of 4 (a
    row's last draw has unused words) and take the CUDA C++ kernel's one-draw-an-element path;
    1024 its four-columns-a-draw one (one group a vector in float32, two in float16)."""
    p, seed = 0.3, 1234
    got = _kept(backend, rows, n, dtype, p, seed).cpu()
    want = torch.tensor(_core._C.dropout_keep(seed, rows, n, p, False)).view(rows, n)
    assert torch.equal(got, want)




@pytest.mark.skipif("cuda" not in BACKENDS, reason="needs the compiled core's CUDA C++ kernels")
def test_cuda_dropout_refuses_wide_unvectorized_float32_rows_by_name():
    """The CUDA C++ kernels' one exception to dropout (their float32 backward at 4097-8192
    columns read one value at a time spilled with it, so it is compiled out): asked for, the
    call says so; a multiple of 4 columns takes the vectorized path and runs."""
    x = torch.randn(2, 4099, device=DEVICE)
    with pytest.raises(ValueError, match="only as 16-byte vectors"):
        fusedlm.layer_norm(x, dropout_p=0.1, backend="cuda")
    assert fusedlm.layer_norm(x, backend="cuda").shape == x.shape  # no dropout: served
    y, z = fusedlm.layer_norm(torch.ones(2, 4100, device=DEVICE), dropout_p=0.5, seed=3,
                              return_residual=True, backend="cuda")
    assert torch.equal(z.cpu(), torch.tensor(_core._C.dropout_keep(3, 2, 4100, 0.5, False)).view(2, 4100) * 2.0)
