"""torch.compile(fullgraph=True) sees the custom ops: no graph break, same results as eager."""
import pytest
import torch

import fusedlm
from fusedlm.ops.layer_norm import norm_fwd_op
from conftest import DEVICE, kernel_backends, rel_err

BACKENDS = ["torch"] + kernel_backends()


class PreLN(torch.nn.Module):
    def __init__(self, backend):
        super().__init__()
        self.proj = torch.nn.Linear(48, 48)
        self.ln = fusedlm.nn.LayerNorm(48, backend=backend)
        self.rms = fusedlm.nn.RMSNorm(48, backend=backend)

    def forward(self, x):
        y, h = self.ln(self.proj(x), x)     # fused residual add, sum returned
        return self.rms(y) + h


@pytest.mark.parametrize("backend", BACKENDS)
def test_fullgraph_compile_forward_backward(backend):
    torch.manual_seed(0)
    model = PreLN(backend).to(DEVICE)
    x = torch.randn(3, 5, 48, device=DEVICE, requires_grad=True)
    eager = model(x)
    g_eager = torch.autograd.grad(eager.sum(), [x, *model.parameters()])
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    g_comp = torch.autograd.grad(out.sum(), [x, *model.parameters()])
    assert rel_err(out, eager) < 1e-6
    for a, b in zip(g_comp, g_eager):
        assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rms", [False, True])
def test_custom_ops_pass_opcheck(backend, rms):
    """Schema, fake (meta) kernel, autograd registration and dispatch of the custom ops."""
    x = torch.randn(6, 40, device=DEVICE, requires_grad=True)
    r = torch.randn(6, 40, device=DEVICE, requires_grad=True)
    w = torch.randn(40, device=DEVICE, requires_grad=True)
    b = None if rms else torch.randn(40, device=DEVICE, requires_grad=True)
    seed = torch.tensor(5)
    torch.library.opcheck(norm_fwd_op, (x, r, w, b, 1e-5, rms, True, backend, 0.0, seed))
    torch.library.opcheck(norm_fwd_op, (x, None, w, b, 1e-5, rms, False, backend, 0.0, seed))
    torch.library.opcheck(norm_fwd_op, (x, r, w, b, 1e-5, rms, True, backend, 0.2, seed))
    torch.library.opcheck(norm_fwd_op, (x, None, w, b, 1e-5, rms, True, backend, 0.2, seed))


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_add_norm_fullgraph_compile(backend):
    """BERT's "dropout, add & norm" compiles whole and gives eager's result and gradients for
    the same seed (its keep-mask redrawn in the backward from the seed either way)."""
    torch.manual_seed(0)
    x, r = (torch.randn(7, 48, device=DEVICE, requires_grad=True) for _ in range(2))
    w, b = (torch.randn(48, device=DEVICE, requires_grad=True) for _ in range(2))

    def step(x, r, w, b):
        y, z = fusedlm.layer_norm(x, w, b, residual=r, dropout_p=0.25, seed=11,
                                  return_residual=True, backend=backend)
        return (y * y).sum() + z.sum()
    eager = step(x, r, w, b)
    g_eager = torch.autograd.grad(eager, (x, r, w, b))
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    out = compiled(x, r, w, b)
    g_comp = torch.autograd.grad(out, (x, r, w, b))
    assert rel_err(out, eager) < 1e-6
    for a, c in zip(g_comp, g_eager):
        assert rel_err(a, c) < 1e-6
    assert (g_eager[0] == 0).any() and not torch.equal(g_eager[0], g_eager[1])  # x's is dropped


class MLMHeadLoss(torch.nn.Module):
    def __init__(self, backend, reduction, accum_dtype=None):
        super().__init__()
        self.dense = torch.nn.Linear(16, 16)
        self.decoder = torch.nn.Linear(16, 50)
        self.backend, self.reduction, self.accum_dtype = backend, reduction, accum_dtype

    def forward(self, x, labels):
        loss = fusedlm.lm_loss(torch.tanh(self.dense(x)), self.decoder.weight, labels,
                               self.decoder.bias, reduction=self.reduction, z_loss=1e-4,
                               chunk_size=3, accum_dtype=self.accum_dtype, backend=self.backend)
        return loss.sum()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction,accum_dtype", [("mean", None), ("none", None),
                                                   ("none", torch.float32)])
def test_lm_loss_fullgraph_compile(backend, reduction, accum_dtype):
    torch.manual_seed(0)
    model = MLMHeadLoss(backend, reduction, accum_dtype).to(DEVICE)
    x = torch.randn(2, 9, 16, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9), device=DEVICE)
    labels[:, ::2] = -100
    eager = model(x, labels)
    g_eager = torch.autograd.grad(eager, [x, *model.parameters()])
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x, labels)
    g_comp = torch.autograd.grad(out, [x, *model.parameters()])
    assert rel_err(out, eager) < 1e-6
    for a, b in zip(g_comp, g_eager):
        assert rel_err(a, b) < 1e-6


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_lm_loss_custom_ops_pass_opcheck(backend, reduction):
    from fusedlm.ops.lm_loss import lm_loss_bwd_op, lm_loss_fwd_op
    h = torch.randn(7, 8, device=DEVICE, requires_grad=True)
    w = torch.randn(30, 8, device=DEVICE, requires_grad=True)
    b = torch.randn(30, device=DEVICE, requires_grad=True)
    y = torch.randint(0, 30, (7,), device=DEVICE)
    y[::3] = -100
    torch.library.opcheck(lm_loss_fwd_op,
                          (h, w, b, y, -100, 0.1, 1e-4, reduction, 2, True, True, True, backend, 5, True, False))
    torch.library.opcheck(lm_loss_fwd_op,
                          (h, w, None, y, -100, 0.0, 0.0, reduction, 0, True, False, False, backend, 7, False, True))
    # As autocast hands them over: half hidden states, the fp32 weight and bias (fp32 gradients).
    torch.library.opcheck(lm_loss_fwd_op,
                          (h.detach().half().requires_grad_(), w, b, y, -100, 0.0, 0.0, reduction, 2,
                           True, True, True, backend, 7, False, False))
    g = torch.randn(7, device=DEVICE)
    torch.library.opcheck(lm_loss_bwd_op,
                          (h.detach(), w.detach(), b.detach(), y, g, -100, 0.1, 0.0, 2, True, True, True, backend, 5, True))


ATTN_BACKENDS = ["torch"] + [b for b in ("triton",) if fusedlm.ops.dispatch.why_not("attention", b, (DEVICE, torch.float16, 32)) is None]


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_attention_fullgraph_compile(backend):
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 17, 2, 32, generator=g).to(DEVICE, torch.float16).requires_grad_()
               for _ in range(3))
    mask = torch.ones(2, 17, dtype=torch.bool, device=DEVICE)
    mask[1, 11:] = False

    def f(q, k, v):
        return fusedlm.attention(q, k, v, causal=True, attention_mask=mask, backend=backend).float().sum()

    eager = f(q, k, v)
    g_eager = torch.autograd.grad(eager, (q, k, v))
    torch._dynamo.reset()
    out = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    g_comp = torch.autograd.grad(out, (q, k, v))
    assert rel_err(out, eager) < 1e-6
    for a, b in zip(g_comp, g_eager):
        assert rel_err(a, b) < 1e-6


@pytest.mark.skipif("triton" not in ATTN_BACKENDS, reason="needs the Triton kernels")
def test_attention_custom_ops_pass_opcheck():
    from fusedlm.ops.attention import attn_fwd_op
    g = torch.Generator().manual_seed(0)
    q = torch.randn(2, 9, 4, 16, generator=g).to(DEVICE, torch.float16).requires_grad_()
    k = torch.randn(2, 9, 2, 16, generator=g).to(DEVICE, torch.float16).requires_grad_()
    v = torch.randn(2, 9, 2, 16, generator=g).to(DEVICE, torch.float16).requires_grad_()
    mask = torch.ones(2, 9, dtype=torch.int8, device=DEVICE)
    torch.library.opcheck(attn_fwd_op, (q, k, v, mask, None, None, 9, 9, True, 0.25, 0.0, torch.tensor(0), False, -1, -1, 0.0, None, "triton"))
    cu = torch.tensor([0, 4, 9], dtype=torch.int32, device=DEVICE)
    qp, kp, vp = (t.detach()[0].requires_grad_() for t in (q, k, v))
    torch.library.opcheck(attn_fwd_op, (qp, kp, vp, None, cu, cu, 5, 5, False, 0.25, 0.1, torch.tensor(3), True, 7, 0, 30.0, None, "triton"))


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
@pytest.mark.parametrize("bad", ["max_seqlen", "offsets"])
def test_compiled_varlen_checks_its_offsets(backend, bad):
    """Compiled, the offsets cannot be read on the host; they are checked on the device, so
    that a max_seqlen below the longest sequence or falling offsets are an error, not rows left
    unwritten or read out of bounds."""
    q = torch.randn(12, 2, 16, device=DEVICE, dtype=torch.float16)
    good = torch.tensor([0, 5, 12], dtype=torch.int32, device=DEVICE)
    f = torch.compile(lambda cu, mx: fusedlm.attention_varlen(q, q, q, cu, cu, mx, mx,
                                                              backend=backend),
                      fullgraph=True, backend="aot_eager", dynamic=False)
    torch._dynamo.reset()
    assert torch.equal(f(good, 7), fusedlm.attention_varlen(q, q, q, good, good, 7, 7,
                                                            backend=backend))
    cu, mx = (good, 6) if bad == "max_seqlen" else (torch.tensor([0, 7, 5], dtype=torch.int32,
                                                                 device=DEVICE), 12)
    if DEVICE == "cuda":
        pytest.skip("on a GPU a failed device-side check ends the process's CUDA context")
    with pytest.raises(RuntimeError, match="cu_seqlens_q must rise from 0 to 12"):
        f(cu, mx)


_FIRST_CALL_COMPILED = """
import os, sys
import torch, fusedlm
backend = None if sys.argv[1] == "auto" else sys.argv[1]

def step(x, w, b, h, wv, y, q, cu):
    a = fusedlm.layer_norm(x, w, b, backend=backend)
    r = fusedlm.rms_norm(x, w, backend=backend)
    loss = fusedlm.lm_loss(h, wv, y, backend=backend)
    o = fusedlm.attention(q, q, q, causal=True, backend=backend)
    ov = fusedlm.attention_varlen(q[0], q[0], q[0], cu, cu, 5, 5, backend=backend)
    return a.sum() + r.sum() + loss + o.float().sum() + ov.float().sum()

device = "cuda" if torch.cuda.is_available() else "cpu"
g = torch.Generator().manual_seed(0)
args = [torch.randn(4, 40, generator=g), torch.randn(40, generator=g), torch.randn(40, generator=g),
        torch.randn(6, 16, generator=g), torch.randn(30, 16, generator=g),
        torch.randint(0, 30, (6,), generator=g),
        torch.randn(1, 8, 2, 16, generator=g).half(), torch.tensor([0, 3, 8], dtype=torch.int32)]
args = [t.to(device) for t in args]
for t in (args[0], args[3], args[6]):
    t.requires_grad_()
compiled = torch.compile(step, fullgraph=True, backend="aot_eager")(*args)
grads = torch.autograd.grad(compiled, (args[0], args[3], args[6]))
eager = step(*args)
assert torch.allclose(compiled, eager, rtol=1e-4), (float(compiled), float(eager))
print("first call compiled: ok")
"""


@pytest.mark.parametrize("backend", ["auto"] + ATTN_BACKENDS)
def test_first_call_in_a_fresh_process_can_be_compiled(backend, tmp_path):
    """Every op's first call in a process traced by torch.compile(fullgraph=True): deciding the
    backend (importing the Triton kernels, asking the compiled core) must not be traced. The
    other tests of this file make an eager call first, which hides that."""
    import subprocess
    import sys
    script = tmp_path / "first_call.py"
    script.write_text(_FIRST_CALL_COMPILED)
    run = subprocess.run([sys.executable, str(script), backend], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and "first call compiled: ok" in run.stdout, run.stderr[-3000:]


@pytest.mark.parametrize("backend", ATTN_BACKENDS)
def test_attention_dropout_compiled_equals_eager_for_a_seed(backend):
    """A compiled call hands the Triton kernels its seed as a device tensor, which they read
    (the eager call passes the int): the same seed gives the same output and gradients."""
    g = torch.Generator().manual_seed(0)
    q, k, v = (torch.randn(2, 19, 2, 32, generator=g).to(DEVICE, torch.float16).requires_grad_()
               for _ in range(3))

    def f(q, k, v):
        return fusedlm.attention(q, k, v, causal=True, dropout_p=0.3, seed=77,
                                 backend=backend).float().square().sum()
    eager = f(q, k, v)
    g_eager = torch.autograd.grad(eager, (q, k, v))
    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(q, k, v)
    g_comp = torch.autograd.grad(out, (q, k, v))
    if backend == "torch":  # traced, its mask comes from torch's generator: only the shapes agree
        assert out.shape == eager.shape and all(a.shape == b.shape for a, b in zip(g_comp, g_eager))
        return
    assert rel_err(out, eager) < 1e-6
    for a, b in zip(g_comp, g_eager):
        assert rel_err(a, b) < 1e-6


def test_a_compiled_seed_is_drawn_on_the_datas_device(monkeypatch):
    """Under torch.compile the dropout seed is drawn as a tensor on the data's device (the kernels
    read it there: no host value in the graph, a fresh draw at each CUDA-graph replay); eagerly
    it is an int; a given seed is kept as it is."""
    from fusedlm.ops._tensors import dropout_seed
    assert isinstance(dropout_seed(0.1, None, 4, torch.device("meta")), int)
    assert dropout_seed(0.0, None) == 0 and dropout_seed(0.1, 123) == 123
    monkeypatch.setattr(torch.compiler, "is_compiling", lambda: True)
    drawn = dropout_seed(0.1, None, 4, torch.device("meta"))
    assert isinstance(drawn, torch.Tensor) and drawn.device.type == "meta" and drawn.dim() == 0
