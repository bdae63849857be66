"""GPU suite for attention: bf16 and fp16, model-sized heads and sequences, against the float64
reference with the error bounded by 2x PyTorch's own (SDPA) error in the same precision.

The evidence a backend needs before automatic dispatch may choose it (see README)."""
import pytest
import torch

import fusedlm
from fusedlm import reference
from fusedlm.ops import dispatch
from conftest import (HAS_GPU, TOL, atomic_dq_launches, check_cuda_drops_as_triton,
                      check_unaligned_views_match, rel_err, sdpa, tma_launches)

pytestmark = pytest.mark.gpu
BACKENDS = ([b for b in ("triton", "cuda")
             if dispatch.why_not("attention", b, ("cuda", torch.bfloat16, 64)) is None]
            if HAS_GPU else [])
DROPOUT_BACKENDS = BACKENDS


def _qkv(b, s, h, hk, d, dtype, sk=None):
    g = torch.Generator(device="cuda").manual_seed(0)
    sk = sk or s
    mk = lambda *shape: torch.randn(*shape, device="cuda", generator=g).to(dtype).requires_grad_()
    return mk(b, s, h, d), mk(b, sk, hk, d), mk(b, sk, hk, d)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d", [32, 64, 96, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("s,sk", [(1023, 1023), (300, 700), (2048, 2048)])
def test_attention_gpu(backend, dtype, d, causal, s, sk):
    q, k, v = _qkv(2, s, 4, 2, d, dtype, sk)
    out = fusedlm.attention(q, k, v, causal=causal, backend=backend)
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), do)
    f64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = reference.attention(*f64, causal=causal)
    want = torch.autograd.grad(ref, f64, do.double())
    theirs = sdpa(q, k, v, causal)
    theirs_g = torch.autograd.grad(theirs, (q, k, v), do)
    assert rel_err(out, ref) < max(TOL[dtype], 2 * rel_err(theirs, ref))
    for a, r, t in zip(got, want, theirs_g):
        assert rel_err(a, r) < max(TOL[dtype], 2 * rel_err(t, r))


@pytest.mark.parametrize("backend", BACKENDS)
def test_padded_bert_batch_and_varlen_gpu(backend):
    q, k, v = _qkv(8, 512, 12, 12, 64, torch.bfloat16)
    lens = torch.randint(64, 513, (8,), generator=torch.Generator().manual_seed(1))
    mask = torch.arange(512)[None, :] < lens[:, None]
    mask = mask.cuda()
    out = fusedlm.attention(q, k, v, attention_mask=mask, backend=backend)
    theirs = sdpa(q, k, v, False, mask)
    ref, _ = reference.attention(*(t.detach().double() for t in (q, k, v)), key_mask=mask)
    assert rel_err(out[mask], ref[mask]) < max(TOL[torch.bfloat16], 2 * rel_err(theirs[mask], ref[mask]))
    packed = [fusedlm.unpad(t.detach(), mask) for t in (q, k, v)]
    _, _, cu, max_len = packed[0]
    out_p = fusedlm.attention_varlen(packed[0][0], packed[1][0], packed[2][0], cu, cu, max_len, max_len,
                                     backend=backend)
    assert rel_err(out_p, out.detach()[mask]) < 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_unpad_static_packing_gpu(backend, causal):
    """What a compiled BERT/GPT step runs on a padded batch (`unpad_static`): the real tokens'
    sequences as unpad's, each row's padding as queries with no keys (output 0), key rows past
    cu_seqlens_k[-1] (NaN here) never read, their gradient 0."""
    q, k, v = _qkv(8, 512, 12, 12, 64, torch.bfloat16)
    lens = torch.randint(1, 513, (8,), generator=torch.Generator().manual_seed(2))
    lens[3] = 0  # a row of padding only
    mask = (torch.arange(512)[None, :] < lens[:, None]).cuda()
    rq, idx, cu, cu_k, max_len, real = fusedlm.ops.unpad_static(q.detach(), mask)
    rk, rv = (fusedlm.ops.unpad_static(t.detach(), mask)[0] for t in (k, v))
    rk = rk.masked_fill(~real[:, None, None], float("nan")).requires_grad_()
    rq, rv = rq.requires_grad_(), rv.requires_grad_()
    out = fusedlm.attention_varlen(rq, rk, rv, cu, cu_k, max_len, max_len, causal=causal,
                                   backend=backend, deterministic=True)
    assert not out[~real].any() and torch.isfinite(out).all()
    packed = [fusedlm.unpad(t.detach(), mask) for t in (q, k, v)]
    _, _, cu_real, max_real = packed[0]
    alone = fusedlm.attention_varlen(packed[0][0], packed[1][0], packed[2][0], cu_real, cu_real,
                                     max_real, max_real, causal=causal, backend=backend,
                                     deterministic=True)
    assert rel_err(out[real], alone) < 1e-3
    do = torch.randn_like(out).masked_fill(~real[:, None, None], 0)
    dq, dk, dv = torch.autograd.grad(out, (rq, rk, rv), do)
    assert not dk[~real].any() and not dv[~real].any() and not dq[~real].any()
    assert torch.isfinite(dq).all() and torch.isfinite(dk).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_sequence_16k_gpu(backend):
    q, k, v = _qkv(1, 16384, 4, 4, 128, torch.bfloat16)
    out = fusedlm.attention(q, k, v, causal=True, backend=backend)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    theirs = sdpa(q, k, v, True)
    assert rel_err(out, theirs.detach()) < 2e-2
    assert all(torch.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows_and_determinism_gpu(backend):
    """A sequence whose keys are all masked gives zeros and finite gradients; two backward passes
    are bitwise equal (no atomics)."""
    q, k, v = _qkv(3, 200, 4, 2, 64, torch.float16)
    mask = torch.ones(3, 200, dtype=torch.bool, device="cuda")
    mask[1] = False
    mask[2, 77:] = False
    out = fusedlm.attention(q, k, v, attention_mask=mask, backend=backend)
    assert torch.all(out[1] == 0)
    do = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), do)
    assert all(torch.isfinite(g).all() and torch.equal(a, g) for a, g in zip(first, second))
    ref, _ = reference.attention(*(t.detach().double() for t in (q, k, v)), key_mask=mask)
    assert rel_err(out[2], ref[2]) < 2 * TOL[torch.float16]


@pytest.mark.parametrize("backend", BACKENDS)
def test_unaligned_views_gpu(backend):
    check_unaligned_views_match(backend, "cuda", torch.bfloat16, seq=200)


@pytest.mark.parametrize("backend", DROPOUT_BACKENDS)
def test_dropout_gpu(backend):
    """Forward and backward, autotuned (so every candidate of the dropout class compiles: dK/dV's
    transposed keep-mask once failed to at BLOCK_M != BLOCK_N, on a GPU only), against the
    float64 reference given the same keep-mask."""
    from fusedlm.ops.attention import dropout_mask
    q, k, v = _qkv(2, 257, 4, 4, 64, torch.bfloat16)
    out = fusedlm.attention(q, k, v, dropout_p=0.1, seed=11, backend=backend)
    keep = dropout_mask(2, 4, 257, 257, 0.1, 11)
    f64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = reference.attention(*f64, dropout_p=0.1, dropout_keep=keep)
    assert rel_err(out, ref) < 2 * TOL[torch.bfloat16]
    assert abs(keep.float().mean().item() - 0.9) < 0.01
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), do)
    for i, (a, r) in enumerate(zip(got, torch.autograd.grad(ref, f64, do.double()))):
        assert rel_err(a, r) < 2 * TOL[torch.bfloat16], "dq dk dv".split()[i]


@pytest.mark.skipif(set(BACKENDS) != {"triton", "cuda"}, reason="needs both kernels")
def test_cuda_and_triton_drop_the_same_probabilities_gpu():
    check_cuda_drops_as_triton(*_qkv(2, 300, 4, 2, 64, torch.bfloat16))


def _run_pinned(kern, pin, q, k, v, do, *, causal, key_mask=None, cu=None, max_len=None):
    """Forward and backward through the launchers with `pin` ({kernel: triton.Config})."""
    varlen = cu is not None
    lse_shape = (q.shape[1], q.shape[0]) if varlen else (q.shape[0], q.shape[2], q.shape[1])
    o, lse = torch.empty_like(q), torch.empty(lse_shape, device="cuda")
    opts = dict(key_mask=key_mask, cu_q=cu, cu_k=cu, max_q=max_len or q.shape[1],
                max_k=max_len or k.shape[1], causal=causal, scale=q.shape[-1] ** -0.5,
                dropout_p=0.0, seed=0, blocks=pin)
    kern.forward(q, k, v, o, lse, **opts)
    delta = torch.empty_like(lse)
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    kern.backward(q, k, v, o, do, lse, delta, dq, dk, dv, **opts)
    return o, (dq, dk, dv)


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton kernels on a GPU")
@pytest.mark.parametrize("name", ["fwd", "dkdv", "dq",
                                  pytest.param("dkdv_dq", marks=pytest.mark.opt_in)])
@pytest.mark.parametrize("d", [64, 128])
def test_every_autotuning_candidate_gpu(name, d, monkeypatch):
    """The autotuner may choose any candidate on some GPU, shape or run, and the other tests see
    only the ones it chose here: each candidate, pinned, on odd lengths (causal bottom-right with
    Sq != Sk and a padding mask; a packed batch) against the float64 reference. Candidates that do
    not fit this GPU's shared memory are skipped, as the autotuner skips them. dkdv_dq: dK/dV
    with dQ's atomic shares (FUSEDLM_TRITON_ATOMIC_DQ)."""
    import triton
    from fusedlm.ops import _triton
    kern = _triton.kernels("attention")
    monkeypatch.setattr(kern, "ATOMIC_DQ", name == "dkdv_dq")
    if not kern.configs(name, d):
        pytest.skip(f"{name} serves no head dim {d}")
    dtype = torch.bfloat16
    g = torch.Generator().manual_seed(5)
    lens = [1, 77, 300, 129]
    cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).cuda()
    mask = torch.rand(2, 333, generator=g) > 0.3
    mask[0, 250:] = False  # right padding: the forward and dQ stop at the last attended key
    mask[1, 64:192] = False  # hidden key blocks: dK/dV skip them
    mask = mask.cuda()
    # Two classes per candidate (each a compile): every mask kind's code runs in one of them, and
    # dK/dV's two head loops (grouped-query heads, one query head a key head); the plain dense
    # class is what the other tests' autotuned runs cover.
    cases = [("causal sq<sk + mask, grouped heads", _qkv(2, 201, 4, 2, d, dtype, 333),
              dict(causal=True, key_mask=mask)),
             ("packed causal", [t[0] for t in _qkv(1, sum(lens), 4, 4, d, dtype)],
              dict(causal=True, cu=cu, max_len=max(lens)))]
    ran = 0
    for config in kern.configs(name, d):
        for what, (q, k, v), opts in cases:
            q, k, v = q.detach(), k.detach(), v.detach()
            do = torch.randn(q.shape, device="cuda", generator=torch.Generator(device="cuda").manual_seed(2)).to(dtype)
            key_mask = opts.get("key_mask")
            if key_mask is not None:
                opts = dict(opts, key_mask=key_mask.to(torch.int8).contiguous())
            try:
                out, grads = _run_pinned(kern, {name: config}, q, k, v, do, **opts)
            except triton.runtime.errors.OutOfResources:
                continue
            f64 = [t.double().requires_grad_() for t in (q, k, v)]
            if opts.get("cu") is not None:
                outs = []
                offsets = cu.tolist()
                for a, b in zip(offsets, offsets[1:]):
                    o, _ = reference.attention(*(t[None, a:b] for t in f64), causal=True)
                    outs.append(o[0])
                ref = torch.cat(outs)
            else:
                ref, _ = reference.attention(*f64, causal=opts["causal"], key_mask=key_mask)
            want = torch.autograd.grad(ref, f64, do.double())
            where = f"{name} {config} {what}"
            assert rel_err(out, ref) < 2 * TOL[dtype], where
            for i, (a, r) in enumerate(zip(grads, want)):
                assert rel_err(a, r) < 2 * TOL[dtype], (where, "dq dk dv".split()[i])
            ran += 1
    assert ran >= len(cases), "every candidate ran out of shared memory"


@pytest.mark.skipif(not HAS_GPU or torch.cuda.get_device_capability()[0] < 9 or "triton" not in BACKENDS,
                    reason="needs the Triton kernels on a Hopper GPU")
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("case", ["causal sq<sk", "padding mask", "packed"])
@pytest.mark.parametrize("kv_heads", [2, 4])
@pytest.mark.opt_in
def test_tma_path_gpu(d, case, kv_heads, monkeypatch):
    """The opt-in Hopper path of the Triton kernels (FUSEDLM_TRITON_TMA: TMA copies through
    tensor descriptors made on the device; the forward's key loop warp-specialized), autotuned,
    against float64 with 2x SDPA's error, forward and gradients; the forward and dQ must have
    taken it, dK/dV too with one query head a key head (4 of 4)."""
    seen = tma_launches(monkeypatch)
    dtype = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(3)

    def check(out, ref, grads, ref_grads, theirs, their_grads):
        assert rel_err(out, ref) < max(TOL[dtype], 2 * rel_err(theirs, ref))
        for a, r, t in zip(grads, ref_grads, their_grads):
            assert rel_err(a, r) < max(TOL[dtype], 2 * rel_err(t, r))

    if case == "packed":
        lens = [1, 77, 300, 129]
        cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).cuda()
        q, k, v = (t[0].detach().requires_grad_() for t in _qkv(1, sum(lens), 4, kv_heads, d, dtype))
        out = fusedlm.attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal=True,
                                       backend="triton")
        do = torch.randn(out.shape, device="cuda", generator=g).to(dtype)
        grads = torch.autograd.grad(out, (q, k, v), do)
        offs = cu.tolist()
        for a, b in zip(offs, offs[1:]):  # each sequence alone: its rows of out, dq; its dk, dv
            part = [t.detach()[None, a:b].requires_grad_() for t in (q, k, v)]
            f64 = [t.detach().double().requires_grad_() for t in part]
            ref, _ = reference.attention(*f64, causal=True)
            theirs = sdpa(*part, True)
            d_part = do[None, a:b]
            check(out[None, a:b], ref, [t[None, a:b] for t in grads],
                  torch.autograd.grad(ref, f64, d_part.double()), theirs,
                  torch.autograd.grad(theirs, part, d_part))
    else:
        causal = case == "causal sq<sk"
        sq, sk = (300, 700) if causal else (512, 512)
        q, k, v = _qkv(2, sq, 4, kv_heads, d, dtype, sk)
        mask = None
        if not causal:
            mask = torch.arange(512, device="cuda")[None, :] < torch.tensor([[200], [512]], device="cuda")
        out = fusedlm.attention(q, k, v, causal=causal, attention_mask=mask, backend="triton")
        do = torch.randn(out.shape, device="cuda", generator=g).to(dtype)
        grads = torch.autograd.grad(out, (q, k, v), do)
        f64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
        ref, _ = reference.attention(*f64, causal=causal, key_mask=mask)
        theirs = sdpa(q, k, v, causal, mask)
        check(out, ref, grads, torch.autograd.grad(ref, f64, do.double()), theirs,
              torch.autograd.grad(theirs, (q, k, v), do))
    assert {name for name, _ in seen} == {"fwd", "dq", "dkdv"}, seen
    assert all(t == (name != "dkdv" or kv_heads == 4) for name, t in seen), seen


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs the Triton kernels on a GPU")
@pytest.mark.parametrize("d", [32, 64, 128])  # head dims it serves
@pytest.mark.parametrize("case", ["causal sq<sk, grouped heads", "padding mask", "packed",
                                  "dropout"])
@pytest.mark.opt_in
def test_atomic_dq_backward_gpu(d, case, monkeypatch):
    """FlashAttention-2's backward (FUSEDLM_TRITON_ATOMIC_DQ: dK/dV adds dQ's shares with fp32
    atomics), autotuned: the autotuner times each candidate on the same accumulator, which it
    must zero before each run and before the chosen one (reset_to_zero), or dQ comes out a
    multiple of itself. Gradients against float64 with 2x SDPA's error (dropout: 2x the
    tolerance, SDPA cannot draw our mask); a second backward differs from the first only in
    dQ's last bits (the order of the atomic additions)."""
    from fusedlm.ops.attention import dropout_mask
    seen = atomic_dq_launches(monkeypatch)
    dtype = torch.bfloat16
    g = torch.Generator(device="cuda").manual_seed(4)
    causal, mask, cu, drop = case.startswith("causal"), None, None, case == "dropout"
    if case == "packed":
        lens = [1, 77, 300, 129]
        cu = torch.tensor([0] + lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).cuda()
        q, k, v = (t[0].detach().requires_grad_() for t in _qkv(1, sum(lens), 4, 2, d, dtype))
        out = fusedlm.attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal=True,
                                       backend="triton")
    else:
        sq, sk = (300, 700) if causal else (512, 512)
        q, k, v = _qkv(2, sq, 4, 2 if causal else 4, d, dtype, sk)
        if case == "padding mask":
            mask = torch.arange(512, device="cuda")[None, :] < torch.tensor([[200], [512]], device="cuda")
        out = fusedlm.attention(q, k, v, causal=causal, attention_mask=mask,
                                dropout_p=0.1 if drop else 0.0, seed=7, backend="triton")
    do = torch.randn(out.shape, device="cuda", generator=g).to(dtype)
    grads = torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
    again = torch.autograd.grad(out, (q, k, v), do)
    f64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    if cu is not None:
        ref = torch.cat([reference.attention(*(t[None, a:b] for t in f64), causal=True)[0][0]
                         for a, b in zip(cu.tolist(), cu.tolist()[1:])])
        theirs = torch.cat([sdpa(*(t[None, a:b] for t in (q, k, v)), True)[0]
                            for a, b in zip(cu.tolist(), cu.tolist()[1:])])
    elif drop:
        keep = dropout_mask(2, 4, 512, 512, 0.1, 7)
        ref, _ = reference.attention(*f64, dropout_p=0.1, dropout_keep=keep)
        theirs = None
    else:
        ref, _ = reference.attention(*f64, causal=causal, key_mask=mask)
        theirs = sdpa(q, k, v, causal, mask)
    want = torch.autograd.grad(ref, f64, do.double())
    their_grads = (torch.autograd.grad(theirs, (q, k, v), do) if theirs is not None
                   else (None,) * 3)
    for i, (a, r, t) in enumerate(zip(grads, want, their_grads)):
        bound = 2 * TOL[dtype] if t is None else max(TOL[dtype], 2 * rel_err(t, r))
        assert rel_err(a, r) < bound, ("dq dk dv".split()[i], rel_err(a, r))
    assert torch.equal(grads[1], again[1]) and torch.equal(grads[2], again[2])  # dK, dV: no atomics
    assert rel_err(again[0], grads[0]) < 1e-2  # dQ: the same sums in another order
    assert {name for name, _ in seen} == {"fwd", "dkdv_dq"}, seen
