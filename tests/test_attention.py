"""Fused attention against the float64 plain-math reference, forward and backward."""
import numpy as np
import pytest
import torch

import fusedlm
from fusedlm import reference
from fusedlm.ops import dispatch
from fusedlm.ops import attention_kernels
from fusedlm.ops.attention import _fused, dropout_mask
from conftest import (DEVICE, EMULATED, HAS_GPU, TOL, atomic_dq_launches, not_emulated, rel_err,
                      tma_launches)

HALF = [torch.float16] + ([torch.bfloat16] if HAS_GPU else [])
BACKENDS = ["torch"] + [b for b in ("triton",)
                        if dispatch.why_not("attention", b, (DEVICE, torch.float16, 64)) is None]
KERNELS = [b for b in BACKENDS if b != "torch"]


def make(b, sq, sk, h, hk, d, dtype, seed=0, packed=False):
    g = torch.Generator().manual_seed(seed)
    lead = (b * sq,) if packed else (b, sq)
    lead_k = (b * sk,) if packed else (b, sk)
    q = torch.randn(*lead, h, d, generator=g).to(DEVICE, dtype).requires_grad_()
    k = torch.randn(*lead_k, hk, d, generator=g).to(DEVICE, dtype).requires_grad_()
    v = torch.randn(*lead_k, hk, d, generator=g).to(DEVICE, dtype).requires_grad_()
    return q, k, v


def f64(*ts):
    return [t.detach().double().requires_grad_() for t in ts]


def compare(out, ref, grads, ref_grads, dtype, torch_out=None, torch_grads=None):
    """Bound by the tolerance, or by 2x PyTorch's own error in this precision when larger."""
    tol = TOL[dtype]
    bound = lambda theirs, want: tol if theirs is None else max(tol, 2 * rel_err(theirs, want))
    assert rel_err(out, ref) < bound(torch_out, ref), rel_err(out, ref)
    for i, (g, r) in enumerate(zip(grads, ref_grads)):
        theirs = None if torch_grads is None else torch_grads[i]
        assert rel_err(g, r) < bound(theirs, r), (i, rel_err(g, r))


def run_dense(backend, dtype, b, sq, sk, h, hk, d, *, causal=False, mask=None, layout="bshd"):
    q, k, v = make(b, sq, sk, h, hk, d, dtype)
    qs, ks, vs = f64(q, k, v)
    ref, ref_lse = reference.attention(qs, ks, vs, causal=causal, key_mask=mask)
    do = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    if layout == "bhsd":  # Hugging Face's layout: same data, taken by strides
        qi, ki, vi = (t.detach().transpose(1, 2).contiguous().transpose(1, 2).requires_grad_() for t in (q, k, v))
        qb, kb, vb = (t.transpose(1, 2) for t in (qi, ki, vi))
        out, lse = fusedlm.attention(qb, kb, vb, causal=causal, attention_mask=mask, layout="bhsd",
                                     return_lse=True, backend=backend)
        assert out.shape == (b, h, sq, d)
        out = out.transpose(1, 2)
        q, k, v = qi, ki, vi
    else:
        out, lse = fusedlm.attention(q, k, v, causal=causal, attention_mask=mask, return_lse=True,
                                     backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), do.to(dtype))
    ref_grads = torch.autograd.grad(ref, (qs, ks, vs), do)
    compare(out, ref, grads, ref_grads, dtype)
    finite = torch.isfinite(ref_lse)
    assert torch.equal(torch.isinf(lse), ~finite)  # exactly the rows that see no key,
    assert bool((lse[~finite] == float("-inf")).all())  # with the log-sum-exp of nothing
    assert (lse[finite] - ref_lse[finite]).abs().max() < 1e-3
    return out, grads


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", HALF, ids=str)
@pytest.mark.parametrize("head_dim", [32, 64, 96, 128])
@pytest.mark.parametrize("causal", [False, True])
def test_head_dims_odd_lengths(backend, dtype, head_dim, causal):
    run_dense(backend, dtype, 2, 37, 37, 2, 2, head_dim, causal=causal)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sq,sk", [(37, 53), (53, 37), (1, 70), (70, 1), (5, 90)])
def test_causal_bottom_right_with_unequal_lengths(backend, sq, sk):
    run_dense(backend, torch.float16, 2, sq, sk, 2, 2, 32, causal=True)


@pytest.mark.skipif("triton" not in KERNELS, reason="the Triton kernels cannot run here")
@pytest.mark.parametrize("blocks", [(16, 32), (32, 16), "per-kernel"])
@pytest.mark.parametrize("with_mask", [False, True])
def test_kernels_at_block_edges(blocks, with_mask):
    """Each kernel tests bounds and the causal diagonal only on the key (or query) blocks that
    need it. Shifts seq_k - seq_q at every residue around a block edge, with BLOCK_M != BLOCK_N
    both ways, put the start of those blocks everywhere it can be. 'per-kernel' pins a whole
    configuration per kernel (as the GPU suite does for each autotuning candidate)."""
    import triton
    from fusedlm.ops import _triton
    kern = _triton.kernels("attention")
    if blocks == "per-kernel":  # dq takes the default pinned config
        blocks = {"fwd": triton.Config({"BLOCK_M": 32, "BLOCK_N": 16}, num_warps=4, num_stages=2),
                  "dkdv": triton.Config({"BLOCK_M": 16, "BLOCK_N": 32}, num_warps=4, num_stages=1)}
    cases = [(40, 40 + s, True) for s in (-17, -2, -1, 0, 1, 15, 31)]
    cases += [(33, 47, False), (32, 64, False)]
    for sq, sk, causal in cases:
        q, k, v = make(2, sq, sk, 2, 1, 16, torch.float16, seed=sk)
        q, k, v = q.detach(), k.detach(), v.detach()
        mask = None
        if with_mask:
            mask = torch.rand(2, sk, generator=torch.Generator().manual_seed(sq)) > 0.3
            # Row 0 is right-padded, its last attended key anywhere around a block edge (the
            # forward and dQ stop there); row 1 hides keys 16..47 (dK/dV skip hidden blocks).
            mask[0, max(sk - 1 - sk * 7 % 19, 1):] = False
            mask[1, 16:48] = False
            mask = mask.to(DEVICE)
        qs, ks, vs = f64(q, k, v)
        ref, ref_lse = reference.attention(qs, ks, vs, causal=causal, key_mask=mask)
        do = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        ref_grads = torch.autograd.grad(ref, (qs, ks, vs), do)
        o, lse = torch.empty_like(q), torch.empty(2, 2, sq, device=DEVICE)
        key_mask = mask.to(torch.int8).contiguous() if with_mask else None
        opts = dict(key_mask=key_mask, cu_q=None, cu_k=None, max_q=sq, max_k=sk, causal=causal,
                    scale=16 ** -0.5, dropout_p=0.0, seed=0, blocks=blocks)
        kern.forward(q, k, v, o, lse, **opts)
        delta = torch.empty_like(lse)
        do16 = do.to(torch.float16)
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        kern.backward(q, k, v, o, do16, lse, delta, dq, dk, dv, **opts)
        what = (sq, sk, causal)
        compare(o, ref, (dq, dk, dv), ref_grads, torch.float16)
        finite = torch.isfinite(ref_lse)
        assert torch.equal(torch.isinf(lse), ~finite), what
        assert (lse[finite] * 0.6931471805599453 - ref_lse[finite]).abs().max() < 1e-3, what


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("heads,kv_heads", [(4, 2), (4, 1), (6, 3)])
def test_grouped_query_heads(backend, heads, kv_heads):
    run_dense(backend, torch.float16, 2, 29, 29, heads, kv_heads, 32, causal=True)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_padding_mask_with_an_empty_row(backend, causal):
    mask = torch.ones(3, 45, dtype=torch.bool, device=DEVICE)
    mask[0, 30:] = False   # right padding, BERT style
    mask[1, :7] = False    # left padding
    mask[2, :] = False     # nothing to attend: zeros, no NaN
    out, grads = run_dense(backend, torch.float16, 3, 45, 45, 2, 2, 32, causal=causal, mask=mask)
    assert torch.count_nonzero(out[2]) == 0
    for g in grads:
        assert not torch.isnan(g).any()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("packed", [False, True])
def test_no_keys_at_all_gives_zeros_forward_and_backward(backend, packed):
    """seq_k = 0: no query sees a key, so the output and every gradient are 0."""
    if packed:
        q, k, v = make(2, 5, 0, 2, 2, 32, torch.float16, packed=True)
        cu_q = torch.tensor([0, 5, 10], dtype=torch.int32, device=DEVICE)
        cu_k = torch.zeros(3, dtype=torch.int32, device=DEVICE)
        out = fusedlm.attention_varlen(q, k, v, cu_q, cu_k, 5, 0, backend=backend)
    else:
        q, k, v = make(2, 5, 0, 2, 2, 32, torch.float16)
        out = fusedlm.attention(q, k, v, backend=backend)
    assert out.shape == q.shape and torch.count_nonzero(out) == 0
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    assert torch.equal(dq, torch.zeros_like(q)) and dk.numel() == dv.numel() == 0


@pytest.mark.skipif("triton" not in KERNELS, reason="the Triton kernels cannot run here")
@pytest.mark.skipif(not KERNELS, reason="needs the Triton kernels (GPU or interpreter)")
@pytest.mark.parametrize("packed", [False, True])
def test_eager_backward_launches_nothing_beside_the_kernels(packed):
    """An eager forward + backward (launches stubbed) adds no aten kernel to its Triton calls on
    the padded or packed path when every key row belongs to a sequence: no zero gradient is
    made for the log-sum-exp, which has none (autograd materialized one a backward before)."""
    from fusedlm.bench import host
    q, k, v = make(2, 24, 24, 2, 2, 64, torch.float16, packed=packed)
    do = torch.ones_like(q)
    cu = torch.tensor([0, 24, 48], dtype=torch.int32, device=DEVICE)
    call = ((lambda: fusedlm.attention_varlen(q, k, v, cu, cu, 24, 24, backend="triton",
                                              check_offsets=False))
            if packed else (lambda: fusedlm.attention(q, k, v, backend="triton")))
    with host.launches_stubbed():
        launches, triton_calls, reads = host.count_launches(
            lambda: torch.autograd.grad(call(), (q, k, v), do))
    assert (launches, triton_calls, reads) == (0, 2, 0)


def test_backward_launcher_fills_every_gradient_when_there_are_no_keys():
    """The launchers' contract: dq, dk, dv come back filled, whatever they held (the backward
    returned early without touching dq when seq_k = 0, and torch.empty's memory leaked out)."""
    from fusedlm.ops import _triton
    kern = _triton.kernels("attention")
    for sq, sk in ((5, 0), (0, 7)):
        q, k, v = (t.detach() for t in make(2, sq, sk, 2, 2, 32, torch.float16))
        o, lse = torch.zeros_like(q), torch.full((2, 2, sq), float("inf"), device=DEVICE)
        dq, dk, dv = (torch.full_like(t, float("nan")) for t in (q, k, v))
        kern.backward(q, k, v, o, torch.ones_like(q), lse, torch.empty_like(lse), dq, dk, dv,
                      key_mask=None, cu_q=None, cu_k=None, max_q=sq, max_k=sk, causal=False,
                      scale=0.125, dropout_p=0.0, seed=0)
        for g in (dq, dk, dv):
            assert torch.equal(g, torch.zeros_like(g)), (sq, sk)


@pytest.mark.parametrize("backend", BACKENDS)
def test_integer_mask_means_nonzero_attends(backend):
    """Any nonzero integer attends: 256 and -3 too (a cast to int8 would read 256 as 0)."""
    q, k, v = make(2, 20, 20, 2, 2, 32, torch.float16)
    keep = torch.rand(2, 20, generator=torch.Generator().manual_seed(3)) > 0.4
    keep[:, 0] = True
    values = torch.tensor([256, -3, 1, 7])[torch.arange(40) % 4].view(2, 20)
    as_int = torch.where(keep, values, 0).to(DEVICE)
    want = fusedlm.attention(q, k, v, attention_mask=keep.to(DEVICE), backend=backend)
    got = fusedlm.attention(q, k, v, attention_mask=as_int, backend=backend)
    assert torch.equal(got, want)
    # The kernels' byte mask is kept on the integer mask between calls (every layer gets the
    # same one) and made again after the mask changes in place.
    assert torch.equal(fusedlm.attention(q, k, v, attention_mask=as_int, backend=backend), want)
    as_int[1, 5:] = 0
    keep[1, 5:] = False
    want = fusedlm.attention(q, k, v, attention_mask=keep.to(DEVICE), backend=backend)
    assert torch.equal(fusedlm.attention(q, k, v, attention_mask=as_int, backend=backend), want)


@pytest.mark.parametrize("backend", BACKENDS)
def test_no_grad_path_matches_the_autograd_path(backend):
    """Without gradients the kernel runs outside autograd: the same numbers, no graph."""
    q, k, v = make(2, 37, 37, 4, 2, 32, torch.float16)
    mask = torch.arange(37)[None, :] < torch.tensor([[30], [37]])
    out = fusedlm.attention(q, k, v, causal=True, attention_mask=mask.to(DEVICE), backend=backend)
    with torch.no_grad():
        out0 = fusedlm.attention(q, k, v, causal=True, attention_mask=mask.to(DEVICE), backend=backend)
    assert out.grad_fn is not None and out0.grad_fn is None
    assert torch.equal(out0, out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_hugging_face_layout_by_strides(backend):
    mask = torch.ones(2, 33, dtype=torch.int64, device=DEVICE)
    mask[1, 20:] = 0
    run_dense(backend, torch.float16, 2, 33, 33, 4, 2, 64, mask=mask, layout="bhsd")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("sq, sk", [(1, 7), (5, 3)])  # a cached decoding step; cross-attention
def test_hugging_face_layout_with_unequal_lengths(backend, sq, sk):
    """'bhsd' shapes are read as (batch, heads, seq, D): seq_k is not taken for a head count."""
    run_dense(backend, torch.float16, 1, sq, sk, 2, 2, 16, causal=True, layout="bhsd")


def test_hugging_face_layout_checks_heads_not_lengths():
    q = torch.randn(1, 3, 4, 16, device=DEVICE, dtype=torch.float16)  # 3 heads
    k = torch.randn(1, 2, 4, 16, device=DEVICE, dtype=torch.float16)  # 2 heads, same length
    with pytest.raises(ValueError, match=r"k's heads \(2\) must divide q's heads \(3\)"):
        fusedlm.attention(q, k, k, layout="bhsd")
    with pytest.raises(ValueError, match=r"q must have shape \(batch, heads, seq, head_dim\)"):
        fusedlm.attention(q[0], k, k, layout="bhsd")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
# The torch backend pads the first to one batch; the second, mostly padding, goes sequence by sequence.
@pytest.mark.parametrize("lens", [[5, 0, 33, 17, 1], [1, 1, 2, 1, 40]])
def test_varlen_matches_the_padded_reference(backend, causal, lens):
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device=DEVICE)
    total = int(cu[-1])
    q, k, v = make(1, total, total, 4, 2, 32, torch.float16, packed=True)
    out, lse = fusedlm.attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal=causal,
                                        return_lse=True, backend=backend)
    # The same batch padded, with its attention mask, through the dense reference.
    mask = torch.zeros(len(lens), max(lens), dtype=torch.bool, device=DEVICE)
    for i, n in enumerate(lens):
        mask[i, :n] = True
    qp, kp, vp = (fusedlm.pad(t.detach().double(), mask.reshape(-1).nonzero().squeeze(1), len(lens), max(lens))
                  for t in (q, k, v))
    qp, kp, vp = (t.requires_grad_() for t in (qp, kp, vp))
    ref_p, _ = reference.attention(qp, kp, vp, causal=causal, key_mask=mask)
    ref, indices, _, _ = fusedlm.unpad(ref_p, mask)
    do = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    grads = torch.autograd.grad(out, (q, k, v), do.half())
    ref_grads = [fusedlm.unpad(g, mask)[0] for g in torch.autograd.grad(ref, (qp, kp, vp), do)]
    compare(out, ref, grads, ref_grads, torch.float16)
    assert lse.shape == (4, total)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
def test_varlen_cross_attention_with_unequal_lengths(backend, causal):
    """Queries and keys of different lengths per sequence (causal: bottom-right of each
    sequence's own lengths), against the reference run on each sequence alone."""
    lens_q, lens_k = [3, 7, 1, 4], [5, 7, 9, 2]
    cu_q, cu_k = (torch.tensor([0] + torch.tensor(n).cumsum(0).tolist(), dtype=torch.int32,
                               device=DEVICE) for n in (lens_q, lens_k))
    g = torch.Generator().manual_seed(4)
    q = torch.randn(sum(lens_q), 2, 16, generator=g).to(DEVICE, torch.float16).requires_grad_()
    k, v = (torch.randn(sum(lens_k), 1, 16, generator=g).to(DEVICE, torch.float16).requires_grad_()
            for _ in range(2))
    out = fusedlm.attention_varlen(q, k, v, cu_q, cu_k, 7, 9, causal=causal, backend=backend)
    qs, ks, vs = f64(q, k, v)
    ref, _ = reference.attention_varlen(qs, ks, vs, cu_q, cu_k, causal=causal)
    do = torch.randn(ref.shape, generator=g).to(DEVICE)
    compare(out, ref, torch.autograd.grad(out, (q, k, v), do.half()),
            torch.autograd.grad(ref, (qs, ks, vs), do), torch.float16)


def test_unpad_pad_round_trip():
    x = torch.randn(3, 6, 4, device=DEVICE)
    mask = torch.tensor([[1, 1, 1, 0, 0, 0], [1, 1, 1, 1, 1, 1], [0, 0, 0, 0, 0, 0]], device=DEVICE)
    packed, indices, cu, max_len = fusedlm.unpad(x, mask)
    assert packed.shape == (9, 4) and cu.tolist() == [0, 3, 9, 9] and max_len == 6
    back = fusedlm.pad(packed, indices, 3, 6)
    assert torch.equal(back, x * mask[..., None])


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("kv_heads", [2, 1], ids=["mha", "gqa"])
def test_dropout_matches_reference_given_the_keep_mask(backend, kv_heads):
    b, s, h, d, p = 2, 40, 2, 32, 0.3
    q, k, v = make(b, s, s, h, kv_heads, d, torch.float16)
    out = fusedlm.attention(q, k, v, dropout_p=p, seed=123, backend=backend)
    keep = dropout_mask(b, h, s, s, p, 123, device=DEVICE)
    qs, ks, vs = f64(q, k, v)
    ref, _ = reference.attention(qs, ks, vs, dropout_p=p, dropout_keep=keep)
    do = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    grads = torch.autograd.grad(out, (q, k, v), do.half())
    ref_grads = torch.autograd.grad(ref, (qs, ks, vs), do)
    compare(out, ref, grads, ref_grads, torch.float16)
    # Same seed, same result; another seed, another mask.
    assert torch.equal(fusedlm.attention(q, k, v, dropout_p=p, seed=123, backend=backend), out)
    assert not torch.equal(fusedlm.attention(q, k, v, dropout_p=p, seed=124, backend=backend), out)


@pytest.mark.parametrize("backend", KERNELS)
def test_dropout_keep_rate_is_right(backend):
    p, n = 0.1, 2 * 3 * 64 * 64
    keep = dropout_mask(2, 3, 64, 64, p, 7, device=DEVICE)
    rate = keep.float().mean().item()
    sigma = (p * (1 - p) / n) ** 0.5
    assert abs(rate - (1 - p)) < 5 * sigma, rate
    # Different heads draw different masks.
    assert not torch.equal(keep[0, 0], keep[0, 1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_zero_is_the_no_dropout_path(backend):
    q, k, v = make(1, 20, 20, 2, 2, 32, torch.float16)
    a = fusedlm.attention(q, k, v, dropout_p=0.0, seed=5, backend=backend)
    b = fusedlm.attention(q, k, v, backend=backend)
    assert torch.equal(a, b)


@pytest.mark.parametrize("backend", KERNELS)
def test_backward_is_deterministic(backend):
    q, k, v = make(2, 50, 50, 4, 1, 32, torch.float16)
    do = torch.randn(q.shape).to(DEVICE, torch.float16)
    first = torch.autograd.grad(fusedlm.attention(q, k, v, causal=True, backend=backend), (q, k, v), do)
    second = torch.autograd.grad(fusedlm.attention(q, k, v, causal=True, backend=backend), (q, k, v), do)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


def test_fp32_runs_the_reference_and_says_so():
    q, k, v = make(1, 9, 9, 2, 2, 16, torch.float32)
    out = fusedlm.attention(q, k, v)
    assert fusedlm.explain("attention").backend == "torch"
    ref, _ = reference.attention(*f64(q, k, v))
    assert rel_err(out, ref) < 1e-5
    if KERNELS:
        with pytest.raises(ValueError, match="float32 runs the reference"):
            fusedlm.attention(q, k, v, backend="triton")


def test_autocast_runs_in_the_autocast_dtype():
    q, k, v = make(1, 9, 9, 2, 2, 16, torch.float32)
    with torch.autocast(DEVICE, dtype=torch.float16 if DEVICE == "cuda" else torch.bfloat16):
        out = fusedlm.attention(q, k, v)
    assert out.dtype != torch.float32


def _bad_calls():
    q = torch.randn(2, 8, 4, 16, device=DEVICE, dtype=torch.float16)
    k = torch.randn(2, 8, 2, 16, device=DEVICE, dtype=torch.float16)
    cu = torch.tensor([0, 8], dtype=torch.int32, device=DEVICE)
    return [
        (lambda: fusedlm.attention(q, k.float(), k), TypeError, ["k", "dtype"]),
        (lambda: fusedlm.attention(q, k, k[:, :7]), ValueError, ["v", "k's shape"]),
        (lambda: fusedlm.attention(q, k[..., :8], k[..., :8]), ValueError, ["head_dim"]),
        (lambda: fusedlm.attention(q, k[:1], k[:1]), ValueError, ["batch"]),
        (lambda: fusedlm.attention(q[..., :3, :], k, k), ValueError, ["heads"]),
        (lambda: fusedlm.attention(q[0], k, k), ValueError, ["q", "(batch, seq, heads, head_dim)"]),
        (lambda: fusedlm.attention(q, k, k, attention_mask=torch.ones(2, 7, device=DEVICE)), ValueError, ["attention_mask", "(2, 8)"]),
        (lambda: fusedlm.attention(q, k, k, attention_mask=torch.zeros(2, 8, device=DEVICE)), TypeError, ["attention_mask", "float"]),
        (lambda: fusedlm.attention(q, k, k, dropout_p=1.0), ValueError, ["dropout_p"]),
        (lambda: fusedlm.attention(q, k, k, layout="sbhd"), ValueError, ["layout"]),
        (lambda: fusedlm.attention(q, k, k, seed=-1), ValueError, ["seed"]),
        # (The emulated core takes CPU tensors, and then refuses the head dim.)
        (lambda: fusedlm.attention(q.cpu(), k.cpu(), k.cpu(), backend="cuda"), ValueError,
         ["backend='cuda'", "head dims" if EMULATED else "CUDA tensors"]),
        (lambda: fusedlm.attention_varlen(q[0], k[0], k[0], cu - torch.tensor([0, 3], dtype=torch.int32, device=DEVICE), cu, 8, 8), ValueError, ["cu_seqlens_q", "from 0 to 8"]),
        (lambda: fusedlm.attention_varlen(q[0], k[0], k[0], cu, torch.tensor([0, 4, 8], dtype=torch.int32, device=DEVICE), 8, 8), ValueError, ["same length"]),
        (lambda: fusedlm.attention_varlen(q.flatten(0, 1), k.flatten(0, 1), k.flatten(0, 1), torch.tensor([0, 8, 16], dtype=torch.int32, device=DEVICE), torch.tensor([0, 8, 16], dtype=torch.int32, device=DEVICE), 4, 8), ValueError, ["max_seqlen"]),
        (lambda: fusedlm.attention_varlen(q.flatten(0, 1), k.flatten(0, 1), k.flatten(0, 1), torch.tensor([0, 8, 16], device=DEVICE).float(), cu, 8, 8), TypeError, ["cu_seqlens_q"]),
    ]


@pytest.mark.parametrize("case", range(len(_bad_calls())))
def test_bad_input_names_the_argument(case):
    call, exc, words = _bad_calls()[case]
    with pytest.raises(exc) as info:
        call()
    for w in words:
        assert w in str(info.value), str(info.value)


@pytest.mark.parametrize("backend", BACKENDS)
def test_mask_written_through_numpy_is_read_again(backend):
    """A write through numpy does not bump a tensor's version counter: nothing about the mask
    may be kept from one call to the next."""
    q, k, v = make(2, 9, 9, 2, 2, 16, torch.float16)
    buf = np.ones((2, 9), dtype=np.int64)
    mask = torch.from_numpy(buf).to(DEVICE)  # shares the buffer on a CPU
    fusedlm.attention(q, k, v, attention_mask=mask, backend=backend)
    buf[1, 4:] = 0
    if mask.device.type != "cpu":
        mask.copy_(torch.from_numpy(buf))
    out = fusedlm.attention(q, k, v, attention_mask=mask, backend=backend)
    ref, _ = reference.attention(*f64(q, k, v), key_mask=torch.from_numpy(buf).to(DEVICE))
    assert rel_err(out, ref) < TOL[torch.float16]


def test_check_offsets_false_skips_only_the_offsets_values(monkeypatch):
    """check_offsets=False (for offsets already checked, or made by fusedlm) skips the check of
    the offsets' values, and only that: their dtype and shape are still checked."""
    import importlib
    ops = importlib.import_module("fusedlm.ops.attention")
    calls = []
    real = ops.check_varlen_offsets
    monkeypatch.setattr(ops, "check_varlen_offsets", lambda *a, **k: (calls.append(a[0]), real(*a, **k))[1])
    q = torch.randn(10, 2, 16, device=DEVICE)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    fusedlm.attention_varlen(q, q, q, cu, cu, 6, 6)
    assert calls == ["cu_seqlens_q"]  # one tensor passed twice: checked once
    fusedlm.attention_varlen(q, q, q, cu, cu, 6, 6, check_offsets=False)
    assert calls == ["cu_seqlens_q"]
    with pytest.raises(TypeError, match="cu_seqlens_q must be int32"):
        fusedlm.attention_varlen(q, q, q, cu.float(), cu, 6, 6, check_offsets=False)


@pytest.mark.parametrize("backend", BACKENDS)
def test_offsets_written_through_numpy_are_checked_again(backend):
    q = torch.randn(10, 2, 16, device=DEVICE, dtype=torch.float16)
    buf = np.array([0, 4, 10], dtype=np.int32)
    cu = torch.from_numpy(buf).to(DEVICE)
    fusedlm.attention_varlen(q, q, q, cu, cu, 6, 6, backend=backend)
    buf[1] = 11  # past the packed rows, unseen by the version counter
    if cu.device.type != "cpu":
        pytest.skip("a GPU's offsets are checked on the device (see test_compile.py)")
    with pytest.raises(ValueError, match="cu_seqlens_q must rise from 0 to 10"):
        fusedlm.attention_varlen(q, q, q, cu, cu, 6, 6, backend=backend)
    buf[1] = 4
    with pytest.raises(ValueError, match="no sequence longer than max_seqlen=5"):
        fusedlm.attention_varlen(q, q, q, cu, cu, 5, 5, backend=backend)


def test_max_seqlen_takes_any_integer_type():
    q = torch.randn(10, 2, 16, device=DEVICE, dtype=torch.float16)
    cu = torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE)
    out = fusedlm.attention_varlen(q, q, q, cu, cu, np.int64(6), torch.tensor(6), backend="torch")
    assert torch.equal(out, fusedlm.attention_varlen(q, q, q, cu, cu, 6, 6, backend="torch"))
    for bad, exc in ((6.0, TypeError), (True, TypeError), (-1, ValueError)):
        with pytest.raises(exc, match="max_seqlen_q must be"):
            fusedlm.attention_varlen(q, q, q, cu, cu, bad, 6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_inf_in_a_key_gives_nan_as_float64_does(backend):
    q, k, v = make(1, 4, 5, 1, 1, 16, torch.float16)
    with torch.no_grad():
        k[0, 2, 0, 0] = float("inf")
        q[0, :, 0, 0] = torch.tensor([1.0, -1.0, 1.0, -1.0])  # a score of +inf, -inf, +inf, -inf
    out = fusedlm.attention(q, k, v, backend=backend)
    ref, _ = reference.attention(*f64(q, k, v))
    nan = torch.tensor([True, False, True, False], device=DEVICE)
    assert torch.equal(torch.isnan(ref[0]).all(-1).all(-1), nan)  # float64 math: NaN rows
    assert torch.equal(torch.isnan(out[0]).all(-1).all(-1), nan)
    assert rel_err(out[0, 1::2], ref[0, 1::2]) < TOL[torch.float16]  # -inf: that key is skipped


WINDOWS = [(3, 0), (2, 5), (-1, 4), (6, -1), (1, 1)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", WINDOWS)
def test_sliding_window_dense(backend, causal, window):
    """window_size (flash-attn's): forward and every gradient against the float64 reference,
    with GQA, a padding mask, Sq != Sk and lengths off every block size."""
    dtype = torch.float16
    q, k, v = make(2, 37, 45, 4, 2, 16, dtype, seed=4)
    mask = torch.ones(2, 45, dtype=torch.bool, device=DEVICE)
    mask[1, 30:] = False
    qs, ks, vs = f64(q, k, v)
    ref, _ = reference.attention(qs, ks, vs, causal=causal, key_mask=mask, window=window)
    ref = torch.nan_to_num(ref)  # a query whose window holds only padding: zeros
    do = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out = fusedlm.attention(q, k, v, causal=causal, attention_mask=mask, window_size=window,
                            backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), do.to(dtype))
    ref_grads = [torch.nan_to_num(g) for g in torch.autograd.grad(ref, (qs, ks, vs), do)]
    compare(out, ref, grads, ref_grads, dtype)


@pytest.mark.parametrize("backend", KERNELS)
@pytest.mark.parametrize("causal", [False, True])
def test_sliding_window_skips_blocks_it_cannot_see(backend, causal):
    """Sequences many blocks long with a narrow window: the kernels visit only the key (query)
    blocks the window reaches; what they skip must be what the window hides."""
    dtype = torch.float16
    q, k, v = make(1, 150, 170, 2, 2, 16, dtype, seed=6)
    qs, ks, vs = f64(q, k, v)
    window = (9, 4)
    ref, _ = reference.attention(qs, ks, vs, causal=causal, window=window)
    do = torch.randn(ref.shape, generator=torch.Generator().manual_seed(3)).to(DEVICE)
    out = fusedlm.attention(q, k, v, causal=causal, window_size=window, backend=backend,
                            deterministic=True)
    grads = torch.autograd.grad(out, (q, k, v), do.to(dtype))
    compare(out, ref, grads, torch.autograd.grad(ref, (qs, ks, vs), do), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("variant", ["window (3, 0)", "window (-1, 2)", "alibi per sequence"])
def test_packed_variants_are_each_sequence_alone(backend, variant):
    """Sliding windows and ALiBi over packed sequences: within each sequence, as if alone."""
    dtype = torch.float16
    lens = [5, 19, 1, 33]
    cu = torch.tensor([0] + lens, device=DEVICE).cumsum(0).to(torch.int32)
    q, k, v = make(1, sum(lens), sum(lens), 4, 2, 16, dtype, seed=5, packed=True)
    if variant.startswith("window"):
        window = (3, 0) if "(3, 0)" in variant else (-1, 2)
        ours, theirs = dict(window_size=window), dict(window=window)
    else:
        slopes = torch.rand(4, 4, generator=torch.Generator().manual_seed(0)).to(DEVICE)
        ours = theirs = dict(alibi_slopes=slopes)
    out = fusedlm.attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal=True,
                                   backend=backend, **ours)
    qs, ks, vs = f64(q, k, v)
    ref, _ = reference.attention_varlen(qs, ks, vs, cu, cu, causal=True, **theirs)
    do = torch.randn(ref.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    grads = torch.autograd.grad(out, (q, k, v), do.to(dtype))
    compare(out, ref, grads, torch.autograd.grad(ref, (qs, ks, vs), do), dtype)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal, window, alibi", [(False, (-1, -1), False), (True, (-1, -1), False),
                                                   (True, (5, 0), False), (False, (-1, -1), True),
                                                   (True, (5, 0), True)])
def test_softcap_forward_and_backward(backend, causal, window, alibi):
    """softcap (Gemma 2's logit softcapping): scores s -> softcap * tanh(s / softcap) before the
    softmax, its derivative in the backward; with a padding mask, GQA and a window too, and
    ALiBi's bias added after the cap (flash-attn's order: the backward takes tanh's derivative
    at the capped score, not at the biased one). A cap of 2 with scores of magnitude ~4 makes
    the tanh bend, not a no-op."""
    dtype = torch.float16
    q, k, v = make(2, 37, 45, 4, 2, 16, dtype, seed=8)
    with torch.no_grad():
        q *= 2.0  # scaled scores around +-4: well into tanh's curve
    mask = torch.ones(2, 45, dtype=torch.bool, device=DEVICE)
    mask[1, 30:] = False
    qs, ks, vs = f64(q, k, v)
    slopes = torch.tensor([0.5, 0.25, 0.125, 1.0], device=DEVICE) if alibi else None
    ref, _ = reference.attention(qs, ks, vs, causal=causal, key_mask=mask, window=window,
                                 softcap=2.0, alibi_slopes=slopes)
    ref = torch.nan_to_num(ref)
    uncapped, _ = reference.attention(qs, ks, vs, causal=causal, key_mask=mask, window=window,
                                      alibi_slopes=slopes)
    assert rel_err(torch.nan_to_num(uncapped), ref) > 0.05  # the cap changes the answer
    if alibi:
        unbiased, _ = reference.attention(qs, ks, vs, causal=causal, key_mask=mask, window=window,
                                          softcap=2.0)
        assert rel_err(torch.nan_to_num(unbiased), ref) > 0.05  # so do the slopes
    do = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
    out = fusedlm.attention(q, k, v, causal=causal, attention_mask=mask, window_size=window,
                            softcap=2.0, alibi_slopes=slopes, backend=backend)
    grads = torch.autograd.grad(out, (q, k, v), do.to(dtype))
    ref_grads = [torch.nan_to_num(g) for g in torch.autograd.grad(ref, (qs, ks, vs), do)]
    compare(out, ref, grads, ref_grads, dtype)
    with pytest.raises(ValueError, match="softcap must be a float >= 0"):
        fusedlm.attention(q, k, v, softcap=-1.0, backend=backend)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("per_batch", [False, True])
def test_alibi_forward_and_backward(backend, causal, per_batch):
    """ALiBi (flash-attn's alibi_slopes): -slope * |i + Sk - Sq - j| added to the scaled scores,
    slopes per head or per (batch, head); with a mask, GQA, Sq != Sk, and a window."""
    dtype = torch.float16
    q, k, v = make(2, 37, 45, 4, 2, 16, dtype, seed=9)
    mask = torch.ones(2, 45, dtype=torch.bool, device=DEVICE)
    mask[1, 30:] = False
    slopes = 2.0 ** -torch.arange(1, 5, dtype=torch.float32)  # ALiBi's geometric slopes
    slopes = (torch.stack([slopes, slopes.flip(0)]) if per_batch else slopes).to(DEVICE)
    qs, ks, vs = f64(q, k, v)
    for window in ((-1, -1), (6, 0) if causal else (6, 3)):
        ref, _ = reference.attention(qs, ks, vs, causal=causal, key_mask=mask, window=window,
                                     alibi_slopes=slopes)
        ref = torch.nan_to_num(ref)
        do = torch.randn(ref.shape, generator=torch.Generator().manual_seed(1)).to(DEVICE)
        out = fusedlm.attention(q, k, v, causal=causal, attention_mask=mask, window_size=window,
                                alibi_slopes=slopes, backend=backend)
        grads = torch.autograd.grad(out, (q, k, v), do.to(dtype))
        ref_grads = [torch.nan_to_num(g) for g in torch.autograd.grad(ref, (qs, ks, vs), do)]
        compare(out, ref, grads, ref_grads, dtype)
    plain, _ = reference.attention(qs, ks, vs, causal=causal, key_mask=mask)
    assert rel_err(torch.nan_to_num(plain), ref) > 0.01 or window != (-1, -1)  # slopes matter


def test_alibi_refusals_name_the_argument():
    q = torch.randn(1, 4, 2, 16)
    for bad, err, word in ((torch.ones(2, dtype=torch.float64), TypeError, "float32"),
                           (torch.ones(3), ValueError, r"shape \(2,\) or \(1, 2\)"),
                           ([0.5, 0.25], TypeError, "torch.Tensor")):
        with pytest.raises(err, match=word):
            fusedlm.attention(q, q, q, alibi_slopes=bad)


def test_sliding_window_refusals_name_the_argument():
    q = torch.randn(1, 4, 2, 16)
    for bad, err in (((3,), TypeError), ((-2, 0), ValueError), ((1.5, 0), ValueError), (7, TypeError),
                     ((True, 0), ValueError), ((torch.tensor(True), 0), ValueError),
                     ((torch.tensor(1.0), 0), ValueError)):
        with pytest.raises(err, match="window_size"):
            fusedlm.attention(q, q, q, window_size=bad)
    # Integers of any kind, as flash-attn takes them (its tests pass a tensor of two ints).
    assert torch.equal(fusedlm.attention(q, q, q, window_size=torch.tensor([2, 1])),
                       fusedlm.attention(q, q, q, window_size=(2, 1)))
    why = dispatch.why_not("attention", "cuda", ("cuda", torch.float16, 64, True))
    assert why is not None  # the CUDA C++ kernels have no window (or no CUDA here)


@pytest.mark.parametrize("backend", BACKENDS)
def test_flash_attn_return_attn_probs_encodes_the_dropout_pattern(backend, monkeypatch):
    """flash-attn's S_dmask: exp(score - running max), a dropped one negated; its sign is the
    keep mask the call drew (the output is the reference's with that mask) for the backend that
    ran, and with `_get_block_size_n`'s blocks its magnitudes decode to the probabilities."""
    from fusedlm.flash_attn_interface import (_get_block_size_n, flash_attn_func,
                                              flash_attn_varlen_func)
    monkeypatch.setenv("FUSEDLM_BACKEND", backend)
    dispatch.clear_cache()
    p = 0.25
    q, k, v = make(2, 20, 24, 4, 2, 32, torch.float16)  # Sq < Sk: every query sees a key
    torch.manual_seed(0)
    out, lse, s_dmask = flash_attn_func(q, k, v, dropout_p=p, causal=True, window_size=(6, 0),
                                        return_attn_probs=True)
    assert fusedlm.explain("attention").backend == backend
    assert s_dmask.shape == (2, 4, 20, 24) and s_dmask.dtype == torch.float32
    keep = s_dmask >= 0
    qs, ks, vs = f64(q, k, v)
    ref, _ = reference.attention(qs, ks, vs, causal=True, window=(6, 0), dropout_p=p,
                                 dropout_keep=keep)
    assert rel_err(out, ref) < TOL[torch.float16]
    # Decoded as flash-attn's tests do: each key block's magnitudes times exp(running max -
    # lse), the running max taken over the blocks from the last one back.
    probs, lse_ref = reference.attention_probabilities(qs, ks, causal=True, window=(6, 0))
    s = torch.log(probs) + lse_ref[..., None]  # the scores (-inf where masked)
    block = _get_block_size_n(q.device, 32, True, True)
    maxes = torch.stack([b.amax(-1) for b in s.split(block, dim=-1)], -1)
    running = torch.cummax(maxes.flip(-1), -1).values.flip(-1)
    decoded = torch.cat([m.abs() * torch.exp(r[..., None] - lse_ref[..., None]) for m, r in
                         zip(s_dmask.double().split(block, dim=-1), running.unbind(-1))], -1)
    assert torch.allclose(decoded, probs, atol=1e-6)
    seen = s_dmask != 0
    rate = keep[seen].float().mean().item()
    assert abs(rate - (1 - p)) < 0.08, rate
    # Another draw, another pattern; no dropout, no S_dmask (flash-attn's convention).
    assert not torch.equal(flash_attn_func(q, k, v, dropout_p=p, causal=True, window_size=(6, 0),
                                           return_attn_probs=True)[2] >= 0, keep)
    assert flash_attn_func(q, k, v, return_attn_probs=True)[2] is None
    # Packed: sequence i's pattern at [i, :, :len_q, :len_k], zeros elsewhere.
    qp = torch.cat([q[0, :20], q[1, :13]]).detach()
    kp, vp = (torch.cat([t[0, :24], t[1, :9]]).detach() for t in (k, v))
    cu_q = torch.tensor([0, 20, 33], dtype=torch.int32, device=DEVICE)
    cu_k = torch.tensor([0, 24, 33], dtype=torch.int32, device=DEVICE)
    out, _, s_dmask = flash_attn_varlen_func(qp, kp, vp, cu_q, cu_k, 20, 24, dropout_p=p,
                                             causal=True, return_attn_probs=True)
    assert s_dmask.shape == (2, 4, 20, 24)
    assert not s_dmask[1, :, 13:].any() and not s_dmask[1, :, :, 9:].any()
    keep = s_dmask >= 0
    for i, (c0, c1, k0, k1) in enumerate(((0, 20, 0, 24), (20, 33, 24, 33))):
        qs, ks, vs = f64(qp[None, c0:c1], kp[None, k0:k1], vp[None, k0:k1])
        ref, _ = reference.attention(qs, ks, vs, causal=True, dropout_p=p,
                                     dropout_keep=keep[i:i + 1, :, :c1 - c0, :k1 - k0])
        assert rel_err(out[c0:c1], ref[0]) < TOL[torch.float16], i
    seen = s_dmask != 0
    assert abs(keep[seen].float().mean().item() - (1 - p)) < 0.08
    dispatch.clear_cache()


def test_flash_attn_interface_conventions():
    from fusedlm.flash_attn_interface import (flash_attn_func, flash_attn_qkvpacked_func,
                                              flash_attn_varlen_func)
    q, k, v = make(2, 12, 12, 4, 2, 32, torch.float16)
    out = flash_attn_func(q, k, v, 0.0, None, True)  # positional order as in flash-attn
    assert torch.equal(out, fusedlm.attention(q, k, v, causal=True))
    out2, lse, s_dmask = flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
    assert torch.equal(out2, out) and lse.shape == (2, 4, 12) and s_dmask is None
    qkv = torch.stack([q.detach(), q.detach(), q.detach()], dim=2)
    assert flash_attn_qkvpacked_func(qkv).shape == q.shape
    cu = torch.tensor([0, 12, 24], dtype=torch.int32, device=DEVICE)
    packed = flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, 12, 12,
                                    causal=True)
    assert rel_err(packed.view(out.shape), out) < 1e-3
    assert torch.equal(flash_attn_func(q, k, v, causal=True, window_size=(4, 0)),
                       fusedlm.attention(q, k, v, causal=True, window_size=(4, 0)))
    assert torch.equal(flash_attn_func(q, k, v, softcap=30.0),
                       fusedlm.attention(q, k, v, softcap=30.0))
    slopes = torch.full((4,), 0.25, device=DEVICE)
    assert torch.equal(flash_attn_func(q, k, v, alibi_slopes=slopes),
                       fusedlm.attention(q, k, v, alibi_slopes=slopes))
    with pytest.raises(ValueError, match="block_table"):
        flash_attn_varlen_func(q.flatten(0, 1), k.flatten(0, 1), v.flatten(0, 1), cu, cu, 12, 12,
                               block_table=torch.zeros(1, dtype=torch.int32))


def test_flash_attn_packed_variants_equal_the_unpacked_calls():
    """flash-attn's kv-packed and varlen qkv/kv-packed entry points: the same outputs as the
    unpacked calls, and gradients reaching the packed tensor."""
    from fusedlm import flash_attn_interface as fa
    g = torch.Generator().manual_seed(3)
    q = torch.randn(2, 9, 4, 32, generator=g).to(DEVICE, torch.float16)
    kv = torch.randn(2, 11, 2, 2, 32, generator=g).to(DEVICE, torch.float16).requires_grad_()
    out = fa.flash_attn_kvpacked_func(q, kv, causal=True)
    assert torch.equal(out, fa.flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], causal=True))
    (grad,) = torch.autograd.grad(out.float().sum(), kv)
    assert grad.shape == kv.shape and grad.abs().sum() > 0
    cu = torch.tensor([0, 5, 9], dtype=torch.int32, device=DEVICE)
    qkv = torch.randn(9, 3, 4, 32, generator=g).to(DEVICE, torch.float16)
    got, lse, _ = fa.flash_attn_varlen_qkvpacked_func(qkv, cu, 5, causal=True, return_attn_probs=True)
    want = fa.flash_attn_varlen_func(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, 5, 5, causal=True)
    assert torch.equal(got, want) and lse.shape == (4, 9)
    kv2 = torch.randn(9, 2, 2, 32, generator=g).to(DEVICE, torch.float16)
    got = fa.flash_attn_varlen_kvpacked_func(qkv[:, 0], kv2, cu, cu, 5, 5)
    assert torch.equal(got, fa.flash_attn_varlen_func(qkv[:, 0], kv2[:, 0], kv2[:, 1], cu, cu, 5, 5))


@pytest.mark.parametrize("kv_heads", [4, 2])
def test_self_attention_module_padded_and_packed_agree(kv_heads):
    torch.manual_seed(0)
    attn = fusedlm.nn.SelfAttention(64, 4, num_kv_heads=kv_heads, causal=True).to(DEVICE, torch.float16)
    x = torch.randn(2, 10, 64, device=DEVICE, dtype=torch.float16)
    mask = torch.ones(2, 10, dtype=torch.bool, device=DEVICE)
    mask[1, 6:] = False
    padded = attn(x, mask)
    packed_x, indices, cu, max_len = fusedlm.unpad(x, mask)
    packed = attn(packed_x, cu_seqlens=cu, max_seqlen=max_len)
    assert rel_err(packed, fusedlm.unpad(padded, mask)[0]) < 2e-3
    # Against the same projections and plain-math attention.
    q, k, v = attn._split(attn.qkv(x))
    ref = attn.out(reference.attention(q, k, v, causal=True, key_mask=mask)[0].flatten(-2))
    assert rel_err(padded[mask], ref[mask]) < 2e-3
    with pytest.raises(ValueError, match="num_kv_heads"):
        fusedlm.nn.SelfAttention(64, 4, num_kv_heads=3)


# The CUDA C++ kernel (csrc/attention) runs in the GPU suite; here: what it serves, and its host-side
# validation, which names the argument before any device work.
from fusedlm import _core  # noqa: E402


def test_cuda_backend_states_what_it_serves():
    def why(backend, case):
        return dispatch.why_not("attention", backend, case)
    # The emulated core (tests/test_cuda_emulated.py) takes CPU tensors instead of CUDA ones.
    dev, other = ("cpu", "cuda") if _core.EMULATED else ("cuda", "cpu")
    assert ("CPU tensors" if _core.EMULATED else "CUDA tensors") in why("cuda", (other, torch.float16, 64))
    if _core.cuda_unavailable_reason() is not None:
        pytest.skip(_core.cuda_unavailable_reason())
    assert "head dims (32, 64, 96, 128)" in why("cuda", (dev, torch.float16, 80))
    assert "float16 or bfloat16" in why("cuda", (dev, torch.float32, 64))
    assert why("cuda", (dev, torch.bfloat16, 128)) is None


def _attn_args(**override):
    q = torch.randn(2, 5, 4, 64, dtype=torch.float16)
    kv = torch.randn(2, 7, 2, 64, dtype=torch.float16)
    args = dict(q=q, k=kv, v=kv.clone(), key_mask=None, cu_q=None, cu_k=None, max_q=5, max_k=7,
                causal=False, scale=0.125, dropout_p=0.0, seed=0, out=torch.empty_like(q),
                lse=torch.empty(2, 4, 5), stream=0)
    args.update(override)
    return {k: _core.dl(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


@pytest.mark.skipif(_core._C is None or not hasattr(_core._C, "attn_fwd"), reason="fusedlm._C is not built")
@pytest.mark.parametrize("override, error, match", [
    (dict(q=torch.randn(2, 5, 4, 64)), TypeError, "q must be float16 or bfloat16"),
    (dict(k=torch.randn(2, 7, 2, 64, dtype=torch.bfloat16)), TypeError, "k must have q's dtype"),
    (dict(q=torch.randn(2, 5, 4, 80, dtype=torch.float16)), ValueError, "head dim must be one of 32, 64, 96, 128"),
    (dict(k=torch.randn(2, 7, 3, 64, dtype=torch.float16), v=torch.randn(2, 7, 3, 64, dtype=torch.float16)),
     ValueError, "must divide"),
    (dict(v=torch.randn(2, 6, 2, 64, dtype=torch.float16)), ValueError, "v must have k's shape"),
    (dict(key_mask=torch.ones(2, 6, dtype=torch.int8)), ValueError, r"key_mask must have shape \(2, 7\)"),
    (dict(key_mask=torch.ones(2, 7, dtype=torch.bool)), TypeError, "key_mask must be int8"),
    (dict(lse=torch.empty(2, 5, 4)), ValueError, "lse must be contiguous float32"),
    (dict(out=torch.empty(2, 5, 4, 32, dtype=torch.float16)), ValueError, "out must have q's shape"),
    (dict(max_q=4), ValueError, "max_seqlen must equal"),
    (dict(cu_q=torch.tensor([0, 5], dtype=torch.int32)), ValueError, "go together"),
    (dict(dropout_p=1.0), ValueError, r"dropout_p must be in \[0, 1\)"),
    pytest.param({}, ValueError, "q must be a CUDA tensor", marks=not_emulated),
    # Asking for the Hopper kernel changes nothing about what is validated, or in what order.
    (dict(wgmma=True, q=torch.randn(2, 5, 4, 64)), TypeError, "q must be float16 or bfloat16"),
    pytest.param(dict(wgmma=True), ValueError, "q must be a CUDA tensor", marks=not_emulated),
])
def test_core_attention_validation(override, error, match):
    with pytest.raises(error, match=match):
        _core._C.attn_fwd(**_attn_args(**override))


def test_cuda_forward_kernel_setting(monkeypatch):
    monkeypatch.setattr(attention_kernels, "cuda_kernels", "mma")
    assert attention_kernels.wgmma_requested() is False
    monkeypatch.setattr(attention_kernels, "cuda_kernels", "wgmma")
    assert attention_kernels.wgmma_requested() is True
    with attention_kernels.using_cuda_kernels("mma"):
        assert attention_kernels.wgmma_requested() is False
    assert attention_kernels.cuda_kernels == "wgmma"  # restored
    with pytest.raises(ValueError, match="name must be one of"):
        with attention_kernels.using_cuda_kernels("hopper"):
            pass
    monkeypatch.setattr(attention_kernels, "cuda_kernels", "hopper")
    with pytest.raises(ValueError, match=r"FUSEDLM_CUDA_ATTENTION .* must be one of \('mma', 'wgmma'\), got 'hopper'"):
        attention_kernels.wgmma_requested()


class _RecordingCore:
    """Stands in for fusedlm._C's attention entry points: records whether each call asked for
    the wgmma kernels (the last argument) and answers as the real ones do."""

    def __init__(self):
        self.asked = []

    def _call(self, direction, wgmma):
        self.asked.append((direction, wgmma))
        return "wgmma" if wgmma else "mma"

    def attn_fwd(self, *args):
        return self._call("fwd", args[-1])

    def attn_bwd(self, *args):
        return self._call("bwd", args[-1])


@pytest.mark.parametrize("path", ["eager", "custom op"])
def test_cuda_kernel_choice_at_the_forward_holds_for_its_backward(monkeypatch, path):
    """The backward runs the kernels its forward chose, wherever it runs: training code calls
    loss.backward() outside the block that chose the forward's kernels."""
    core = _RecordingCore()
    monkeypatch.setattr(_core, "_C", core)
    monkeypatch.setattr(_core, "dl", lambda t: t)
    monkeypatch.setattr(_core, "stream_of", lambda t: 0)
    monkeypatch.setattr(attention_kernels, "cuda_kernels", "mma")
    q = torch.randn(1, 4, 2, 64, requires_grad=True)
    args = (q, q, q, None, None, None, 4, 4, False, 0.125, 0.0, 0, False, -1, -1, 0.0, None)

    def forward():  # the kernels named at the call, as ops.attention names them
        if path == "eager":
            return _fused(*args, attention_kernels.kernel_for("cuda"))[0]
        return torch.ops.fusedlm.attn_fwd(*args[:11], torch.tensor(0), *args[12:],
                                          attention_kernels.kernel_for("cuda"))[0]

    with attention_kernels.using_cuda_kernels("wgmma"):
        out = forward()
    torch.autograd.grad(out, q, torch.ones_like(out))
    out = forward()
    with attention_kernels.using_cuda_kernels("wgmma"):
        torch.autograd.grad(out, q, torch.ones_like(out))
    assert core.asked == [("fwd", True), ("bwd", True), ("fwd", False), ("bwd", False)]
    assert attention_kernels.last_cuda_backward_kernel == "mma"
    # Other backends pass through untouched, whatever the setting.
    with attention_kernels.using_cuda_kernels("wgmma"):
        assert attention_kernels.kernel_for("triton") == "triton"


@pytest.mark.skipif(_core._C is None or not hasattr(_core._C, "attn_fwd"), reason="fusedlm._C is not built")
def test_core_attention_varlen_validation():
    q = torch.randn(9, 4, 32, dtype=torch.bfloat16)
    cu = torch.tensor([0, 4, 9], dtype=torch.int32)
    base = dict(q=q, k=q.clone(), v=q.clone(), cu_q=cu, cu_k=cu, max_q=5, max_k=5,
                out=torch.empty_like(q), lse=torch.empty(4, 9))
    with pytest.raises(TypeError, match="cu_seqlens_q must be int32"):
        _core._C.attn_fwd(**_attn_args(**{**base, "cu_q": cu.long()}))
    with pytest.raises(ValueError, match=r"cu_seqlens_k must have shape \(3,\)"):
        _core._C.attn_fwd(**_attn_args(**{**base, "cu_k": torch.tensor([0, 9], dtype=torch.int32)}))
    with pytest.raises(ValueError, match="key_mask is for dense batches"):
        _core._C.attn_fwd(**_attn_args(**{**base, "key_mask": torch.ones(2, 5, dtype=torch.int8)}))
    if not _core.EMULATED:  # the emulated core runs CPU tensors
        with pytest.raises(ValueError, match="q must be a CUDA tensor"):
            _core._C.attn_fwd(**_attn_args(**base))
    bwd = _attn_args(**base, dout=q, delta=torch.empty(9, 4), dq=q, dk=q, dv=q)
    with pytest.raises(ValueError, match="delta must be contiguous float32"):
        _core._C.attn_bwd(**bwd)
    with pytest.raises(ValueError, match="delta must be contiguous float32"):
        _core._C.attn_bwd(**bwd, wgmma=True)
    # The backward takes the forward's output (it computes delta = rowsum(dO * O) itself).
    with pytest.raises(ValueError, match=r"out must have q's shape \(9, 4, 32\)"):
        _core._C.attn_bwd(**_attn_args(**{**base, "out": q[:4]}, dout=q,
                                       delta=torch.empty(4, 9), dq=q, dk=q, dv=q))


@pytest.mark.skipif(_core._C is None or not hasattr(_core._C, "dropout_keep"), reason="fusedlm._C is not built")
def test_cuda_kernel_draws_the_triton_kernels_dropout_mask():
    """The CUDA C++ attention's dropout draw (common/philox.h, run here on the host) keeps
    exactly what the Triton kernels keep: stream seed + b * heads + h, query rows, key columns,
    four keys a Philox draw, the counter in 32 bits. seq_k 23 is not a multiple of 4: a row's
    last draw has words no key uses."""
    if "triton" not in KERNELS:
        pytest.skip("needs the Triton kernels")
    b, h, sq, sk, p, seed = 2, 3, 19, 23, 0.3, 1234
    keep = dropout_mask(b, h, sq, sk, p, seed, device=DEVICE).cpu()
    for stream in range(b * h):
        host = torch.tensor(_core._C.dropout_keep(seed + stream, sq, sk, p, True)).view(sq, sk)
        assert torch.equal(host, keep.view(b * h, sq, sk)[stream].bool()), stream
    assert abs(keep.float().mean().item() - (1 - p)) < 0.05


def test_launcher_runs_the_autotuner_once_per_class(monkeypatch):
    """After the autotuner's first run for a class (flags, dtype, length bucket: its own key),
    the launcher launches the chosen config directly, with the grid that config's blocks give."""
    triton = pytest.importorskip("triton")
    from fusedlm.ops import _triton
    kern = _triton.kernels("attention")
    chosen = triton.Config({"BLOCK_M": 64, "BLOCK_N": 32}, num_warps=8, num_stages=3)
    log = []

    class Tuner:
        best_config = chosen

        def __getitem__(self, grid):
            def run(*args, **flags):
                assert args[-1] in (256, 4096)  # the bucket: the kernel's last runtime argument
                log.append(("tuner", grid({"BLOCK_M": 64, "BLOCK_N": 32}), flags["CAUSAL"]))
            return run

    class Kernel:
        def __getitem__(self, grid):
            def run(*args, **kw):
                log.append(("direct", grid, kw["CAUSAL"], kw["BLOCK_M"], kw["num_warps"]))
            return run

    tuning = kern.Tuning({"fwd": Tuner(), "dkdv": Tuner()})
    x16, x32 = torch.empty(1, dtype=torch.float16), torch.empty(1)
    for causal, x, name, bucket in ((False, x16, "fwd", 256), (False, x16, "fwd", 256),
                                    (True, x16, "fwd", 256), (True, x16, "fwd", 256),
                                    (False, x32, "fwd", 256), (False, x16, "fwd", 4096),
                                    (False, x16, "dkdv", 256)):
        kern._launch(name, Kernel(), 200, 6, False, 64, bucket, (x,), dict(CAUSAL=causal),
                     tuning=tuning)
    assert log == [("tuner", (4, 6), False), ("direct", (4, 6), False, 64, 8),
                   ("tuner", (4, 6), True), ("direct", (4, 6), True, 64, 8),
                   ("tuner", (4, 6), False),  # another dtype: another class
                   ("tuner", (4, 6), False),  # another sequence-length bucket
                   ("tuner", (7, 6), False)]  # dK/dV: a program per BLOCK_N keys
    log.clear()
    kern._launch("fwd", Kernel(), 200, 6, True, 64, 256, (x16,), dict(CAUSAL=False),
                 tuning=tuning)  # pinned
    assert log == [("direct", (4, 6), False, 64, 4)]
    log.clear()
    forgetful = kern.Tuning({"fwd": Tuner()}, remember=False)  # a sweep: the autotuner each time
    for _ in range(2):
        kern._launch("fwd", Kernel(), 200, 6, False, 64, 256, (x16,), dict(CAUSAL=False),
                     tuning=forgetful)
    assert log == [("tuner", (4, 6), False)] * 2 and forgetful.chosen == {}


ATOMIC_DQ_CASES = {
    # keys past the sequence (scores 0, so P may be anything there: it must not reach dQ), and
    # queries that see no key
    "causal sq<sk": lambda: run_dense("triton", torch.float16, 2, 37, 45, 2, 2, 32, causal=True),
    "causal sq>sk": lambda: run_dense("triton", torch.float16, 2, 53, 37, 2, 2, 32, causal=True),
    "head dim 24, one key": lambda: run_dense("triton", torch.float16, 1, 70, 1, 2, 2, 24,
                                              causal=True),
    "head dim 96": lambda: run_dense("triton", torch.float16, 2, 37, 45, 2, 2, 96, causal=True),
    "padding mask, an empty row": lambda: test_padding_mask_with_an_empty_row("triton", False),
    "grouped heads": lambda: test_grouped_query_heads("triton", 6, 3),
    "packed, an empty sequence": lambda: test_varlen_matches_the_padded_reference(
        "triton", True, [5, 0, 33, 17, 1]),
    "packed cross-attention": lambda: test_varlen_cross_attention_with_unequal_lengths("triton",
                                                                                       True),
    "dropout, grouped heads": lambda: test_dropout_matches_reference_given_the_keep_mask("triton",
                                                                                         1),
    "softcap, window, alibi, mask": lambda: test_softcap_forward_and_backward("triton", True,
                                                                              (5, 0), True),
    "block edges, mask": lambda: test_kernels_at_block_edges((16, 32), True),
    "hugging face layout": lambda: test_hugging_face_layout_with_unequal_lengths("triton", 5, 3),
}


@pytest.mark.skipif("triton" not in KERNELS, reason="needs the Triton kernels")
@pytest.mark.parametrize("case", list(ATOMIC_DQ_CASES))
def test_atomic_dq_backward(case, monkeypatch):
    """FlashAttention-2's backward (FUSEDLM_TRITON_ATOMIC_DQ: dK/dV adds dQ's shares into an fp32
    accumulator, a delta pass before it), run by the interpreter through the default path's own
    tests: forward and gradients against float64. What it must keep out of dQ, which the dK/dV
    kernel alone could leave in rows it drops: keys past a sequence, keys under the padding
    mask, dropped probabilities, the other packed sequences."""
    launched = atomic_dq_launches(monkeypatch)
    ATOMIC_DQ_CASES[case]()
    names = {name for name, _ in launched}
    assert names == {"fwd", "dkdv_dq"}, launched  # no dQ kernel, no plain dK/dV


@pytest.mark.skipif("triton" not in KERNELS, reason="needs the Triton kernels")
@pytest.mark.parametrize("case", ["causal sq<sk", "packed, an empty sequence", "head dim 24"])
def test_atomic_dq_backward_on_the_tma_path(case, monkeypatch):
    """Both opt-ins at once: dK/dV reads Q and dO through tensor descriptors, whose blocks past a
    sequence read as zeros, and adds dQ's shares with masked atomics. (A TMA reduce-add through
    a descriptor over the accumulator, FlashAttention-3's way, is not used: Triton's interpreter
    has no descriptor reduce, so no CPU test could check it.)"""
    launched = atomic_dq_launches(monkeypatch)
    tma_launches(monkeypatch)
    if case == "causal sq<sk":
        run_dense("triton", torch.float16, 2, 37, 45, 2, 2, 32, causal=True)
    elif case == "head dim 24":
        run_dense("triton", torch.float16, 2, 37, 37, 2, 2, 24)
    else:
        test_varlen_matches_the_padded_reference("triton", True, [5, 0, 33, 17, 1])
    grouped = case.startswith("packed")  # 4 query heads on 2 key heads: dK/dV keeps its loads
    assert ("dkdv_dq", not grouped) in launched, launched
    assert {n for n, _ in launched} == {"fwd", "dkdv_dq"}, launched


@pytest.mark.skipif("triton" not in KERNELS, reason="needs the Triton kernels")
def test_a_measured_atomic_dq_choice_reaches_the_launcher(monkeypatch):
    """kernel_for's "triton-atomic-dq" (the measured table's `triton_kernels`, once GPU-verified)
    takes the atomic-dQ backward with FUSEDLM_TRITON_ATOMIC_DQ off, saved with the forward for
    its backward; the results match float64. deterministic=True still keeps the dQ kernel."""
    from fusedlm.ops import _triton
    kern = _triton.kernels("attention")
    monkeypatch.setattr(kern, "ATOMIC_DQ", False)
    monkeypatch.setattr(attention_kernels, "kernel_for",
                        lambda backend, case=None: "triton-atomic-dq" if backend == "triton" else backend)
    seen, launch = [], kern._launch

    def spy(name, *args, **kwargs):
        seen.append(name)
        return launch(name, *args, **kwargs)
    monkeypatch.setattr(kern, "_launch", spy)
    run_dense("triton", torch.float16, 2, 37, 45, 2, 2, 32, causal=True)
    assert set(seen) == {"fwd", "dkdv_dq"}, seen
    seen.clear()
    q, k, v = make(1, 20, 20, 2, 2, 32, torch.float16)
    fusedlm.attention(q, k, v, deterministic=True, backend="triton").sum().backward()
    assert set(seen) == {"fwd", "dq", "dkdv"}, seen


@pytest.mark.skipif("triton" not in KERNELS, reason="needs the Triton kernels")
def test_atomic_dq_backward_is_never_taken_where_it_must_not_be(monkeypatch):
    """deterministic=True keeps the dQ kernel (the atomics' order varies from run to run), and so
    does a head dim over 128 (no block of dK/dV with dQ's product there)."""
    launched = atomic_dq_launches(monkeypatch)
    for d, deterministic, p in ((32, True, 0.0), (160, False, 0.0), (160, False, 0.1)):
        q, k, v = make(1, 20, 20, 2, 2, d, torch.float16)
        out = fusedlm.attention(q, k, v, deterministic=deterministic, dropout_p=p,
                                backend="triton")
        out.sum().backward()
        assert {name for name, _ in launched} == {"fwd", "dq", "dkdv"}, (d, launched)
        launched.clear()


@pytest.mark.skipif("triton" not in KERNELS, reason="needs the Triton kernels")
def test_autotuning_candidates_per_class():
    """The autotuner's prune gives every kernel candidates at every head dim in every class the
    models train in; a class leaves out the blocks SPILLS_IN_CLASS lists for it (kernel_facts.py
    compiles the rest of each class in CI), and keeps them all where it would leave none; the
    list names only real candidates. dK/dV with dQ's shares serves head dims up to 128, in every
    class."""
    from fusedlm.ops import _triton
    kern = _triton.kernels("attention")
    shape = lambda c: (c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.num_warps, c.num_stages)  # noqa: E731
    classes = [{}, {"DROPOUT": True}, {"IS_VARLEN": True}, {"IS_VARLEN": True, "DROPOUT": True},
               {"HAS_KMASK": True, "DROPOUT": True}]
    for name in ("fwd", "dkdv", "dq"):
        prune = kern._candidates_of(name)
        for block_d in (16, 32, 64, 128, 256):
            for flags in classes:
                call = dict({f: False for f in ("DROPOUT", "IS_VARLEN", "HAS_KMASK")}, **flags)
                chosen = prune([], {}, BLOCK_D=block_d, **call)
                assert chosen, (name, block_d, flags)
                assert chosen == (kern.configs(name, block_d, **flags)
                                  or kern.configs(name, block_d)), (name, block_d, flags)
    assert kern.configs("fwd", 256, IS_VARLEN=True, DROPOUT=True) == []  # every block spills:
    assert len(kern._candidates_of("fwd")([], {}, BLOCK_D=256, IS_VARLEN=True, DROPOUT=True,
                                          HAS_KMASK=False)) == 2  # the prune keeps them all
    for needs, by_kernel in kern.SPILLS_IN_CLASS:
        for name, by_dim in by_kernel.items():
            for dim, spilling in by_dim.items():
                assert set(spilling) <= set(kern.CANDIDATES[name][dim]), (needs, name, dim)
                kept = {shape(c) for c in kern.configs(name, dim, **{f: True for f in needs})}
                assert not kept & set(spilling), (needs, name, dim)
    assert kern.configs("dkdv_dq", 32) and kern.configs("dkdv_dq", 256) == []
    for flags in classes:  # BERT's classes too: one block serves them all
        assert kern.configs("dkdv_dq", 64, **flags) and kern.configs("dkdv_dq", 128, **flags), flags


@pytest.mark.skipif("triton" not in KERNELS, reason="needs the Triton kernels")
@pytest.mark.parametrize("case", ["causal sq<sk", "padding mask, grouped heads", "head dim 24",
                                  "packed"])
def test_tma_path(case, monkeypatch):
    """The opt-in Hopper path of the three kernels (FUSEDLM_TRITON_TMA: tensor descriptors; the
    forward's key loop warp-specialized; dK/dV's with one query head a key head), run here by
    the interpreter: the rows past a sequence (a block's tail, the next packed sequence) and the
    columns past an unaligned head dim read as zeros, as the masked loads' do; forward and
    gradients against float64."""
    launched = tma_launches(monkeypatch)
    dtype = torch.float16
    if case == "packed":
        lens = [5, 0, 37, 20]  # an empty sequence: its descriptors still need a positive extent
        cu = torch.tensor([0, 5, 5, 42, 62], dtype=torch.int32, device=DEVICE)
        q, k, v = (t[0] for t in make(1, 62, 62, 2, 2, 32, dtype, seed=6))
        out = fusedlm.attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal=True,
                                       backend="triton")
        do = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(DEVICE, dtype)
        grads = torch.autograd.grad(out, (q, k, v), do)
        f64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
        outs = []
        for a, b in zip(cu.tolist(), cu.tolist()[1:]):
            if b > a:
                o, _ = reference.attention(*(t[None, a:b] for t in f64), causal=True)
                outs.append(o[0])
        ref = torch.cat(outs)
        compare(out, ref, grads, torch.autograd.grad(ref, f64, do.double()), dtype)
    elif case == "causal sq<sk":
        run_dense("triton", dtype, 2, 37, 45, 2, 2, 32, causal=True)
    elif case == "padding mask, grouped heads":
        mask = torch.ones(2, 45, dtype=torch.bool, device=DEVICE)
        mask[1, 30:] = False
        run_dense("triton", dtype, 2, 29, 45, 4, 2, 64, mask=mask)
    else:
        run_dense("triton", dtype, 2, 37, 37, 2, 2, 24)
    assert {name for name, _ in launched} == {"fwd", "dq", "dkdv"}, launched
    grouped = case == "padding mask, grouped heads"  # dK/dV keeps its loads there
    assert all(tma != (grouped and name == "dkdv") for name, tma in launched), launched


def _fused_qkv(b, s, h, d, dtype, packed):
    """A (rows, 3, heads, D) fused QKV tensor, (b * s, ...) packed or (b, s, ...) dense."""
    g = torch.Generator().manual_seed(3)
    lead = (b * s,) if packed else (b, s)
    return torch.randn(*lead, 3, h, d, generator=g).to(DEVICE, dtype).requires_grad_()


@pytest.mark.parametrize("backend", BACKENDS + (["cuda"] if EMULATED else []))
@pytest.mark.parametrize("packed", [False, True])
@pytest.mark.parametrize("causal", [False, True])
def test_split_qkv_gradient_is_the_three_gradients_in_qkvs_layout(backend, packed, causal):
    """split_qkv's views give what three separate tensors give, forward and backward (the
    gradient laid out as qkv, whichever way it was assembled), against float64."""
    b, s, h, d = 2, 19, 2, 32
    qkv = _fused_qkv(b, s, h, d, torch.float16, packed)
    q, k, v = fusedlm.ops.split_qkv(qkv)
    assert q.data_ptr() == qkv.data_ptr() and k.stride() == qkv[..., 1, :, :].stride()  # views
    cu = torch.tensor([0, 7, b * s], dtype=torch.int32, device=DEVICE)
    if packed:
        out = fusedlm.attention_varlen(q, k, v, cu, cu, b * s - 7, b * s - 7, causal=causal,
                                       backend=backend)
    else:
        out = fusedlm.attention(q, k, v, causal=causal, backend=backend)
    do = torch.randn(out.shape, generator=torch.Generator().manual_seed(4)).to(DEVICE)
    (dqkv,) = torch.autograd.grad(out, qkv, do.half())
    assert dqkv.shape == qkv.shape and dqkv.is_contiguous()
    ref_qkv = qkv.detach().double().requires_grad_()
    qs, ks, vs = ref_qkv.unbind(-3)
    if packed:
        ref = torch.cat([reference.attention(*(t[None, lo:hi] for t in (qs, ks, vs)), causal=causal)[0][0]
                         for lo, hi in ((0, 7), (7, b * s))])
    else:
        ref = reference.attention(qs, ks, vs, causal=causal)[0]
    (want,) = torch.autograd.grad(ref, ref_qkv, do)
    compare(out, ref, [dqkv], [want], torch.float16)


@pytest.mark.skipif("triton" not in KERNELS, reason="the Triton kernels cannot run here")
@pytest.mark.parametrize("packed", [False, True])
def test_split_qkv_backward_copies_nothing(packed):
    """The attention kernels write dq, dk and dv into one buffer and split_qkv's backward hands
    it on: no stack (a read and a write of every gradient element) after the two kernels; the
    buffer's values are exactly the separate gradients'."""
    from fusedlm.bench import host
    b, s, h, d = 2, 24, 2, 64
    qkv = _fused_qkv(b, s, h, d, torch.float16, packed)
    cu = torch.tensor([0, 24, 48], dtype=torch.int32, device=DEVICE)

    def call(q, k, v):
        if packed:
            return fusedlm.attention_varlen(q, k, v, cu, cu, s, s, backend="triton",
                                            check_offsets=False)
        return fusedlm.attention(q, k, v, backend="triton")
    do = torch.ones(qkv.shape[:-3] + qkv.shape[-2:], dtype=torch.float16, device=DEVICE)
    with host.launches_stubbed():
        counts = host.count_launches(
            lambda: torch.autograd.grad(call(*fusedlm.ops.split_qkv(qkv)), qkv, do))
    assert counts == (0, 2, 0)
    (dqkv,) = torch.autograd.grad(call(*fusedlm.ops.split_qkv(qkv)), qkv, do)
    sep = [t.detach().clone().requires_grad_() for t in qkv.unbind(-3)]
    want = torch.autograd.grad(call(*sep), sep, do)
    assert all(torch.equal(got, w) for got, w in zip(dqkv.unbind(-3), want))


def test_split_qkv_stacks_gradients_it_cannot_pass_on():
    """Gradients not laid out as one buffer (one of them unused, or from another op) are
    stacked; a tensor that is not (..., 3, heads, D) is refused by name."""
    qkv = torch.randn(5, 3, 2, 4, requires_grad=True)
    q, k, v = fusedlm.ops.split_qkv(qkv)
    (g,) = torch.autograd.grad((q * 2).sum() + v.sum(), qkv)
    assert torch.equal(g[:, 0], torch.full_like(q, 2.0)) and torch.equal(g[:, 1], torch.zeros_like(k))
    assert torch.equal(g[:, 2], torch.ones_like(v))
    with pytest.raises(ValueError, match="qkv must be a tensor of shape"):
        fusedlm.ops.split_qkv(torch.randn(5, 2, 2, 4))
