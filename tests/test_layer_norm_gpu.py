"""Layer norm / RMSNorm GPU suite: every fused backend in every dtype (bf16 included) at model-sized widths.

Also the evidence a backend needs before automatic dispatch may choose it (see README)."""
import pytest
import torch

import fusedlm
from fusedlm import _core, reference
from conftest import HAS_GPU, TOL, kernel_backends, rel_err

pytestmark = pytest.mark.gpu
BACKENDS = [b for b in kernel_backends() if b != "torch"] if HAS_GPU else []
DTYPES = [torch.float32, torch.float16, torch.bfloat16]


def _inputs(rows, n, dtype, seed=0, offset=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    # `offset` shifts the data off 16-byte alignment to exercise the CUDA kernel's scalar path.
    buf = torch.randn(rows * n + offset, device="cuda", generator=g, dtype=torch.float32)
    x = (buf[offset:].view(rows, n) * 2 + 0.5).to(dtype).requires_grad_()
    w = (1 + 0.5 * torch.randn(n, device="cuda", generator=g)).to(dtype).requires_grad_()
    b = (0.5 * torch.randn(n, device="cuda", generator=g)).to(dtype).requires_grad_()
    dy = torch.randn(rows, n, device="cuda", generator=g).to(dtype)
    return x, w, b, dy


def _f64(*ts):
    return [t.detach().double().requires_grad_() for t in ts]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("n", [1, 7, 768, 1000, 1024, 4096, 4099, 8192, 16384])
def test_layer_norm_gpu(backend, dtype, n):
    rows = 2048 if n <= 4099 else 512
    x, w, b, dy = _inputs(rows, n, dtype)
    if backend == "cuda" and n > _core._C.norm_max_columns():
        with pytest.raises(ValueError, match=f"hidden size {n} exceeds the CUDA C\\+\\+ kernel"):
            fusedlm.layer_norm(x, w, b, backend=backend)
        return
    y = fusedlm.layer_norm(x, w, b, backend=backend)
    torch_y = torch.nn.functional.layer_norm(x, (n,), w, b)
    xs, ws, bs = _f64(x, w, b)
    ref = reference.layer_norm(xs, ws, bs)[0]
    err, torch_err = rel_err(y, ref), rel_err(torch_y, ref)
    assert err < TOL[dtype], err
    if dtype != torch.float32:
        assert err <= 2 * torch_err + 1e-6, (err, torch_err)
    got = torch.autograd.grad(y, [x, w, b], dy)
    theirs = torch.autograd.grad(torch_y, [x, w, b], dy)
    want = torch.autograd.grad(ref, [xs, ws, bs], dy.double())
    for name, g_, t_, w_ in zip("xwb", got, theirs, want):
        if n == 1 and name in "xw":  # exactly 0 in truth: bound the noise (see test_layer_norm)
            floor = 4 * torch.finfo(dtype).eps * 1e-5 ** -0.5 * dy.abs().sum().item()
            assert (g_.double() - w_).abs().max().item() <= floor, name
            continue
        e = rel_err(g_, w_)
        assert e < TOL[dtype] * (1 if name == "x" else 2), (name, e)
        if dtype != torch.float32:
            assert e <= 2 * rel_err(t_, w_) + 1e-6, (name, e, rel_err(t_, w_))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("rms", [False, True], ids=["ln", "rms"])
def test_residual_and_rms_gpu(backend, dtype, rms):
    x, w, b, dy = _inputs(4096, 1024, dtype, seed=1)
    r = torch.randn_like(x).requires_grad_()
    if rms:
        y, z = fusedlm.rms_norm(x, w, 1e-6, residual=r, return_residual=True, backend=backend)
        ref_y, _ = reference.rms_norm((x + r).detach().double(), w.detach().double(), 1e-6)
    else:
        y, z = fusedlm.layer_norm(x, w, b, residual=r, return_residual=True, backend=backend)
        ref_y, _ = reference.layer_norm((x + r).detach().double(), w.detach().double(),
                                        b.detach().double())
    assert torch.equal(z, x + r)
    assert rel_err(y, ref_y) < TOL[dtype]
    dz = torch.randn_like(z)
    gx, gr = torch.autograd.grad((y, z), [x, r], (dy, dz))
    assert torch.equal(gx, gr)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("n", [1024, 6001, 16383])  # one value a load: 2, 16 and 32 a thread
def test_unaligned_input_gpu(backend, n):
    x, w, b, dy = _inputs(300, n, torch.bfloat16, offset=1)
    y = fusedlm.layer_norm(x, w, b, backend=backend)
    xr, wr, br = _f64(x, w, b)
    ref = reference.layer_norm(xr, wr, br)[0]
    assert rel_err(y, ref) < TOL[torch.bfloat16]
    grads = torch.autograd.grad(y, (x, w, b), dy)
    want = torch.autograd.grad(ref, (xr, wr, br), dy.double())
    for got, exp in zip(grads, want):
        assert rel_err(got, exp) < 2 * TOL[torch.bfloat16]


@pytest.mark.parametrize("backend", BACKENDS)
def test_param_grads_bitwise_deterministic_gpu(backend):
    x, w, b, dy = _inputs(16384, 1024, torch.bfloat16, seed=2)
    runs = [torch.autograd.grad(fusedlm.layer_norm(x, w, b, backend=backend), [w, b], dy)
            for _ in range(3)]
    for other in runs[1:]:
        assert all(torch.equal(a, c) for a, c in zip(runs[0], other))


def test_cuda_and_triton_agree_gpu():
    if not {"cuda", "triton"} <= set(BACKENDS):
        pytest.skip("needs both fused backends")
    x, w, b, _ = _inputs(1024, 4096, torch.bfloat16, seed=4)
    a = fusedlm.layer_norm(x, w, b, backend="cuda")
    c = fusedlm.layer_norm(x, w, b, backend="triton")
    assert rel_err(a, c) < TOL[torch.bfloat16]


def test_auto_dispatch_on_gpu_picks_a_fused_backend():
    x, w, b, _ = _inputs(64, 768, torch.bfloat16)
    fusedlm.layer_norm(x, w, b)
    assert fusedlm.explain("layer_norm").backend != "torch"


def test_inductor_fullgraph_gpu():
    ln = fusedlm.nn.LayerNorm(1024).cuda()
    x = torch.randn(64, 1024, device="cuda", requires_grad=True)
    eager = ln(x)
    out = torch.compile(ln, fullgraph=True)(x)
    assert rel_err(out, eager) < 1e-6
    out.sum().backward()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("residual", [False, True], ids=["no_residual", "residual"])
def test_dropout_add_norm_gpu(backend, dtype, residual):
    """The fused dropout (BERT's dropout, add & norm) at one BERT-base batch's rows, compiled
    for the GPU: forward and backward against float64 given the kernel's own keep-mask. The
    CUDA C++ kernel's dropout has not run on a GPU before this test: dispatch leaves it out of
    dropout calls (ops/layer_norm.py) until it passes."""
    from test_layer_norm import check_dropout_add_norm
    check_dropout_add_norm(backend, dtype, residual, False, 16384, 768)


@pytest.mark.skipif(not {"triton", "cuda"} <= set(BACKENDS), reason="needs both kernels on a GPU")
@pytest.mark.parametrize("n", [768, 767], ids=str)
def test_cuda_and_triton_drop_the_same_elements_gpu(n):
    """Both kernels keep the elements of common/philox.h's mask on the GPU too (four columns a
    draw at 768; one draw an element in the CUDA C++ kernel at 767)."""
    from test_layer_norm import _kept
    assert torch.equal(_kept("cuda", 16384, n, torch.bfloat16, 0.1, 99),
                       _kept("triton", 16384, n, torch.bfloat16, 0.1, 99))
