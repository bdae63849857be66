"""GPU suite for the LM loss: every fused backend, bf16 included, at model-sized vocabularies.

The evidence a backend needs before automatic dispatch may choose it (see README)."""
import pytest
import torch

import fusedlm
from fusedlm import reference
from fusedlm.ops import dispatch
from conftest import HAS_GPU, TOL, check_row_kernel_ignores_past_v, rel_err

pytestmark = pytest.mark.gpu
BACKENDS = ([b for b in ("triton", "cuda") if dispatch.why_not("lm_loss", b, ("cuda", torch.bfloat16, 50257)) is None]
            if HAS_GPU else [])


def _inputs(tokens, hidden, vocab, dtype, labelled, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(tokens, hidden, device="cuda", generator=g).to(dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, device="cuda", generator=g) / hidden ** 0.5 * 2).to(dtype).requires_grad_()
    b = torch.randn(vocab, device="cuda", generator=g).to(dtype).requires_grad_()
    labels = torch.randint(0, vocab, (tokens,), device="cuda", generator=g)
    labels[torch.rand(tokens, device="cuda", generator=g) >= labelled] = -100
    return h, w, b, labels


def _grads(loss, ts):
    return torch.autograd.grad(loss, ts)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("vocab,hidden,tokens,labelled", [
    (30522, 768, 2048, 0.15),   # BERT MLM
    (50257, 768, 1024, 1.1),    # GPT-2, every row labelled
    (7, 128, 333, 0.5),         # tiny vocabulary, odd token count
    (128256, 256, 257, 1.1),    # large vocabulary, several kernel tiles per row
])
def test_lm_loss_gpu(backend, dtype, vocab, hidden, tokens, labelled):
    h, w, b, labels = _inputs(tokens, hidden, vocab, dtype, labelled)
    kw = dict(z_loss=1e-4, label_smoothing=0.1)
    out = fusedlm.lm_loss(h, w, labels, b, backend=backend, chunk_size=512, return_details=True, **kw)
    got = _grads(out.loss, (h, w, b))
    f64 = [t.detach().double().requires_grad_() for t in (h, w, b)]
    ref, details = reference.lm_loss(*f64[:2], labels, f64[2], **kw)
    want = _grads(ref, f64)
    theirs_loss, _ = reference.lm_loss(h, w, labels, b, **kw)  # PyTorch in this precision
    theirs = _grads(theirs_loss, (h, w, b))
    tol = TOL[dtype] if dtype != torch.float32 else 1e-3  # fp32 matmuls may use TF32 on the GPU
    assert rel_err(out.loss, ref) < max(tol, 2 * rel_err(theirs_loss, ref))
    for g, r, t in zip(got, want, theirs):
        assert rel_err(g, r) < max(tol, 2 * rel_err(t, r))
    assert int(out.count) == details["count"]
    if dtype == torch.float32:
        assert abs(float(out.accuracy) - float(details["accuracy"])) <= 2 / max(details["count"], 1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_unaligned_logits_row_gpu(backend):
    # V odd: the CUDA kernel's rows are not 16-byte aligned, so it takes its scalar path.
    h, w, b, labels = _inputs(300, 64, 30523, torch.bfloat16, 0.5)
    loss = fusedlm.lm_loss(h, w, labels, b, backend=backend)
    ref, _ = reference.lm_loss(*[t.detach().double() for t in (h, w)], labels, b.detach().double())
    assert rel_err(loss, ref) < TOL[torch.bfloat16]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["pitched", "storage_ends_at_v", "contiguous"])
def test_row_kernel_ignores_what_lies_past_v_gpu(backend, layout):
    """The compiled row kernels at GPT-2's vocabulary in bf16, at the driver's pitch (50264, not
    a multiple of 16 elements), on rows holding NaN past V: the last tile's 16-byte loads read it
    (where the storage allows) and must neither use it nor write it. The driver's own buffer
    holds zeros there, which a wrong kernel would barely show; NaN shows any use."""
    check_row_kernel_ignores_past_v(backend, torch.bfloat16, layout, 50257, pitch=50264)


def test_triton_and_cuda_agree_gpu():
    if set(BACKENDS) != {"triton", "cuda"}:
        pytest.skip("needs both fused backends")
    h, w, b, labels = _inputs(1000, 256, 30522, torch.bfloat16, 0.3)
    outs = [fusedlm.lm_loss(h, w, labels, b, backend=be, return_details=True) for be in BACKENDS]
    grads = [_grads(o.loss, (h, w, b)) for o in outs]
    assert rel_err(outs[0].loss, outs[1].loss) < 1e-5
    assert float(outs[0].accuracy) == float(outs[1].accuracy)
    for a, c in zip(*grads):
        assert rel_err(a, c) < 1e-2


def test_peak_memory_is_bounded_by_the_chunk_gpu():
    """Extra memory beyond inputs and gradients stays near one logits chunk, not tokens x V."""
    tokens, hidden, vocab = 8192, 512, 50257
    h, w, b, labels = _inputs(tokens, hidden, vocab, torch.bfloat16, 1.1)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    loss = fusedlm.lm_loss(h, w, labels, b, chunk_size=1024)
    _grads(loss, (h, w, b))
    extra = torch.cuda.max_memory_allocated() - base
    grads_bytes = 2 * (h.numel() + w.numel() + b.numel()) * h.element_size()  # saved + scaled
    chunk_bytes = 1024 * vocab * 2
    full_logits = tokens * vocab * 4
    assert extra < grads_bytes + 2 * chunk_bytes + (64 << 20), (extra, grads_bytes, chunk_bytes)
    assert extra < full_logits / 4


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_weight_gradient_accumulates_in_fp32_across_chunks(dtype):
    """The fp32 accumulation of an fp32 weight's gradient (autocast): through addmm with an fp32
    output where this torch has it (then nothing is rounded between chunks), else each chunk's
    product rounded once at its own magnitude. Either way: the fp32 sum of the products."""
    from fusedlm.ops.lm_loss import _weight_grad_gemm, _wide_addmm
    g = torch.Generator(device="cuda").manual_seed(0)
    parts = [(torch.randn(50264, 512, device="cuda", generator=g).to(dtype),
              torch.randn(512, 768, device="cuda", generator=g).to(dtype)) for _ in range(4)]
    dw = torch.full((50264, 768), float("nan"), device="cuda")  # the first chunk ignores it
    for i, (a, b) in enumerate(parts):
        _weight_grad_gemm(dw, a, b, i == 0)
    want = sum(a.double() @ b.double() for a, b in parts)
    wide = _wide_addmm(dw.device)
    print(f"addmm into fp32 for {dtype} inputs: {wide}")
    assert rel_err(dw, want) < (1e-5 if wide else TOL[dtype] / 4), rel_err(dw, want)
