import contextlib
import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
# Without a GPU the Triton kernels run under the interpreter on CPU tensors. The variable must
# be set before triton decorates fusedlm's kernels, i.e. before fusedlm is imported.
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fusedlm  # noqa: E402
from fusedlm.ops import dispatch  # noqa: E402

DEVICE = "cuda" if HAS_GPU else "cpu"
# A core built for the CPU emulator (FUSEDLM_CUDA=EMU: tests/test_cuda_emulated.py) runs its
# CUDA C++ kernels on CPU tensors: every suite here then runs them wherever it names the 'cuda'
# backend. What only a real build does (refusing CPU tensors) is skipped there.
EMULATED = fusedlm._core.EMULATED
not_emulated = pytest.mark.skipif(EMULATED, reason="fusedlm._C emulates its CUDA kernels: CPU tensors are its device")


@contextlib.contextmanager
def emulated_cuda_kernels(name):
    """Within the block, backend="cuda" attention on the emulated core runs the `name` kernels:
    "mma" on the emulator's default device (compute capability 8.0), "wgmma" (the Hopper
    kernels) on an emulated 9.0 device. Checks at the block's end that they ran, forward and
    backward."""
    from fusedlm.ops import attention_kernels as ak
    saved = os.environ.get("FUSEDLM_EMU_ARCH")
    if name == "wgmma":
        os.environ["FUSEDLM_EMU_ARCH"] = "90"
    ak.last_cuda_forward_kernel = ak.last_cuda_backward_kernel = None
    try:
        with ak.using_cuda_kernels(name):
            yield
    finally:
        if saved is None:
            os.environ.pop("FUSEDLM_EMU_ARCH", None)
        else:
            os.environ["FUSEDLM_EMU_ARCH"] = saved
    assert (ak.last_cuda_forward_kernel, ak.last_cuda_backward_kernel) == (name, name)


def kernel_backends():
    """Fused backends that can run in this process (the reference is always there)."""
    out = []
    if dispatch.why_not("layer_norm", "triton", (DEVICE, torch.float32, 64, None)) is None:
        out.append("triton")
    if dispatch.why_not("layer_norm", "cuda", (DEVICE, torch.float32, 64, None)) is None:
        out.append("cuda")
    return out


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_dispatch(monkeypatch):
    monkeypatch.delenv("FUSEDLM_BACKEND", raising=False)
    dispatch.clear_cache()
    yield


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64; NaN anywhere in out never passes."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    assert not torch.isnan(out64).any(), "NaN in output"
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff


def sdpa(q, k, v, causal, mask=None):
    """PyTorch's own attention on (batch, seq, heads, head_dim) tensors in their precision: the
    bound the attention suites hold ours to (2x its error against float64)."""
    import torch.nn.functional as F
    h, hk = q.shape[2], k.shape[2]
    qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
    if hk != h:
        kt, vt = (t.repeat_interleave(h // hk, dim=1) for t in (kt, vt))
    attn_mask = None
    if causal or mask is not None:
        attn_mask = fusedlm.reference.allowed_mask(q.shape[1], k.shape[1], causal=causal, key_mask=mask,
                                                   device=q.device)
    return F.scaled_dot_product_attention(qt, kt, vt, attn_mask=attn_mask).transpose(1, 2)


def check_cuda_drops_as_triton(q, k, v):
    """The CUDA C++ attention draws Triton's dropout stream: with one seed both backends drop the
    same probabilities, so outputs and gradients agree to rounding."""
    tol = TOL[q.dtype]
    outs = [fusedlm.attention(q, k, v, causal=True, dropout_p=0.2, seed=7, backend=b) for b in ("triton", "cuda")]
    assert rel_err(outs[1], outs[0]) < 2 * tol
    do = torch.randn_like(outs[0])
    grads = [torch.autograd.grad(o, (q, k, v), do) for o in outs]
    for a, c in zip(*grads):
        assert rel_err(c, a) < 4 * tol


def check_unaligned_views_match(backend, device, dtype, seq):
    """Views whose rows are not 16-byte aligned (the CUDA C++ kernels then load element by
    element instead of with 16-byte cp.async copies) give the results of contiguous copies,
    bit for bit, forward and backward."""
    g = torch.Generator(device=device).manual_seed(3)
    wide = [torch.randn(2, seq, 4, 65, device=device, generator=g).to(dtype) for _ in range(3)]
    q, k, v = (t[..., 1:] for t in wide)
    assert q.stride(1) % 8 != 0 and q.data_ptr() % 16 != 0
    leaves = [t.detach().clone().requires_grad_() for t in (q, k, v)]  # contiguous copies
    views = [t.detach().requires_grad_() for t in (q, k, v)]
    outs = [fusedlm.attention(*ts, causal=True, backend=backend) for ts in (views, leaves)]
    assert torch.equal(outs[0], outs[1])
    do = torch.randn_like(outs[0])
    for a, c in zip(torch.autograd.grad(outs[0], views, do), torch.autograd.grad(outs[1], leaves, do)):
        assert torch.equal(a, c)


# Relative norm error against a float64 reference: the table `fusedlm check` uses too.
TOL = fusedlm.reference.TOLERANCE


def tma_launches(monkeypatch):
    """Turns the Triton attention kernels' opt-in TMA path on (FUSEDLM_TRITON_TMA) for a test;
    returns the list that collects (kernel, took the path) for each launch of the three kernels."""
    return _attention_launches(monkeypatch, "TMA")


def atomic_dq_launches(monkeypatch):
    """Turns the Triton attention kernels' opt-in atomic-dQ backward on (FUSEDLM_TRITON_ATOMIC_DQ)
    for a test; returns the list that collects (kernel name, TMA flag) for each launch of the
    autotuned kernels ("dkdv_dq" where it was taken)."""
    return _attention_launches(monkeypatch, "ATOMIC_DQ")


def _attention_launches(monkeypatch, switch):
    from fusedlm.ops import _triton
    kern = _triton.kernels("attention")
    monkeypatch.setattr(kern, switch, True)
    seen, launch = [], kern._launch

    def spy(name, kernel, rows, grid_y, pinned, head_dim, bucket, args, flags, *rest, **kw):
        seen.append((name, flags["TMA"]))
        return launch(name, kernel, rows, grid_y, pinned, head_dim, bucket, args, flags, *rest, **kw)
    monkeypatch.setattr(kern, "_launch", spy)
    return seen


def check_row_kernel_ignores_past_v(backend, dtype, layout, vocab, pitch=None):
    """The LM-loss row kernel of `backend` on 3 rows of `vocab` logits laid out in a NaN-filled
    storage (`layout`: 'pitched', 'storage_ends_at_v' (the last row's storage ends at V),
    'unaligned' (rows 2 bytes off 16-byte alignment), 'contiguous'; `pitch` defaults to V rounded
    up to 16): against the float64 reference, gradient in place, and nothing past V written."""
    import importlib
    ops = importlib.import_module("fusedlm.ops.lm_loss")
    rows = 3
    pitch = pitch or -(-vocab // 16) * 16
    size = {"pitched": rows * pitch, "storage_ends_at_v": (rows - 1) * pitch + vocab,
            "unaligned": rows * pitch + 1, "contiguous": rows * vocab}[layout]
    store = torch.full((size,), float("nan"), dtype=dtype, device=DEVICE)
    logits = (store.view(rows, vocab) if layout == "contiguous" else
              store.as_strided((rows, vocab), (pitch, 1), int(layout == "unaligned")))
    x = (torch.randn(rows, vocab, generator=torch.Generator().manual_seed(0)) * 3).to(dtype)
    logits.copy_(x)
    outside = torch.isnan(store).clone()
    labels = torch.tensor([0, vocab - 1, vocab // 2], device=DEVICE)
    stats = [torch.empty(rows, device=DEVICE) for _ in range(3)]
    ops._cross_entropy_rows(backend, logits, labels, *stats, 0.1, 1e-3, 0.5, True)
    want = x.double().to(DEVICE)  # the same rounded inputs, in float64
    ref = fusedlm.reference.ce_rows(want, labels, label_smoothing=0.1, z_loss=1e-3,
                                    grad_scale=0.5, compute_grad=True)
    for got, exp in zip(stats[:2], ref[:2]):
        assert rel_err(got, exp) < 1e-5
    assert torch.equal(stats[2], ref[2].float())
    assert rel_err(logits, want) < TOL[dtype]
    assert torch.isnan(store[outside]).all()  # nothing past V written
