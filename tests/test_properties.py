"""Randomized checks of every op against the float64 reference: shapes, strides, dtypes,
masks and label patterns drawn by Hypothesis, forward and backward, on every backend that runs
here. The hand-written tests pin known cases; these look for the next unknown one.

CI runs a fixed, small sample (the "ci" profile: derandomized, so a red run is reproducible);
HYPOTHESIS_PROFILE=deep draws many more, fresh each run."""
import contextlib
import os

import pytest
import torch
from hypothesis import HealthCheck, given, settings, strategies as st

import fusedlm
from fusedlm import reference
from conftest import DEVICE, EMULATED, TOL, emulated_cuda_kernels, kernel_backends, rel_err

settings.register_profile("ci", max_examples=25, deadline=None, derandomize=True,
                          suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("deep", max_examples=300, deadline=None,
                          suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

BACKENDS = ["torch"] + kernel_backends()
# Attention also draws the Hopper kernels where the core emulates its CUDA kernels: backend
# "cuda" with the wgmma kernels preferred, on an emulated compute capability 9.0 device.
ATTENTION_BACKENDS = BACKENDS + (["cuda-wgmma"] if EMULATED else [])


@contextlib.contextmanager
def _attention_backend(name):
    """The backend= a test passes for `name`; for "cuda-wgmma" the wgmma kernels are chosen (and
    checked to have run, forward and backward) within the block."""
    if name != "cuda-wgmma":
        yield name
        return
    with emulated_cuda_kernels("wgmma"):
        yield "cuda"
DTYPES = [torch.float32, torch.float16]  # bf16 needs a GPU (the interpreter has none)


def _randn(shape, seed, dtype, scale=1.0):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(shape, generator=g) * scale).to(DEVICE, dtype)


def _maybe_strided(t, strided):
    """t itself, or the same values in a view whose rows are not adjacent (a wider buffer)."""
    if not strided or t.dim() < 2:
        return t
    wide = torch.zeros(*t.shape[:-1], t.shape[-1] + 3, dtype=t.dtype, device=t.device)
    wide[..., :t.shape[-1]] = t
    return wide[..., :t.shape[-1]]


def _check(got, want, dtype, summed=(), theirs=None):
    """Each tensor within the tolerance (2x for those `summed` over rows), or within twice the
    error of `theirs` (PyTorch's own computation in the same precision) where that is larger."""
    for i, (g, w) in enumerate(zip(got, want)):
        if g is None:
            continue
        bound = TOL[dtype] * (2 if i in summed else 1)
        if theirs is not None:
            bound = max(bound, 2 * rel_err(theirs[i], w))
        assert rel_err(g, w) < bound, (i, rel_err(g, w), bound)


def _sdpa(q, k, v, do, causal, mask):
    """PyTorch's attention in q's dtype ((batch, seq, heads, D) tensors): output and gradients.
    A query that sees no key gives NaN there; it is zeroed, as the reference has it."""
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    group = q.shape[2] // k.shape[2]
    allowed = reference.allowed_mask(q.shape[1], k.shape[1], causal=causal, key_mask=mask,
                                     device=q.device)
    o = torch.nn.functional.scaled_dot_product_attention(
        *(t.transpose(1, 2) for t in (q, k.repeat_interleave(group, 2), v.repeat_interleave(group, 2))),
        attn_mask=allowed).transpose(1, 2)
    grads = torch.autograd.grad(o, (q, k, v), do)
    return [t.nan_to_num(0.0) for t in (o, *grads)]


@given(backend=st.sampled_from(BACKENDS), dtype=st.sampled_from(DTYPES),
       rows=st.integers(0, 9), n=st.integers(1, 300), rms=st.booleans(),
       affine=st.booleans(), residual=st.booleans(), strided=st.booleans(),
       dropout=st.sampled_from([0.0, 0.0, 0.3]), seed=st.integers(0, 2 ** 16))
def test_norms(backend, dtype, rows, n, rms, affine, residual, strided, dropout, seed):
    if backend == "cuda":  # the CUDA C++ kernel has no dropout
        dropout = 0.0
    x = _maybe_strided(_randn((rows, n), seed, dtype, 2.0) + 0.5, strided).requires_grad_()
    w = (_randn((n,), seed + 1, dtype, 0.5) + 1).requires_grad_() if affine else None
    b = _randn((n,), seed + 2, dtype).requires_grad_() if affine and not rms else None
    r = _randn((rows, n), seed + 3, dtype).requires_grad_() if residual else None
    dy = _randn((rows, n), seed + 4, dtype)
    fn = fusedlm.rms_norm if rms else fusedlm.layer_norm
    kw = dict(residual=r, dropout_p=dropout, seed=seed, backend=backend)
    y = fn(x, w, 1e-5, **kw) if rms else fn(x, w, b, 1e-5, **kw)
    xs, ws, bs, rs = (None if t is None else t.detach().double().requires_grad_() for t in (x, w, b, r))
    if dropout:  # the call's own keep-mask: ones dropped out are 1 / (1 - p) where kept
        with torch.no_grad():
            ones = torch.ones(rows, n, dtype=dtype, device=DEVICE)
            _, kept = fn(ones, return_residual=True, **dict(kw, residual=torch.zeros_like(ones)))
        xs_in = xs * (kept != 0) / (1 - dropout)
        xs_in = xs_in + (xs_in.to(dtype).double() - xs_in).detach()  # rounded, as stored
    else:
        xs_in = xs
    z = xs_in if rs is None else reference.rounded_sum(xs_in, rs, dtype)
    ref = reference.rms_norm(z, ws, 1e-5)[0] if rms else reference.layer_norm(z, ws, bs, 1e-5)[0]
    assert y.shape == x.shape and y.dtype == dtype
    if n <= 2 or rows == 0:
        # Up to two columns xhat is 0 or +-1 whatever x is: the true dx is ~0 (eps's effect
        # only) and any result is rounding noise (test_layer_norm bounds that case by its floor).
        _check([y], [ref], dtype)
        return
    live = [t for t in (x, w, b, r) if t is not None]
    live_ref = [t for t in (xs, ws, bs, rs) if t is not None]
    got = torch.autograd.grad(y, live, dy)
    want = torch.autograd.grad(ref, live_ref, dy.double())
    summed = [i for i, t in enumerate(live) if t is w or t is b]
    _check([y, *got], [ref, *want], dtype, summed=[i + 1 for i in summed])


@st.composite
def _attention_case(draw):
    kv_heads = draw(st.sampled_from([1, 2]))
    return dict(batch=draw(st.integers(1, 2)), sq=draw(st.integers(1, 40)),
                sk=draw(st.integers(1, 40)), kv_heads=kv_heads,
                heads=kv_heads * draw(st.sampled_from([1, 2])),
                head_dim=draw(st.sampled_from([16, 24, 32, 64])), causal=draw(st.booleans()),
                mask=draw(st.sampled_from([None, "bool", "int64", "empty row"])),
                layout=draw(st.sampled_from(["bshd", "bhsd"])), seed=draw(st.integers(0, 2 ** 16)))


@given(backend=st.sampled_from(ATTENTION_BACKENDS), case=_attention_case())
def test_attention(backend, case):
    with _attention_backend(backend) as run_on:
        _attention(run_on, case, head_dim=64 if backend == "cuda-wgmma" else None)


def _attention(backend, case, head_dim):
    b, sq, sk, h, hk, d = (case[k] for k in ("batch", "sq", "sk", "heads", "kv_heads", "head_dim"))
    if backend == "cuda":  # the CUDA C++ kernels are built for head dims 32, 64, 96 and 128
        d = max(d, 32)
    d = head_dim or d  # the wgmma kernels: 64 and 128
    dtype, seed = torch.float16, case["seed"]
    q, k, v = (_randn((b, s, n, d), seed + i, dtype) for i, (s, n) in enumerate(((sq, h), (sk, hk), (sk, hk))))
    mask = None
    if case["mask"] is not None:
        keep = torch.rand(b, sk, generator=torch.Generator().manual_seed(seed)) < 0.7
        if case["mask"] == "empty row":
            keep[0] = False
        mask = (keep if case["mask"] != "int64" else keep.long() * 3).to(DEVICE)
    leaves = [t.requires_grad_() for t in (q, k, v)]
    args = [t.transpose(1, 2) for t in leaves] if case["layout"] == "bhsd" else leaves
    out = fusedlm.attention(*args, causal=case["causal"], attention_mask=mask,
                            layout=case["layout"], backend=backend)
    if case["layout"] == "bhsd":
        out = out.transpose(1, 2)
    refs = [t.detach().double().requires_grad_() for t in leaves]
    ref, _ = reference.attention(*refs, causal=case["causal"], key_mask=mask)
    do = _randn(ref.shape, seed + 7, dtype)
    _check([out, *torch.autograd.grad(out, leaves, do)],
           [ref, *torch.autograd.grad(ref, refs, do.double())], dtype, summed=(2, 3),
           theirs=_sdpa(*leaves, do, case["causal"], mask))


@st.composite
def _attention_variant(draw):
    """flash-attn's extras: a sliding window (each side unbounded or >= 2 keys, so a row keeps
    a few keys and its gradient is not rounding noise), softcap, ALiBi (also together)."""
    side = st.sampled_from([-1]) | st.integers(2, 12)
    softcap = draw(st.sampled_from([0.0, 2.0, 20.0]))
    alibi = draw(st.sampled_from([None, "per head", "per batch"]))
    return dict(window=(draw(side), draw(side)), softcap=softcap, alibi=alibi,
                causal=draw(st.booleans()), sq=draw(st.integers(1, 40)),
                sk=draw(st.integers(1, 40)), seed=draw(st.integers(0, 2 ** 16)))


# The CUDA C++ kernels have none of these variants (dispatch says so: test_attention.py).
@given(backend=st.sampled_from([b for b in BACKENDS if b != "cuda"]), case=_attention_variant())
def test_attention_variants(backend, case):
    b, h, hk, d, dtype, seed = 2, 4, 2, 16, torch.float16, case["seed"]
    q, k, v = (_randn((b, s, n, d), seed + i, dtype).requires_grad_()
               for i, (s, n) in enumerate(((case["sq"], h), (case["sk"], hk), (case["sk"], hk))))
    slopes = None
    if case["alibi"] is not None:
        g = torch.Generator().manual_seed(seed)
        slopes = torch.rand((h,) if case["alibi"] == "per head" else (b, h), generator=g).to(DEVICE)
    out = fusedlm.attention(q, k, v, causal=case["causal"], window_size=case["window"],
                            softcap=case["softcap"], alibi_slopes=slopes, backend=backend)
    refs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = reference.attention(*refs, causal=case["causal"], window=case["window"],
                                 softcap=case["softcap"], alibi_slopes=slopes)
    do = _randn(ref.shape, seed + 7, dtype)
    ref_grads = torch.autograd.grad(ref, refs, do.double())
    # A query that sees no key (Sq > Sk with causal, or a window past the keys) gives zeros.
    ref, ref_grads = torch.nan_to_num(ref), [torch.nan_to_num(g) for g in ref_grads]
    _check([out, *torch.autograd.grad(out, (q, k, v), do)], [ref, *ref_grads], dtype,
           summed=(2, 3))


@given(backend=st.sampled_from(ATTENTION_BACKENDS), lens=st.lists(st.integers(0, 30), min_size=1, max_size=5),
       lens_k=st.none() | st.lists(st.integers(0, 30), min_size=5, max_size=5),
       spare=st.integers(0, 3), causal=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_attention_varlen(backend, lens, lens_k, spare, causal, seed):
    """`spare` key rows past the last key sequence hold NaN: no query may read them, and their
    gradient is 0."""
    lens_k = lens if lens_k is None else lens_k[:len(lens)]
    if backend == "cuda-wgmma" and (sum(lens) == 0 or sum(lens_k) == 0):
        backend = "cuda"  # no backward to launch: nothing of the wgmma kernels to check
    with _attention_backend(backend) as run_on:
        _attention_varlen(run_on, lens, lens_k, spare, causal, seed, d=64 if backend == "cuda-wgmma" else 32)


def _attention_varlen(backend, lens, lens_k, spare, causal, seed, d):
    cu_q, cu_k = (torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), dtype=torch.int32,
                               device=DEVICE) for n in (lens, lens_k))
    dtype = torch.float16
    q = _randn((sum(lens), 2, d), seed, dtype).requires_grad_()
    nan = torch.full((spare, 1, d), float("nan"), dtype=dtype, device=DEVICE)
    k, v = (torch.cat([_randn((sum(lens_k), 1, d), seed + i, dtype), nan]).requires_grad_()
            for i in (1, 2))
    out = fusedlm.attention_varlen(q, k, v, cu_q, cu_k, max(lens), max(lens_k), causal=causal,
                                   backend=backend)
    real = sum(lens_k)
    refs = [t.detach()[:real if t is not q else None].double().requires_grad_() for t in (q, k, v)]
    ref, _ = reference.attention_varlen(*refs, cu_q, cu_k, causal=causal) if sum(lens) else (refs[0] * 0, None)
    assert out.shape == q.shape
    if sum(lens) == 0 or sum(lens_k) == 0:
        assert not out.abs().sum()
        return
    do = _randn(ref.shape, seed + 3, dtype)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    assert not dk[real:].any() and not dv[real:].any()
    _check([out, dq, dk[:real], dv[:real]],
           [ref, *torch.autograd.grad(ref, refs, do.double())], dtype, summed=(2, 3))


@given(backend=st.sampled_from(BACKENDS), batch=st.integers(1, 3), seq=st.integers(1, 24),
       pattern=st.sampled_from(["random", "right", "left", "empty row", "full"]),
       causal=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_unpad_static_attention(backend, batch, seq, pattern, causal, seed):
    """A padded batch packed by unpad_static (what a compiled model runs): its real rows attend
    as the reference with the padding mask does (bottom-right causal within the real tokens),
    its padding rows give 0, and gradients flow to the real rows only."""
    g = torch.Generator().manual_seed(seed)
    keep = torch.rand(batch, seq, generator=g) < 0.6
    lens = torch.randint(0, seq + 1, (batch, 1), generator=g)
    pos = torch.arange(seq)
    keep = {"random": keep, "right": pos < lens, "left": pos >= seq - lens,
            "empty row": keep.index_fill(0, torch.tensor([0]), False),
            "full": torch.ones(batch, seq, dtype=torch.bool)}[pattern].to(DEVICE)
    dtype = torch.float16
    q, k, v = (_randn((batch, seq, 2, 32), seed + i, dtype).requires_grad_() for i in range(3))
    (rq, idx, cu_q, cu_k, max_len, real), rk, rv = (
        fusedlm.ops.unpad_static(q, keep), fusedlm.ops.unpad_static(k, keep)[0],
        fusedlm.ops.unpad_static(v, keep)[0])
    out = fusedlm.attention_varlen(rq, rk, rv, cu_q, cu_k, max_len, max_len, causal=causal,
                                   backend=backend)
    assert not out[~real].any()
    # The reference: each batch row's real tokens alone (its padding removed), in order.
    refs = [t.detach().double().requires_grad_() for t in (q, k, v)]
    packed = [fusedlm.ops.unpad(t, keep)[0] for t in refs]
    n = int(real.sum())
    ref, _ = (reference.attention_varlen(*packed, cu_q[:batch + 1], cu_q[:batch + 1], causal=causal)
              if n else (packed[0], None))
    do = _randn(out.shape, seed + 5, dtype).masked_fill(~real[:, None, None], 0)
    grads = torch.autograd.grad(out, (q, k, v), do)
    if n == 0:
        assert not any(t.any() for t in grads)
        return
    ref_grads = torch.autograd.grad(ref, refs, do[real].double())
    _check([out[real], *grads], [ref, *ref_grads], dtype, summed=(2, 3))


@given(backend=st.sampled_from(BACKENDS), dtype=st.sampled_from(DTYPES),
       tokens=st.integers(0, 40), hidden=st.integers(1, 24), vocab=st.integers(2, 300),
       labels=st.sampled_from(["some", "all", "none", "strided"]), bias=st.booleans(),
       reduction=st.sampled_from(["mean", "sum", "none"]),
       smoothing=st.sampled_from([0.0, 0.1]), z_loss=st.sampled_from([0.0, 1e-3]),
       chunk=st.none() | st.integers(1, 16), seed=st.integers(0, 2 ** 16))
def test_lm_loss(backend, dtype, tokens, hidden, vocab, labels, bias, reduction, smoothing,
                 z_loss, chunk, seed):
    h = _randn((tokens, hidden), seed, dtype).requires_grad_()
    w = (_randn((vocab, hidden), seed + 1, dtype) / hidden ** 0.5).requires_grad_()
    b = _randn((vocab,), seed + 2, dtype).requires_grad_() if bias else None
    g = torch.Generator().manual_seed(seed)
    y = torch.randint(0, vocab, (2 * tokens,), generator=g)
    y = y[::2] if labels == "strided" else y[:tokens]
    if labels == "some":
        y = y.masked_fill(torch.rand(tokens, generator=g) < 0.5, -100)
    elif labels == "none":
        y = torch.full_like(y, -100)
    y = y.to(DEVICE)
    opts = dict(reduction=reduction, label_smoothing=smoothing, z_loss=z_loss)
    loss = fusedlm.lm_loss(h, w, y, b, chunk_size=chunk, backend=backend, **opts)
    live = [t for t in (h, w, b) if t is not None]
    refs = [t.detach().double().requires_grad_() for t in live]
    ref = reference.lm_loss(refs[0], refs[1], y, refs[2] if bias else None, **opts)[0]
    if reduction == "mean" and not (y != -100).any():
        ref = ref.nan_to_num(0.0)  # fusedlm's documented choice: 0 where torch gives NaN
    assert loss.shape == ref.shape
    cot = _randn(loss.shape, seed + 5, torch.float32)
    if not any(t.requires_grad for t in [loss]) or tokens == 0:
        _check([loss], [ref], dtype)
        return
    got = torch.autograd.grad(loss, live, cot)
    want = torch.autograd.grad(ref, refs, cot.double(), allow_unused=True)
    want = [torch.zeros_like(r) if g_ is None else g_ for r, g_ in zip(refs, want)]
    _check([loss, *got], [ref, *want], dtype, summed=(2, 3))


MLP_BACKENDS = ["torch"] + (["triton"] if fusedlm.ops.dispatch.why_not(
    "mlp", "triton", (DEVICE, torch.float32)) is None else [])


@given(backend=st.sampled_from(MLP_BACKENDS), dtype=st.sampled_from(DTYPES),
       rows=st.integers(0, 70), hidden=st.integers(0, 40), inter=st.integers(0, 300),
       activation=st.sampled_from(("gelu", "gelu_tanh", "relu", "silu")),
       biases=st.tuples(st.booleans(), st.booleans(), st.booleans()), gated=st.booleans(),
       transposed=st.booleans(), seed=st.integers(0, 2 ** 16))
def test_mlp(backend, dtype, rows, hidden, inter, activation, biases, gated, transposed, seed):
    """fusedlm.ops.mlp, plain or gated, against float64, output and every gradient (see _check:
    the gradients summed over rows are the weights' and biases'); weights as nn.Linear stores
    them or transposed views (GPT-2's Conv1D). test_mlp.py holds its fixed cases to twice
    torch's own error alone, a bound a random single-element sum that cancels can miss by luck."""
    def weight(out, inp, s):
        w = _randn((inp, out) if transposed else (out, inp), s, dtype, max(inp, 1) ** -0.5)
        return w

    bias = lambda n, s, on: _randn((n,), s, dtype, 0.5) if on else None  # noqa: E731
    # The op's order: x, weight1, bias1, weight2, bias2, gate_weight, gate_bias.
    leaves = [_randn((rows, hidden), seed, dtype), weight(inter, hidden, seed + 1),
              bias(inter, seed + 3, biases[0]), weight(hidden, inter, seed + 2),
              bias(hidden, seed + 4, biases[1]), weight(inter, hidden, seed + 6) if gated else None,
              bias(inter, seed + 7, gated and biases[2])]
    dy = _randn((rows, hidden), seed + 5, dtype)
    as_linear = (lambda w: None if w is None else w.t()) if transposed else (lambda w: w)

    def run(fn, ts):
        ts = [None if t is None else t.detach().requires_grad_() for t in ts]
        x, w1, b1, w2, b2, wg, bg = ts
        y = fn(x, as_linear(w1), b1, as_linear(w2), b2, as_linear(wg), bg)
        live = [t for t in ts if t is not None]
        return [y, *torch.autograd.grad(y, live, dy.to(y.dtype))]

    ours = run(lambda x, w1, b1, w2, b2, wg, bg: fusedlm.ops.mlp(
        x, w1, b1, w2, b2, activation, gate_weight=wg, gate_bias=bg, backend=backend), leaves)
    plain = lambda *a: reference.mlp(*a[:5], activation, *a[5:])  # noqa: E731
    torchs = run(plain, leaves)
    exact = run(plain, [None if t is None else t.double() for t in leaves])
    assert all(o.dtype == dtype and o.shape == e.shape for o, e in zip(ours, exact))
    # After y and x, the parameters' gradients: sums over rows.
    _check(ours, exact, dtype, summed=range(2, len(ours)), theirs=torchs)
