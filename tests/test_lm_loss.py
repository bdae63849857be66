"""Fused LM loss against the float64 full-logits reference, forward and backward."""
import importlib

import pytest
import torch
import torch.nn.functional as F

import fusedlm
from fusedlm import reference
from fusedlm.ops import dispatch
from conftest import DEVICE, HAS_GPU, TOL, check_row_kernel_ignores_past_v, not_emulated, rel_err

BACKENDS = ["torch"] + [b for b in ("triton", "cuda")
                        if dispatch.why_not("lm_loss", b, (DEVICE, torch.float32, 1000)) is None]
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def backend_dtypes():
    for b in BACKENDS:
        for dt in DTYPES:
            if dispatch.why_not("lm_loss", b, (DEVICE, dt, 1000)) is None:
                yield b, dt


def make(tokens, hidden, vocab, dtype, *, labelled=0.3, bias=True, seed=0, shape=None):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(tokens, hidden, generator=g)
    w = torch.randn(vocab, hidden, generator=g) / hidden ** 0.5 * 2
    b = torch.randn(vocab, generator=g) if bias else None
    labels = torch.randint(0, vocab, (tokens,), generator=g)
    labels[torch.rand(tokens, generator=g) >= labelled] = -100
    if shape is not None:
        h, labels = h.view(*shape, hidden), labels.view(shape)
    cast = lambda t: None if t is None else t.to(DEVICE, dtype).requires_grad_()
    return cast(h), cast(w), cast(b), labels.to(DEVICE)


def f64(t):
    return None if t is None else t.detach().double().requires_grad_()


def run(fn, h, w, b, cotangent=None):
    loss = fn(h, w, b)
    if isinstance(loss, tuple):
        loss = loss[0]
    cot = torch.ones_like(loss) if cotangent is None else cotangent.to(loss.dtype)
    live = [t for t in (h, w, b) if t is not None]
    grads = torch.autograd.grad(loss, live, cot)
    return loss, grads


def check(backend, dtype, tokens, hidden, vocab, *, reduction="mean", chunk_size=None, **kw):
    shape = kw.pop("shape", None)
    chunk = dict(chunk_size=chunk_size, capacity=kw.pop("capacity", None))  # fusedlm's alone
    h, w, b, labels = make(tokens, hidden, vocab, dtype, bias=kw.pop("bias", True), shape=shape,
                           labelled=kw.pop("labelled", 0.3))
    opts = dict(reduction=reduction, **kw)
    loss, grads = run(lambda *a: fusedlm.lm_loss(*a[:2], labels, a[2], **chunk,
                                                 backend=backend, **opts), h, w, b)
    cot = torch.randn(loss.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    loss, grads = run(lambda *a: fusedlm.lm_loss(*a[:2], labels, a[2], **chunk,
                                                 backend=backend, **opts), h, w, b, cot)
    ref, ref_grads = run(lambda *a: reference.lm_loss(*a[:2], labels, a[2], **opts)[0],
                         f64(h), f64(w), f64(b), cot)
    assert loss.dtype == torch.float32 and loss.shape == ref.shape
    tol = TOL[dtype]
    assert rel_err(loss, ref) < tol
    # What PyTorch's own path makes of the same inputs in this precision (logits in dtype).
    torch_loss, torch_grads = run(lambda *a: reference.lm_loss(*a[:2], labels, a[2], **opts)[0],
                                  h, w, b, cot)
    for name, got, want, theirs in zip("hwb", grads, ref_grads, torch_grads):
        err = rel_err(got, want)
        bound = tol if dtype == torch.float32 else max(tol, 2 * rel_err(theirs, want))
        assert err < bound, (name, err, bound)
    return loss, ref


@pytest.mark.parametrize("backend,dtype", list(backend_dtypes()))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_matches_reference(backend, dtype, reduction):
    # V not a multiple of any tile and more than one kernel tile (4096), several chunks,
    # ~30% of rows labelled.
    check(backend, dtype, 41, 24, 4099, reduction=reduction, chunk_size=4)


@pytest.mark.parametrize("backend,dtype", list(backend_dtypes()))
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("capacity", [13, 30, 1000])
def test_capacity_matches_reference(backend, dtype, reduction, capacity):
    # 13 of the 41 rows are labelled: a capacity equal to the count, one above it (filler rows
    # that must count for nothing) and one above the number of tokens.
    h, w, b, labels = make(41, 24, 4099, dtype)
    assert int((labels != -100).sum()) == 13
    check(backend, dtype, 41, 24, 4099, reduction=reduction, chunk_size=4, capacity=capacity)


def _static_call(backend, capacity, labels, reduction="mean", vocab=30):
    h, w, b, _ = make(labels.numel(), 8, vocab, torch.float32)
    return fusedlm.lm_loss(h, w, labels.to(DEVICE), b, reduction=reduction, capacity=capacity,
                           backend=backend, return_details=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_capacity_overflow_and_bad_labels_are_errors_not_a_wrong_loss(backend, reduction):
    labels = torch.full((12,), -100)
    labels[:6] = 3
    assert torch.isfinite(_static_call(backend, 6, labels, reduction).loss).all()
    # Seven labelled rows in a capacity of six: one would be left out, silently.
    labels[6] = 4
    with pytest.raises(ValueError, match="more labelled rows than capacity=6"):
        _static_call(backend, 6, labels, reduction)
    labels[6] = 30  # V = 30
    with pytest.raises(ValueError, match=r"labels must be in \[0, 30\)"):
        _static_call(backend, 12, labels, reduction)


def _checks_as_on_a_gpu(monkeypatch):
    """`require` as it runs on a GPU or in a compiled graph: a device-side assert, no read."""
    mod = importlib.import_module("fusedlm.ops.lm_loss")
    monkeypatch.setattr(mod, "require", lambda ok, message: torch._assert_async(ok, message))


@pytest.mark.skipif(HAS_GPU, reason="the CPU's reading of the check; a GPU asserts on the device")
def test_capacity_checks_run_on_the_device_where_reading_would_wait(monkeypatch):
    """Where the host may not read (a GPU, a compiled graph), the same checks are device-side
    asserts carrying the message."""
    seen = []
    monkeypatch.setattr(torch, "_assert_async", lambda ok, msg: seen.append(msg))
    _checks_as_on_a_gpu(monkeypatch)
    labels = torch.full((12,), -100)
    labels[:7] = 3
    _static_call("torch", 6, labels)
    assert any("more labelled rows than capacity=6" in m for m in seen)
    assert any("labels must be in [0, 30)" in m for m in seen)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_capacity_path_never_reads_back_to_the_host(backend, reduction, monkeypatch):
    """What would stop a CUDA graph (and wait for the GPU): reading a value back."""
    h, w, b, labels = make(33, 16, 50, torch.float32)
    expected = fusedlm.lm_loss(h, w, labels, b, reduction=reduction, backend=backend)

    def forbidden(*a, **k):
        raise AssertionError("host read-back in the capacity path")
    _checks_as_on_a_gpu(monkeypatch)
    for name in ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    monkeypatch.setattr(torch, "nonzero", forbidden)
    out = fusedlm.lm_loss(h, w, labels, b, reduction=reduction, capacity=20, backend=backend,
                          return_details=True)
    grads = torch.autograd.grad(out.loss.sum(), (h, w, b))
    monkeypatch.undo()
    assert rel_err(out.loss, expected) < 1e-5
    ref = torch.autograd.grad(expected.sum(), (h, w, b))
    assert all(rel_err(a, r) < 1e-5 for a, r in zip(grads, ref))
    assert int(out.count) == int((labels != -100).sum())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("vocab", [2, 257, 5003])
def test_vocab_sizes_and_default_chunk(backend, vocab):
    check(backend, torch.float32, 19, 16, vocab)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("smoothing,z_loss", [(0.1, 0.0), (0.0, 1e-3), (0.2, 1e-4)])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_label_smoothing_and_z_loss(backend, smoothing, z_loss, reduction):
    check(backend, torch.float32, 23, 16, 130, label_smoothing=smoothing, z_loss=z_loss,
          reduction=reduction, chunk_size=3)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_bias_all_rows_labelled(backend):
    check(backend, torch.float32, 17, 8, 64, bias=False, labelled=1.1, chunk_size=5)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_causal_shift_on_batched_input(backend, reduction):
    loss, ref = check(backend, torch.float32, 3 * 7, 16, 50, shape=(3, 7), shift=True,
                      reduction=reduction, labelled=0.9)
    if reduction == "none":
        assert loss.shape == (3, 6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_details_accuracy_z_loss_count(backend):
    h, w, b, labels = make(40, 16, 30, torch.float32, labelled=0.6)
    # Make some rows predict their label for sure, so the accuracy is neither 0 nor 1.
    sure = torch.arange(0, 40, 3, device=DEVICE)
    labels[sure] = torch.arange(sure.numel(), device=DEVICE) % 30
    with torch.no_grad():
        h[sure] = w[labels[sure]] * 50
    out = fusedlm.lm_loss(h, w, labels, b, z_loss=1e-3, return_details=True, backend=backend)
    ref, d = reference.lm_loss(f64(h), f64(w), labels, f64(b), z_loss=1e-3)
    assert isinstance(out, fusedlm.LMLossOutput)
    assert int(out.count) == d["count"] == int((labels != -100).sum())
    assert 0 < float(d["accuracy"]) < 1
    assert float(out.accuracy) == pytest.approx(float(d["accuracy"]), abs=1e-7)
    assert float(out.z_loss) == pytest.approx(float(d["z_loss"]), rel=1e-5)
    assert float(out.loss.detach()) == pytest.approx(float(ref.detach()), rel=1e-5)
    assert not out.accuracy.requires_grad and not out.z_loss.requires_grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_argmax_ties_take_the_first_column(backend):
    w = torch.zeros(5000, 4, device=DEVICE)
    w[[7, 4500]] = 1.0  # columns 7 and 4500 tie for the max; 7 is first, in the first tile
    h = torch.ones(2, 4, device=DEVICE)
    out = fusedlm.lm_loss(h, w, torch.tensor([7, 7], device=DEVICE), return_details=True,
                          backend=backend, chunk_size=1)
    assert float(out.accuracy) == 1.0
    out = fusedlm.lm_loss(h, w, torch.tensor([4500, 4500], device=DEVICE), return_details=True,
                          backend=backend, chunk_size=1)
    assert float(out.accuracy) == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_all_labels_ignored_gives_zero_not_nan(backend, reduction):
    h, w, b, labels = make(9, 8, 20, torch.float32)
    labels[:] = -100
    out = fusedlm.lm_loss(h, w, labels, b, reduction=reduction, return_details=True, backend=backend)
    assert torch.equal(out.loss.detach(), torch.zeros_like(out.loss))
    assert int(out.count) == 0 and float(out.accuracy) == 0.0
    grads = torch.autograd.grad(out.loss.sum(), [h, w, b])
    for g in grads:
        assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", BACKENDS)
def test_one_label_at_each_end_of_the_vocabulary(backend):
    for label in (0, 99):
        h, w, b, labels = make(6, 8, 100, torch.float32)
        labels[:] = -100
        labels[4] = label
        loss, grads = run(lambda *a: fusedlm.lm_loss(*a[:2], labels, a[2], backend=backend), h, w, b)
        ref, ref_grads = run(lambda *a: reference.lm_loss(*a[:2], labels, a[2])[0], f64(h), f64(w), f64(b))
        assert rel_err(loss, ref) < 1e-6
        for got, want in zip(grads, ref_grads):
            assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("view", ["strided", "expanded"])
def test_labels_taken_by_their_strides(backend, view):
    """A 1-D view of labels (every other one; one label broadcast to every row) is read through
    its strides, also when no label is ignored (no compaction copy hides the layout)."""
    h, w, b, _ = make(10, 8, 40, torch.float32)
    g = torch.Generator().manual_seed(3)
    if view == "strided":
        labels = torch.randint(0, 40, (20,), generator=g).to(DEVICE)[::2]
    else:
        labels = torch.tensor([7], device=DEVICE).expand(10)
    loss, grads = run(lambda *a: fusedlm.lm_loss(*a[:2], labels, a[2], backend=backend), h, w, b)
    ref, ref_grads = run(lambda *a: reference.lm_loss(*a[:2], labels.contiguous(), a[2])[0],
                         f64(h), f64(w), f64(b))
    assert rel_err(loss, ref) < 1e-6
    for got, want in zip(grads, ref_grads):
        assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_vocabulary_tile_of_minus_inf_logits(backend):
    """A bias of -inf over more than a whole kernel tile (4096 columns) of the vocabulary: the
    loss and gradients stay finite, as float64 gives (the online log-sum-exp must not form
    -inf - -inf)."""
    h, w, b, labels = make(6, 8, 4099 + 64, torch.float32, labelled=1.1)
    with torch.no_grad():
        b[:4099] = float("-inf")
    labels = 4099 + labels % 64
    loss, grads = run(lambda *a: fusedlm.lm_loss(*a[:2], labels, a[2], backend=backend), h, w, b)
    ref, ref_grads = run(lambda *a: reference.lm_loss(*a[:2], labels, a[2])[0], f64(h), f64(w), f64(b))
    assert torch.isfinite(ref) and rel_err(loss, ref) < 1e-5
    for got, want in zip(grads[:2], ref_grads[:2]):  # d bias: 0 at the -inf columns
        assert rel_err(got, want) < 1e-5
    assert rel_err(grads[2][4099:], ref_grads[2][4099:]) < 1e-5
    assert torch.equal(grads[2][:4099], torch.zeros_like(grads[2][:4099]))


@pytest.mark.parametrize("backend,dtype", list(backend_dtypes()))
@pytest.mark.parametrize("layout", ["pitched", "storage_ends_at_v", "unaligned", "contiguous"])
@pytest.mark.parametrize("vocab", [37, 4096 + 37])
def test_row_kernel_loads_past_v_but_never_uses_or_writes_it(backend, dtype, layout, vocab):
    """The row kernels load a row's last tile in whole 16-byte vectors, past V where the row's
    pitch allows (the driver's buffer always does). What lies past V (NaN here) must change
    nothing and stay as it was; a row whose storage ends at V (the last), or rows that are not
    16-byte aligned, must be served too (element by element). The kernel against its float64
    reference, gradient in place."""
    check_row_kernel_ignores_past_v(backend, dtype, layout, vocab)


@pytest.mark.parametrize("backend", BACKENDS)
def test_int32_labels_and_custom_ignore_index(backend):
    h, w, b, labels = make(12, 8, 40, torch.float32, labelled=0.5)
    labels = torch.where(labels == -100, torch.full_like(labels, 39), labels)
    got = fusedlm.lm_loss(h, w, labels.int(), b, ignore_index=39, backend=backend)
    ref, _ = reference.lm_loss(f64(h), f64(w), labels, f64(b), ignore_index=39)
    assert rel_err(got, ref) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
def test_frozen_weight_or_frozen_hidden(backend):
    h, w, b, labels = make(15, 8, 33, torch.float32)
    ref_h, ref_w, ref_b = f64(h), f64(w), f64(b)
    reference.lm_loss(ref_h, ref_w, labels, ref_b)[0].backward()
    (dh,) = torch.autograd.grad(fusedlm.lm_loss(h, w.detach(), labels, b.detach(), backend=backend), [h])
    assert rel_err(dh, ref_h.grad) < 1e-5
    dw, db = torch.autograd.grad(fusedlm.lm_loss(h.detach(), w, labels, b, backend=backend), [w, b])
    assert rel_err(dw, ref_w.grad) < 1e-5 and rel_err(db, ref_b.grad) < 1e-5


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_and_retain_graph(backend):
    h, w, b, labels = make(15, 8, 33, torch.float32)
    loss = fusedlm.lm_loss(h, w, labels, b, backend=backend)
    for reduction in ("mean", "sum", "none"):  # no gradient wanted: the driver without autograd
        kw = dict(reduction=reduction, z_loss=1e-3, return_details=True, backend=backend)
        want = fusedlm.lm_loss(h, w, labels, b, **kw)
        with torch.no_grad():
            got = fusedlm.lm_loss(h, w, labels, b, **kw)
        assert got.loss.grad_fn is None and want.loss.grad_fn is not None
        for a, c in zip(got, want):
            assert torch.equal(a, c.detach())
    first = torch.autograd.grad(2 * loss, [h, w, b], retain_graph=True)
    second = torch.autograd.grad(2 * loss, [h, w, b])
    for a, c in zip(first, second):
        assert torch.equal(a, c)


@pytest.mark.skipif("triton" not in BACKENDS, reason="counts the Triton path's launches")
@pytest.mark.parametrize("labelled, fwd, fwd_bwd, reads", [(1.1, 7, 11, 1), (0.3, 10, 16, 2)])
def test_eager_call_launches_only_what_it_needs(labelled, fwd, fwd_bwd, reads):
    """An eager call's host cost on a GPU is mostly its launches (a few microseconds each), so
    they are counted (aten ops that launch a kernel, with the row kernel's launcher stubbed): at
    most today's numbers (they were 13 / 24 and 22 / 35 before the driver stopped zero-filling
    what its kernels write and scattering back per-token statistics nobody asked for), and
    exactly one host read when every row is labelled, two when some are not (the count and the
    labels' range together, then the labelled rows' indices)."""
    from fusedlm.bench import host
    h, w, _, labels = make(16, 32, 64, torch.float32, bias=False, labelled=labelled)
    one = torch.ones((), device=DEVICE)
    with host.launches_stubbed():
        with torch.no_grad():
            no_grad = host.count_launches(lambda: fusedlm.lm_loss(h, w, labels, backend="triton"))
        both = host.count_launches(
            lambda: fusedlm.lm_loss(h, w, labels, backend="triton").backward(one))
    assert no_grad[0] <= fwd and both[0] <= fwd_bwd, (no_grad, both)
    assert no_grad[1:] == (1, reads) and both[1:] == (1, reads), (no_grad, both)


def test_default_chunk_size_bounds_the_logits_buffer():
    from fusedlm.ops.lm_loss import default_chunk_size
    for vocab, dtype in ((30522, torch.bfloat16), (50257, torch.bfloat16), (128256, torch.float32)):
        rows = default_chunk_size(vocab, dtype)
        nbytes = rows * vocab * torch.empty((), dtype=dtype).element_size()
        assert rows & (rows - 1) == 0 and 2 ** 27 < nbytes <= 2 ** 28
    assert default_chunk_size(10 ** 7, torch.float32) == 128  # a floor, for huge vocabularies


def test_logits_rows_are_16_byte_aligned_and_contiguous_once_padded():
    from fusedlm.ops.lm_loss import GEMM_ALIGN, logits_pitch
    for dtype, size in ((torch.bfloat16, 2), (torch.float16, 2), (torch.float32, 4)):
        for vocab in (2, 30522, 50257, 128256):
            pitch = logits_pitch(vocab, dtype)
            assert pitch >= vocab and pitch * size % 16 == 0 and pitch - vocab < 16 // size
            padded = -(-vocab // GEMM_ALIGN) * GEMM_ALIGN  # what a GPU's GEMMs see
            assert logits_pitch(padded, dtype) == padded  # no gap between rows: contiguous


def test_gemm_operands_pad_the_vocabulary_with_zeros(monkeypatch):
    loss_mod = importlib.import_module("fusedlm.ops.lm_loss")
    from fusedlm.ops.lm_loss import GEMM_ALIGN, _gemm_operands
    monkeypatch.setattr(loss_mod, "_gemm_align", lambda device: GEMM_ALIGN)  # as on a GPU
    h, w, b, _ = make(4, 16, 5003, torch.float32)
    w, b = w.detach(), b.detach()
    for dtype in (torch.float32, torch.float16):  # padded, and padded + cast (autocast's)
        wp, bp = _gemm_operands(w, b, dtype)
        assert wp.shape == (5008, 16) and bp.shape == (5008,) and 5008 % GEMM_ALIGN == 0
        assert wp.dtype == bp.dtype == dtype
        assert torch.equal(wp[:5003], w.to(dtype)) and torch.equal(bp[:5003], b.to(dtype))
        assert not wp[5003:].any() and not bp[5003:].any()
    w8 = w[:5000]  # already a multiple: no copy, or only the cast
    assert _gemm_operands(w8, None, torch.float32) == (w8, None)
    assert torch.equal(_gemm_operands(w8, None, torch.float16)[0], w8.half())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_vocabulary_padding_does_not_change_the_numbers(backend, reduction, monkeypatch):
    """The padded GEMMs (alignment 8, as on a GPU) against unpadded ones (1), over several
    chunks."""
    loss_mod = importlib.import_module("fusedlm.ops.lm_loss")
    h, w, b, labels = make(37, 16, 1001, torch.float32, labelled=0.6)
    cot = torch.randn(() if reduction == "mean" else labels.shape).to(DEVICE)
    results = []
    for align in (1, 8):
        monkeypatch.setattr(loss_mod, "_gemm_align", lambda device, align=align: align)
        results.append(run(lambda *a: fusedlm.lm_loss(*a[:2], labels, a[2], chunk_size=8,
                                                      reduction=reduction, backend=backend),
                           h, w, b, cot))
    (l1, g1), (l8, g8) = results
    assert torch.allclose(l1, l8, rtol=1e-5, atol=1e-6)
    for a, c in zip(g1, g8):
        assert a.shape == c.shape and torch.allclose(a, c, rtol=1e-4, atol=1e-6)


def test_autocast_runs_the_projection_in_the_autocast_dtype():
    h, w, b, labels = make(10, 16, 40, torch.float32, labelled=0.8)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        loss = fusedlm.lm_loss(h, w, labels, b)
    assert fusedlm.explain("lm_loss").case.dtype == torch.bfloat16
    ref, _ = reference.lm_loss(f64(h), f64(w), labels, f64(b))
    assert rel_err(loss, ref) < TOL[torch.bfloat16]
    dw, = torch.autograd.grad(loss, [w])
    assert dw.dtype == torch.float32
    # Mixed inputs, as a model under autocast hands them over: bf16 hidden states (an autocast
    # matmul's output) with the fp32 decoder weight and bias.
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        mixed = fusedlm.lm_loss(h.bfloat16(), w, labels, b)
    assert rel_err(mixed, ref) < TOL[torch.bfloat16]
    with pytest.raises(TypeError, match="weight must have hidden's dtype"):  # outside autocast
        fusedlm.lm_loss(h.bfloat16(), w, labels, b)


@pytest.mark.parametrize("backend,dtype", [(b, dt) for b, dt in backend_dtypes() if dt != torch.float32])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_autocast_weight_gradient_is_not_rounded_per_chunk(backend, dtype, reduction):
    """Mixed-precision training: fp32 weight and bias, the projection in half under autocast,
    64 chunks. Their gradients come back fp32 with at most the error of PyTorch's own autocast
    path (one GEMM over all rows): rounding the weight's gradient to half after every chunk
    gave 3.2-3.3x that error here."""
    h, w, b, labels = make(512, 32, 300, torch.float32, labelled=1.0)
    cot = torch.randn(512, generator=torch.Generator().manual_seed(2)).to(DEVICE)

    def grads(fn):
        with torch.autocast(DEVICE, dtype=dtype):
            loss = fn(reduction=reduction)
        return torch.autograd.grad(loss, [w, b], cot if reduction == "none" else None)
    ours = grads(lambda **kw: fusedlm.lm_loss(h, w, labels, b, chunk_size=8, backend=backend, **kw))
    theirs = grads(lambda **kw: F.cross_entropy(F.linear(h, w, b), labels, **kw))
    # The exact gradients of what autocast computes: the inputs rounded to `dtype`.
    rounded = [t.detach().to(dtype).double().requires_grad_() for t in (h, w, b)]
    loss64 = reference.lm_loss(rounded[0], rounded[1], labels, rounded[2], reduction=reduction)[0]
    want = torch.autograd.grad(loss64, rounded[1:], None if reduction == "mean" else cot.double())
    for name, got, base, ref in zip(("weight", "bias"), ours, theirs, want):
        assert got.dtype == torch.float32, name
        assert rel_err(got, ref) < 1.25 * rel_err(base, ref), (name, rel_err(got, ref), rel_err(base, ref))


@pytest.mark.parametrize("backend,dtype", [(b, dt) for b, dt in backend_dtypes() if dt != torch.float32])
def test_accum_dtype_float32_sums_a_half_weights_gradient_in_fp32(backend, dtype):
    """A bf16/fp16 weight with accum_dtype=torch.float32, 64 chunks: its gradient in its own
    dtype, summed in fp32, within 1.5x PyTorch's one-GEMM error (1.11-1.12x on the 2-core VM,
    where each chunk's product is still rounded once; the default's rounding of the running sum
    per chunk gave 3.2-3.3x)."""
    h, w, b, labels = make(512, 32, 300, dtype, labelled=1.0)
    ours = torch.autograd.grad(fusedlm.lm_loss(h, w, labels, b, chunk_size=8, backend=backend,
                                               accum_dtype=torch.float32), [w])[0]
    theirs = torch.autograd.grad(F.cross_entropy(F.linear(h, w, b).float(), labels), [w])[0]
    w64 = f64(w)
    want = torch.autograd.grad(reference.lm_loss(f64(h), w64, labels, f64(b))[0], [w64])[0]
    assert ours.dtype == dtype
    assert rel_err(ours, want) < 1.5 * rel_err(theirs, want), (rel_err(ours, want), rel_err(theirs, want))
    default = torch.autograd.grad(fusedlm.lm_loss(h, w, labels, b, chunk_size=8, backend=backend), [w])[0]
    assert rel_err(default, want) > 2 * rel_err(theirs, want)  # what the option is for


def test_accum_dtype_float32_never_narrows_a_wider_projection():
    h, w, b, labels = make(40, 8, 30, torch.float64, labelled=1.0)
    grad = lambda **kw: torch.autograd.grad(
        fusedlm.lm_loss(h, w, labels, b, chunk_size=4, backend="torch", **kw), [w])[0]
    wide = grad(accum_dtype=torch.float32)
    assert wide.dtype == torch.float64 and torch.equal(wide, grad())


@pytest.mark.skipif(HAS_GPU, reason="checks the CPU fallback")
def test_auto_dispatch_off_gpu_runs_torch_and_explains():
    h, w, b, labels = make(5, 8, 10, torch.float32)
    fusedlm.lm_loss(h, w, labels, b)
    decision = fusedlm.explain("lm_loss")
    assert decision.backend == "torch" and decision.source == "auto"
    assert any(name == "cuda" for name, _ in decision.skipped)


def test_reference_matches_torch_cross_entropy():
    """The oracle itself: no z-loss, no empty batch -> exactly F.cross_entropy on full logits."""
    h, w, b, labels = make(20, 8, 30, torch.float64, labelled=0.5)
    want = F.cross_entropy(h @ w.t() + b, labels, label_smoothing=0.1)
    got, _ = reference.lm_loss(h, w, labels, b, label_smoothing=0.1)
    assert torch.allclose(got, want, rtol=1e-12, atol=0)


def _bad_calls():
    h = torch.randn(6, 8, device=DEVICE)
    w = torch.randn(20, 8, device=DEVICE)
    y = torch.randint(0, 20, (6,), device=DEVICE)
    b = torch.randn(20, device=DEVICE)
    return [
        # (what, call, exception, words the message must contain)
        ("label >= V", lambda: fusedlm.lm_loss(h, w, torch.full_like(y, 20)), ValueError, ["labels", "[0, 20)", "20"]),
        ("negative label", lambda: fusedlm.lm_loss(h, w, torch.full_like(y, -5)), ValueError, ["labels", "-5"]),
        ("float labels", lambda: fusedlm.lm_loss(h, w, y.float()), TypeError, ["labels", "int64"]),
        ("labels shape", lambda: fusedlm.lm_loss(h, w, y[:5]), ValueError, ["labels", "(6,)"]),
        ("hidden 1-D", lambda: fusedlm.lm_loss(h[0], w, y[0]), ValueError, ["hidden"]),
        ("int hidden", lambda: fusedlm.lm_loss(h.long(), w, y), TypeError, ["hidden"]),
        ("weight width", lambda: fusedlm.lm_loss(h, w[:, :7], y), ValueError, ["weight", "(vocab, 8)"]),
        ("weight dtype", lambda: fusedlm.lm_loss(h, w.double(), y), TypeError, ["weight", "float32"]),
        ("bias shape", lambda: fusedlm.lm_loss(h, w, y, b[:19]), ValueError, ["bias", "(20,)"]),
        ("bias dtype", lambda: fusedlm.lm_loss(h, w, y, b.half()), TypeError, ["bias"]),
        ("reduction", lambda: fusedlm.lm_loss(h, w, y, reduction="avg"), ValueError, ["reduction", "avg"]),
        ("smoothing", lambda: fusedlm.lm_loss(h, w, y, label_smoothing=1.5), ValueError, ["label_smoothing"]),
        ("z_loss", lambda: fusedlm.lm_loss(h, w, y, z_loss=-1.0), ValueError, ["z_loss"]),
        ("chunk_size", lambda: fusedlm.lm_loss(h, w, y, chunk_size=0), ValueError, ["chunk_size"]),
        ("accum_dtype", lambda: fusedlm.lm_loss(h, w, y, accum_dtype=torch.bfloat16), ValueError,
         ["accum_dtype", "torch.float32"]),
        ("capacity 0", lambda: fusedlm.lm_loss(h, w, y, capacity=0), ValueError, ["capacity", "0"]),
        ("capacity float", lambda: fusedlm.lm_loss(h, w, y, capacity=0.2), ValueError, ["capacity", "0.2"]),
        ("ignore_index", lambda: fusedlm.lm_loss(h, w, y, ignore_index=1.5), TypeError, ["ignore_index"]),
        ("backend name", lambda: fusedlm.lm_loss(h, w, y, backend="cudnn"), ValueError, ["backend"]),
        ("not a tensor", lambda: fusedlm.lm_loss(h.tolist(), w, y), TypeError, ["hidden"]),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_names_the_argument(case):
    what, call, exc, words = _bad_calls()[case]
    with pytest.raises(exc) as info:
        call()
    for word in words:
        assert word in str(info.value), (what, str(info.value))


@pytest.mark.skipif(HAS_GPU, reason="checks a CPU-only machine")
@not_emulated
def test_cuda_backend_on_cpu_is_a_clear_error():
    h, w, b, labels = make(4, 8, 10, torch.float32)
    with pytest.raises(ValueError, match="backend='cuda'"):
        fusedlm.lm_loss(h, w, labels, b, backend="cuda")


# The compiled core's row kernel validates again, naming its argument, before any device work.
from fusedlm import _core  # noqa: E402


def _core_args(**override):
    args = dict(logits=torch.randn(4, 30), labels=torch.randint(0, 30, (4,)), loss=torch.empty(4),
                lse=torch.empty(4), hit=torch.empty(4), row_scale=None)
    args.update(override)
    return {k: _core.dl(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


@pytest.mark.skipif(_core._C is None, reason="fusedlm._C is not built")
@pytest.mark.parametrize("override, error, match", [
    (dict(logits=torch.randn(4, 30, dtype=torch.float64)), TypeError, "logits must be float32, float16 or bfloat16"),
    (dict(logits=torch.randn(30, 4).t()), ValueError, "logits must have unit stride"),
    (dict(labels=torch.zeros(4, dtype=torch.int32)), TypeError, "labels must be int64"),
    (dict(labels=torch.zeros(5, dtype=torch.int64)), ValueError, r"labels must have shape \(4,\)"),
    (dict(loss=torch.empty(4, dtype=torch.float16)), TypeError, "loss must be float32"),
    (dict(hit=torch.empty(3)), ValueError, r"hit must have shape \(4,\)"),
    (dict(row_scale=torch.empty(2)), ValueError, r"row_scale must have shape \(4,\)"),
    pytest.param({}, ValueError, "logits must be a CUDA tensor", marks=not_emulated),
])
def test_core_row_kernel_validation(override, error, match):
    with pytest.raises(error, match=match):
        _core._C.lm_ce_rows(**_core_args(**override), grad_scale=1.0, smoothing=0.0, z_loss=0.0,
                            compute_grad=True, stream=0)
