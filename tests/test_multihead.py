"""fusedlm.nn.MultiheadAttention swapped into plain PyTorch Transformer layers: same results."""
import copy

import pytest
import torch

import fusedlm
from conftest import DEVICE, rel_err


def _grads(model, x, **kw):
    out = model(x, **kw)
    w = torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).to(out.device)
    loss = (out * w).sum()
    return out, torch.autograd.grad(loss, [x, *model.parameters()])


@pytest.mark.parametrize("batch_first", [True, False])
@pytest.mark.parametrize("causal", [False, True])
def test_encoder_layer_swap_keeps_results(batch_first, causal):
    torch.manual_seed(0)
    ref = torch.nn.TransformerEncoderLayer(32, 4, 64, dropout=0.0, batch_first=batch_first).to(DEVICE)
    model = copy.deepcopy(ref)
    assert fusedlm.nn.replace_attention(model) == ["self_attn"]
    assert type(model.self_attn) is fusedlm.nn.MultiheadAttention
    x = torch.randn(3, 9, 32, device=DEVICE, requires_grad=True)
    if not batch_first:
        x = x.detach().transpose(0, 1).contiguous().requires_grad_()
    pad = torch.zeros(3, 9, dtype=torch.bool, device=DEVICE)
    pad[1, 6:] = True   # torch's convention: True = padding
    kw = dict(src_key_padding_mask=pad)
    if causal:
        kw.update(src_mask=torch.nn.Transformer.generate_square_subsequent_mask(9, device=DEVICE),
                  is_causal=True)
    want, g_ref = _grads(ref, x, **kw)
    assert fusedlm.explain("attention") is None
    got, g = _grads(model, x, **kw)
    assert fusedlm.explain("attention") is not None   # the fused path ran
    real = ~pad if batch_first else ~pad.t()
    assert rel_err(got[real], want[real]) < 1e-5
    for a, b in zip(g, g_ref):
        assert rel_err(a, b) < 1e-4


def test_falls_back_where_it_cannot_serve():
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).to(DEVICE)
    fused = fusedlm.nn.MultiheadAttention(16, 2, batch_first=True).to(DEVICE)
    fused.load_state_dict(mha.state_dict())
    q, kv = torch.randn(2, 5, 16, device=DEVICE), torch.randn(2, 7, 16, device=DEVICE)
    out, weights = fused(q, kv, kv)            # cross-attention, weights asked: torch's path
    want, want_w = mha(q, kv, kv)
    assert torch.equal(out, want) and torch.equal(weights, want_w)
    assert fusedlm.explain("attention") is None  # fusedlm's attention never ran


@pytest.mark.parametrize("kind", ["additive finite", "0 / -inf"])
def test_float_key_padding_mask_keeps_torchs_meaning(kind):
    """A float key_padding_mask is added to the scores: finite values (-1.5 here) are not
    "drop this key", so they run torch's path; 0 / -inf is exactly a drop mask, fused."""
    torch.manual_seed(0)
    mha = torch.nn.MultiheadAttention(16, 2, batch_first=True).to(DEVICE)
    fused = fusedlm.nn.MultiheadAttention(16, 2, batch_first=True).to(DEVICE)
    fused.load_state_dict(mha.state_dict())
    x = torch.randn(2, 6, 16, device=DEVICE)
    mask = torch.zeros(2, 6, device=DEVICE)
    mask[1, 4:] = -1.5 if kind == "additive finite" else float("-inf")
    want, _ = mha(x, x, x, key_padding_mask=mask, need_weights=False)
    got, _ = fused(x, x, x, key_padding_mask=mask, need_weights=False)
    assert rel_err(got, want) < 1e-5
    assert (fusedlm.explain("attention") is not None) == (kind == "0 / -inf")
