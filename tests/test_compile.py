"""torch.compile(fullgraph=True) sees the custom ops: no graph break, same results as eager."""
import pytest
import torch

import fusedlm
from fusedlm.ops import normalization as ln_ops
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
    torch.library.opcheck(ln_ops.norm_fwd_op, (x, r, w, b, 1e-5, rms, True, backend))
    torch.library.opcheck(ln_ops.norm_fwd_op, (x, None, w, b, 1e-5, rms, False, backend))
