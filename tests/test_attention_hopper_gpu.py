"""GPU suite for the Hopper CUDA C++ kernels (csrc/attention/attention_hopper.cu: wgmma + TMA,
forward and backward, head dims 64 and 128), which run only when asked for
(FUSEDLM_CUDA_ATTENTION=wgmma) until they have passed here. Every test checks which kernels ran,
so a silent fallback to the mma.sync ones cannot pass for the wgmma ones; errors are bounded as in
test_attention_gpu.py (float64 reference, 2x PyTorch's own error in the same precision)."""
import math

import pytest
import torch

import fusedlm
from fusedlm import reference
from fusedlm.ops import dispatch
from fusedlm.ops import attention_kernels
from fusedlm.ops.attention import _forward
from conftest import HAS_GPU, TOL, rel_err, sdpa
from test_attention_gpu import _qkv

pytestmark = pytest.mark.gpu


def _unavailable():
    if not HAS_GPU:
        return "needs a GPU"
    why = dispatch.why_not("attention", "cuda", ("cuda", torch.bfloat16, 64))
    if why is not None:
        return why
    if torch.cuda.get_device_capability() != (9, 0):
        return f"needs an sm_90 GPU, got {torch.cuda.get_device_capability()}"
    return None


@pytest.fixture
def wgmma(monkeypatch):
    """Selects the wgmma forward; skips where this build or GPU cannot run it at all."""
    why = _unavailable()
    if why is not None:
        pytest.skip(why)
    monkeypatch.setattr(attention_kernels, "cuda_kernels", "wgmma")
    q = torch.zeros(1, 8, 1, 64, device="cuda", dtype=torch.bfloat16)
    fusedlm.attention(q, q, q, backend="cuda")
    ran = attention_kernels.last_cuda_forward_kernel
    if ran != "wgmma" and "build has no sm_90a" in ran:
        pytest.skip(ran)
    return None


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_wgmma_primitives_read_the_hardware_as_assumed_gpu(head_dim, dtype):
    """The kernels' primitives one at a time (attention_kernels.probe_wgmma), before any kernel:
    TMA's 128-byte swizzle places q's tile exactly where the kernels' descriptors (and the CPU
    emulator) expect it; q k^T from K-major operands and p v from A fragments and MN-major v
    match float64 within fp32 accumulation. A failure here names the misread primitive."""
    why = _unavailable()
    if why is not None:
        pytest.skip(why)
    errors = attention_kernels.probe_wgmma(head_dim, dtype)
    assert errors["tma_swizzle"] == 0.0, errors
    assert max(errors["wgmma_ss"], errors["wgmma_ss_n128"], errors["wgmma_rs"]) < 1e-4, errors


def _ran_wgmma(backward=False):
    assert attention_kernels.last_cuda_forward_kernel == "wgmma", attention_kernels.last_cuda_forward_kernel
    if backward:
        assert attention_kernels.last_cuda_backward_kernel == "wgmma", attention_kernels.last_cuda_backward_kernel


def _check_fwd_bwd(q, k, v, **kw):
    out = fusedlm.attention(q, k, v, backend="cuda", **kw)
    _ran_wgmma()
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), do)
    _ran_wgmma(backward=True)
    f64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    mask = kw.get("attention_mask")
    ref, _ = reference.attention(*f64, causal=kw.get("causal", False), key_mask=mask)
    want = torch.autograd.grad(ref, f64, do.double())
    theirs = sdpa(q, k, v, kw.get("causal", False), mask)
    theirs_g = torch.autograd.grad(theirs, (q, k, v), do)
    tol = TOL[q.dtype]
    assert rel_err(out, ref) < max(tol, 2 * rel_err(theirs, ref))
    for a, r, t in zip(got, want, theirs_g):
        assert rel_err(a, r) < max(tol, 2 * rel_err(t, r))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d", [64, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("s,sk", [(128, 128), (1023, 1023), (300, 700), (700, 300), (2048, 2048)])
def test_wgmma_forward_gpu(wgmma, dtype, d, causal, s, sk):
    """One block and many, ragged ends, Sq != Sk both ways (causal bottom-right), GQA."""
    _check_fwd_bwd(*_qkv(2, s, 4, 2, d, dtype, sk), causal=causal)


@pytest.mark.parametrize("d", [64, 128])
def test_wgmma_log_sum_exp_gpu(wgmma, d):
    q, k, v = (t.detach() for t in _qkv(2, 333, 4, 4, d, torch.bfloat16, 517))
    mask = torch.arange(517, device="cuda")[None, :] < torch.tensor([[517], [200]], device="cuda")
    scale = d ** -0.5
    _, lse = _forward(q, k, v, mask.to(torch.int8), None, None, 333, 517, False, scale,
                               0.0, 0, None, -1, -1, 0.0, None, attention_kernels.kernel_for("cuda"))
    _ran_wgmma()
    _, want = reference.attention(q.double(), k.double(), v.double(), key_mask=mask)
    assert torch.allclose(lse.double() * math.log(2), want, atol=1e-3, rtol=1e-3)


def test_wgmma_padding_mask_and_varlen_gpu(wgmma):
    q, k, v = _qkv(8, 512, 12, 12, 64, torch.bfloat16)
    lens = torch.randint(64, 513, (8,), generator=torch.Generator().manual_seed(1))
    lens[0] = 512
    mask = (torch.arange(512)[None, :] < lens[:, None]).cuda()
    _check_fwd_bwd(q, k, v, attention_mask=mask)
    out = fusedlm.attention(q, k, v, attention_mask=mask, backend="cuda").detach()
    packed = [fusedlm.unpad(t.detach(), mask) for t in (q, k, v)]
    _, _, cu, max_len = packed[0]
    out_p = fusedlm.attention_varlen(packed[0][0], packed[1][0], packed[2][0], cu, cu, max_len, max_len,
                                     backend="cuda")
    _ran_wgmma()
    assert rel_err(out_p, out[mask]) < 1e-2


def test_wgmma_varlen_causal_gpu(wgmma):
    lens = [1, 127, 128, 129, 300, 64]
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32).cuda()
    total = sum(lens)
    g = torch.Generator(device="cuda").manual_seed(5)
    q, k, v = (torch.randn(total, 4, 128, device="cuda", generator=g).to(torch.bfloat16) for _ in range(3))
    out = fusedlm.attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal=True, backend="cuda")
    _ran_wgmma()
    ref, _ = reference.attention_varlen(q.double(), k.double(), v.double(), cu.cpu(), cu.cpu(), causal=True)
    assert rel_err(out, ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("d", [64, 128])
def test_wgmma_rows_past_a_pack_are_never_read_gpu(wgmma, d):
    """TMA loads whole blocks: rows past a sequence's end (the next sequence's, or unused key rows
    holding NaN here) must be zeroed before the products read them, as the mma.sync kernels
    read zeros there (the CPU emulator found this before any GPU ran the kernels)."""
    lens, spare = [5, 140, 64, 300], 9
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32).cuda()
    total = sum(lens)
    g = torch.Generator(device="cuda").manual_seed(13)
    nan_tail = lambda n: torch.cat([torch.randn(total, n, d, device="cuda", generator=g),
                                    torch.full((spare, n, d), float("nan"), device="cuda")])
    q = torch.randn(total, 4, d, device="cuda", generator=g).to(torch.bfloat16).requires_grad_()
    k, v = (nan_tail(2).to(torch.bfloat16).requires_grad_() for _ in range(2))
    out = fusedlm.attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal=True, backend="cuda")
    _ran_wgmma()
    do = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    _ran_wgmma(backward=True)
    assert not dk[total:].any() and not dv[total:].any()
    real = [t.detach()[:total].double().requires_grad_() for t in (q, k, v)]
    ref, _ = reference.attention_varlen(*real, cu.cpu(), cu.cpu(), causal=True)
    want = torch.autograd.grad(ref, real, do.double())
    for got, r in zip((out, dq, dk, dv), (ref, *want)):
        assert torch.isfinite(got[:total]).all() and rel_err(got[:total], r) < 2 * TOL[torch.bfloat16]


def test_wgmma_empty_rows_gpu(wgmma):
    """A sequence whose keys are all masked gives zeros and finite gradients."""
    q, k, v = _qkv(3, 200, 4, 2, 64, torch.float16)
    mask = torch.ones(3, 200, dtype=torch.bool, device="cuda")
    mask[1] = False
    mask[2, 77:] = False
    out = fusedlm.attention(q, k, v, attention_mask=mask, backend="cuda")
    _ran_wgmma()
    assert torch.all(out[1] == 0)
    grads = torch.autograd.grad(out, (q, k, v), torch.randn_like(out))
    _ran_wgmma(backward=True)
    assert all(torch.isfinite(g).all() for g in grads)
    assert torch.all(grads[0][1] == 0)  # nothing attended: no gradient for those queries
    ref, _ = reference.attention(*(t.detach().double() for t in (q, k, v)), key_mask=mask)
    assert rel_err(out[2], ref[2]) < 2 * TOL[torch.float16]


@pytest.mark.parametrize("d", [64, 128])
def test_wgmma_head_major_layout_gpu(wgmma, d):
    """(batch, heads, seq, D) tensors, as Hugging Face models hold them, taken by strides: the
    tensor maps order their dims by stride; the result is bitwise the contiguous one's."""
    g = torch.Generator(device="cuda").manual_seed(4)
    bhsd = [torch.randn(2, 4, 300, d, device="cuda", generator=g).to(torch.bfloat16) for _ in range(3)]
    views = [t.transpose(1, 2) for t in bhsd]
    outs = [fusedlm.attention(*ts, causal=True, backend="cuda") for ts in (views, [t.contiguous() for t in views])]
    _ran_wgmma()
    assert torch.equal(outs[0], outs[1])


def test_wgmma_long_sequence_gpu(wgmma):
    q, k, v = (t.detach() for t in _qkv(1, 16384, 4, 4, 128, torch.bfloat16))
    out = fusedlm.attention(q, k, v, causal=True, backend="cuda")
    _ran_wgmma()
    assert rel_err(out, sdpa(q, k, v, True)) < 2e-2


def test_wgmma_dropout_gpu(wgmma, monkeypatch):
    """The wgmma kernels drop what the reference drops given the same keep-mask (the mma.sync and
    Triton kernels' draws), forward and backward, and agree with the mma.sync kernels."""
    from fusedlm.ops.attention import dropout_mask
    q, k, v = _qkv(2, 257, 4, 4, 64, torch.bfloat16)
    out = fusedlm.attention(q, k, v, causal=True, dropout_p=0.1, seed=11, backend="cuda")
    do = torch.randn_like(out)
    got = torch.autograd.grad(out, (q, k, v), do)
    _ran_wgmma(backward=True)
    keep = dropout_mask(2, 4, 257, 257, 0.1, 11)
    f64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = reference.attention(*f64, causal=True, dropout_p=0.1, dropout_keep=keep)
    want = torch.autograd.grad(ref, f64, do.double())
    assert rel_err(out, ref) < 2 * TOL[torch.bfloat16]
    for a, r in zip(got, want):
        assert rel_err(a, r) < 2 * TOL[torch.bfloat16]
    monkeypatch.setattr(attention_kernels, "cuda_kernels", "mma")
    other = fusedlm.attention(q, k, v, causal=True, dropout_p=0.1, seed=11, backend="cuda")
    assert attention_kernels.last_cuda_forward_kernel == "mma"
    assert rel_err(out, other) < 2 * TOL[torch.bfloat16]


def test_wgmma_declines_what_it_does_not_cover_gpu(wgmma):
    """Head dims other than 64 and 128, and rows that are not 16-byte aligned, go to the mma.sync
    kernel, which says why."""
    q, k, v = (t.detach() for t in _qkv(2, 100, 4, 4, 96, torch.bfloat16))
    out = fusedlm.attention(q, k, v, backend="cuda")
    assert attention_kernels.last_cuda_forward_kernel.startswith("mma (wgmma declined: head dim 96")
    ref, _ = reference.attention(q.double(), k.double(), v.double())
    assert rel_err(out, ref) < TOL[torch.bfloat16]
    wide = torch.randn(2, 100, 4, 65, device="cuda").to(torch.bfloat16)
    view = wide[..., 1:]
    fusedlm.attention(view, view, view, backend="cuda")
    assert "16-byte aligned" in attention_kernels.last_cuda_forward_kernel
