"""Drop-in modules and the in-place swap of an existing model's norms."""
import pytest
import torch

import fusedlm
from fusedlm.nn import LayerNorm, RMSNorm, replace_norms
from conftest import DEVICE, TOL, kernel_backends, rel_err

BACKENDS = [None] + kernel_backends()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", [64, (3, 20)], ids=["1d", "2d"])
@pytest.mark.parametrize("bias", [True, False])
def test_layer_norm_module_matches_torch(backend, shape, bias):
    torch.manual_seed(0)
    theirs = torch.nn.LayerNorm(shape, eps=1e-6, bias=bias).to(DEVICE)
    with torch.no_grad():
        theirs.weight.normal_()
        if bias:
            theirs.bias.normal_()
    ours = LayerNorm(shape, eps=1e-6, bias=bias, backend=backend).to(DEVICE)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    assert isinstance(ours, torch.nn.LayerNorm)
    full = (5, 7) + ((shape,) if isinstance(shape, int) else shape)
    x = torch.randn(full, device=DEVICE, requires_grad=True)
    y_ours, y_theirs = ours(x), theirs(x)
    assert rel_err(y_ours, y_theirs) < TOL[torch.float32]
    dy = torch.randn_like(y_ours)
    for a, b in zip(torch.autograd.grad(y_ours, [x, *ours.parameters()], dy),
                    torch.autograd.grad(y_theirs, [x, *theirs.parameters()], dy)):
        assert rel_err(a, b) < 1e-4


@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_module_matches_torch(backend):
    theirs = torch.nn.RMSNorm(48).to(DEVICE)
    with torch.no_grad():
        theirs.weight.normal_()
    ours = RMSNorm(48, backend=backend).to(DEVICE)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(6, 48, device=DEVICE)
    assert rel_err(ours(x), theirs(x)) < TOL[torch.float32]


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_residual_form(backend):
    ln = LayerNorm(32, backend=backend).to(DEVICE)
    x, r = torch.randn(4, 32, device=DEVICE), torch.randn(4, 32, device=DEVICE)
    y, s = ln(x, r)
    assert torch.equal(s, x + r)
    assert rel_err(y, torch.nn.functional.layer_norm(x + r, (32,), ln.weight, ln.bias)) < 1e-5


def test_module_rejects_wrong_trailing_shape():
    with pytest.raises(ValueError, match="normalized_shape"):
        LayerNorm(16)(torch.randn(2, 8))


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.layer = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=True)
        self.final = torch.nn.LayerNorm(32)
        self.alias = self.final            # one module reached by two names
        self.rms = torch.nn.RMSNorm(32)

    def forward(self, x):
        return self.rms(self.alias(self.layer(x)))


def test_replace_norms_keeps_weights_and_outputs():
    torch.manual_seed(0)
    model = Block().to(DEVICE).eval()
    x = torch.randn(2, 5, 32, device=DEVICE)
    before = model(x)
    params_before = {n: p for n, p in model.named_parameters()}
    swapped = replace_norms(model)
    names = sorted(s.name for s in swapped)
    assert names == ["alias", "final", "layer.norm1", "layer.norm2", "rms"]
    assert isinstance(model.final, LayerNorm) and model.final is model.alias
    assert isinstance(model.rms, RMSNorm)
    # Same Parameter objects: optimizers built before the swap keep working.
    for n, p in model.named_parameters():
        assert p is params_before[n]
    assert rel_err(model(x), before) < 1e-5
    assert replace_norms(model) == []  # idempotent


def test_replace_norms_rejects_non_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        replace_norms("bert")


def test_top_level_api():
    assert fusedlm.nn.LayerNorm is LayerNorm
    assert callable(fusedlm.layer_norm) and callable(fusedlm.explain)
