"""GPU suite for attention: bf16 and fp16, model-sized heads and sequences, against the float64
reference with the error bounded by 2x PyTorch's own (SDPA) error in the same precision.

The evidence a backend needs before automatic dispatch may choose it (see README)."""
import pytest
import torch
import torch.nn.functional as F

import fusedlm
from fusedlm import reference
from fusedlm.ops import dispatch
from conftest import HAS_GPU, TOL, rel_err

pytestmark = pytest.mark.gpu
BACKENDS = ([b for b in ("triton", "cuda")
             if dispatch._OPS["attention"].why_not(b, ("cuda", torch.bfloat16, 64, False)) is None]
            if HAS_GPU else [])
DROPOUT_BACKENDS = BACKENDS


def _qkv(b, s, h, hk, d, dtype, sk=None):
    g = torch.Generator(device="cuda").manual_seed(0)
    sk = sk or s
    mk = lambda *shape: torch.randn(*shape, device="cuda", generator=g).to(dtype).requires_grad_()
    return mk(b, s, h, d), mk(b, sk, hk, d), mk(b, sk, hk, d)


def _sdpa(q, k, v, causal, mask=None):
    """PyTorch's own attention in this precision, as the bound for ours."""
    h, hk = q.shape[2], k.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if hk != h:
        kt, vt = (t.repeat_interleave(h // hk, dim=1) for t in (kt, vt))
    attn_mask = None
    if causal or mask is not None:
        attn_mask = reference.allowed_mask(q.shape[1], k.shape[1], causal=causal, key_mask=mask, device="cuda")
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=attn_mask).transpose(1, 2)


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
    theirs = _sdpa(q, k, v, causal)
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
    theirs = _sdpa(q, k, v, False, mask)
    ref, _ = reference.attention(*(t.detach().double() for t in (q, k, v)), key_mask=mask)
    assert rel_err(out[mask], ref[mask]) < max(TOL[torch.bfloat16], 2 * rel_err(theirs[mask], ref[mask]))
    packed = [fusedlm.unpad(t.detach(), mask) for t in (q, k, v)]
    _, _, cu, max_len = packed[0]
    out_p = fusedlm.attention_varlen(packed[0][0], packed[1][0], packed[2][0], cu, cu, max_len, max_len,
                                     backend=backend)
    assert rel_err(out_p, out.detach()[mask]) < 1e-2


@pytest.mark.parametrize("backend", BACKENDS)
def test_long_sequence_16k_gpu(backend):
    q, k, v = _qkv(1, 16384, 4, 4, 128, torch.bfloat16)
    out = fusedlm.attention(q, k, v, causal=True, backend=backend)
    grads = torch.autograd.grad(out.float().square().sum(), (q, k, v))
    theirs = _sdpa(q, k, v, True)
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
    """Views whose rows are not 16-byte aligned (the CUDA kernel then loads element by element
    instead of with 16-byte copies) give the same result as contiguous tensors."""
    g = torch.Generator(device="cuda").manual_seed(3)
    wide = [torch.randn(2, 200, 4, 65, device="cuda", generator=g).to(torch.bfloat16) for _ in range(3)]
    q, k, v = (t[..., 1:] for t in wide)
    assert q.stride(1) % 8 != 0 and q.data_ptr() % 16 != 0
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]  # contiguous copies
    views = [t.detach().requires_grad_() for t in (q, k, v)]
    outs = [fusedlm.attention(*ts, causal=True, backend=backend) for ts in (views, leaves)]
    assert torch.equal(outs[0], outs[1])
    do = torch.randn_like(outs[0])
    for a, c in zip(torch.autograd.grad(outs[0], views, do), torch.autograd.grad(outs[1], leaves, do)):
        assert torch.equal(a, c)


@pytest.mark.parametrize("backend", DROPOUT_BACKENDS)
def test_dropout_gpu(backend):
    from fusedlm.ops.fused_attention import dropout_mask
    q, k, v = _qkv(2, 257, 4, 4, 64, torch.bfloat16)
    out = fusedlm.attention(q, k, v, dropout_p=0.1, seed=11, backend=backend)
    keep = dropout_mask(2, 4, 257, 257, 0.1, 11)
    ref, _ = reference.attention(*(t.detach().double() for t in (q, k, v)), dropout_p=0.1, dropout_keep=keep)
    assert rel_err(out, ref) < 2 * TOL[torch.bfloat16]
    assert abs(keep.float().mean().item() - 0.9) < 0.01


@pytest.mark.skipif(set(BACKENDS) != {"triton", "cuda"}, reason="needs both kernels")
def test_cuda_and_triton_drop_the_same_probabilities_gpu():
    q, k, v = _qkv(2, 300, 4, 2, 64, torch.bfloat16)
    outs = [fusedlm.attention(q, k, v, causal=True, dropout_p=0.2, seed=7, backend=b) for b in ("triton", "cuda")]
    assert rel_err(outs[1], outs[0]) < 2 * TOL[torch.bfloat16]
    do = torch.randn_like(outs[0])
    grads = [torch.autograd.grad(o, (q, k, v), do) for o in outs]
    for a, c in zip(*grads):
        assert rel_err(c, a) < 4 * TOL[torch.bfloat16]
