"""fusedlm.nn.EncoderLayer / DecoderLayer against the same layer written as plain PyTorch math,
padded and packed, forward and backward; their parameter names are Hugging Face's."""
import pytest
import torch
import torch.nn.functional as F

import fusedlm
from fusedlm import reference
from conftest import DEVICE, rel_err

H, HEADS = 32, 4


def _batch(seed=0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 11, H, generator=g).to(DEVICE).requires_grad_()
    mask = torch.ones(3, 11, dtype=torch.bool, device=DEVICE)
    mask[1, 7:] = False
    mask[2, 2:] = False
    return x, mask


def _attention(q, k, v, mask, causal):
    split = lambda t: t.unflatten(-1, (HEADS, -1))  # noqa: E731
    return reference.attention(split(q), split(k), split(v), key_mask=mask, causal=causal)[0].flatten(-2)


def _encoder_ref(layer, x, mask):
    a = layer.attention
    o = _attention(a.self.query(x), a.self.key(x), a.self.value(x), mask, False)
    ln = lambda m, t: F.layer_norm(t, (H,), m.weight, m.bias, m.eps)  # noqa: E731
    h = ln(a.output.LayerNorm, a.output.dense(o) + x)
    i = F.gelu(layer.intermediate.dense(h))
    return ln(layer.output.LayerNorm, layer.output.dense(i) + h)


def _decoder_ref(layer, x, mask):
    ln = lambda m, t: F.layer_norm(t, (H,), m.weight, m.bias, m.eps)  # noqa: E731
    q, k, v = layer.attn.c_attn(ln(layer.ln_1, x)).chunk(3, dim=-1)
    h = x + layer.attn.c_proj(_attention(q, k, v, mask, True))
    m = layer.mlp
    return h + m.c_proj(F.gelu(m.c_fc(ln(layer.ln_2, h)), approximate="tanh"))


@pytest.mark.parametrize("kind", ["encoder", "decoder"])
def test_layer_matches_plain_math_padded_and_packed(kind):
    torch.manual_seed(0)
    if kind == "encoder":
        layer, ref = fusedlm.nn.EncoderLayer(H, HEADS, 64, dropout=0.0, attention_dropout=0.0), _encoder_ref
    else:
        layer, ref = fusedlm.nn.DecoderLayer(H, HEADS, 64, dropout=0.0, attention_dropout=0.0), _decoder_ref
    layer = layer.to(DEVICE)
    with torch.no_grad():  # non-trivial norm parameters
        for p in layer.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    x, mask = _batch()
    y = layer(x, mask)
    want = ref(layer, x, mask)
    assert rel_err(y[mask], want[mask]) < 1e-5
    assert torch.all(y[~mask] == 0)  # padding rows come back as zeros
    dy = torch.randn_like(y) * mask[..., None]
    got = torch.autograd.grad(y, [x, *layer.parameters()], dy)
    exp = torch.autograd.grad(want, [x, *layer.parameters()], dy)
    for (name, _), a, b in zip([("x", None), *layer.named_parameters()], got, exp):
        if name.endswith("key.bias"):  # softmax ignores a key bias: both are rounding noise
            assert a.abs().max() < 1e-5 and b.abs().max() < 1e-5, name
            continue
        assert rel_err(a, b) < 1e-4, name
    # Packed rows give the same result as the padded batch, without the padding.
    rows, idx, cu, max_len = fusedlm.unpad(x.detach(), mask)
    assert rel_err(layer(rows, cu_seqlens=cu, max_seqlen=max_len), y.detach()[mask]) < 1e-6
    assert rel_err(layer(x.detach()), ref(layer, x.detach(), None)) < 1e-5  # no mask: all tokens


def test_layer_parameter_names_are_hugging_faces():
    transformers = pytest.importorskip("transformers")
    from transformers.models.bert.modeling_bert import BertLayer
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block
    bert = BertLayer(transformers.BertConfig(hidden_size=H, num_attention_heads=HEADS, intermediate_size=64))
    gpt = GPT2Block(transformers.GPT2Config(n_embd=H, n_head=HEADS, n_inner=64))
    ours = fusedlm.nn.EncoderLayer(H, HEADS, 64)
    assert set(ours.state_dict()) == set(bert.state_dict())
    ours.load_state_dict(bert.state_dict())
    mine = fusedlm.nn.DecoderLayer(H, HEADS, 64)
    hf = {k: v for k, v in gpt.state_dict().items() if k not in ("attn.bias", "attn.masked_bias")}  # buffers
    assert set(mine.state_dict()) == set(hf)
    mine.load_state_dict(hf)  # Conv1D weights (in, out), as GPT-2 stores them


def test_layer_bad_input():
    with pytest.raises(ValueError, match="multiple of num_heads"):
        fusedlm.nn.EncoderLayer(30, 4)
    layer = fusedlm.nn.DecoderLayer(H, HEADS)
    with pytest.raises(ValueError, match="max_seqlen"):
        layer(torch.randn(5, H), cu_seqlens=torch.tensor([0, 5], dtype=torch.int32))
    with pytest.raises(ValueError, match=r"x must be \(batch, seq, hidden\)"):
        layer(torch.randn(5, H))
    with pytest.raises(ValueError, match="not both"):
        layer(torch.randn(5, H), torch.ones(1, 5), cu_seqlens=torch.tensor([0, 5], dtype=torch.int32),
              max_seqlen=5)


def _drawn_seed():
    """The next dropout seed fusedlm draws from torch's default generator."""
    from fusedlm.ops._tensors import dropout_seed
    return dropout_seed(0.1, None)


def test_encoder_dropout_runs_in_the_norms_kernels():
    """BERT's "dense -> dropout -> add & norm" in training is the norm's fused dropout with the
    module's p and a seed drawn from torch's generator; in eval, no dropout at all."""
    torch.manual_seed(0)
    out = fusedlm.nn.layers.ResidualOutput(64, H, dropout=0.25, eps=1e-12).to(DEVICE)
    h, r = torch.randn(13, 64, device=DEVICE), torch.randn(13, H, device=DEVICE)
    torch.manual_seed(7)
    y = out(h, r)
    torch.manual_seed(7)
    ln = out.LayerNorm
    want = fusedlm.layer_norm(out.dense(h), ln.weight, ln.bias, ln.eps, residual=r,
                              dropout_p=0.25, seed=_drawn_seed())
    assert torch.equal(y, want)
    out.eval()
    assert torch.equal(out(h, r), fusedlm.layer_norm(out.dense(h), ln.weight, ln.bias, ln.eps,
                                                     residual=r))


def test_decoder_residual_dropouts_run_in_the_next_norms_kernels():
    """GPT-2's block in training: the attention output's dropout runs in ln_2's kernels, the
    MLP output's in the next block's ln_1 (or, for a lone layer, torch's dropout), each with the
    layer's p: the same numbers as the block written out with those calls."""
    torch.manual_seed(0)
    layer = fusedlm.nn.DecoderLayer(H, HEADS, 64, dropout=0.2, attention_dropout=0.0).to(DEVICE)
    x = torch.randn(2, 9, H, device=DEVICE)
    torch.manual_seed(3)
    got = layer(x)
    torch.manual_seed(3)
    rows = x.reshape(-1, H)
    cu = torch.tensor([0, 9, 18], dtype=torch.int32, device=DEVICE)
    a = layer.attn(layer.ln_1(rows), cu, 9, dropout_output=False)
    n2 = layer.ln_2
    y, residual = fusedlm.layer_norm(a, n2.weight, n2.bias, n2.eps, residual=rows, dropout_p=0.2,
                                     seed=_drawn_seed(), return_residual=True)
    want = F.dropout(layer.mlp(y, dropout_output=False), 0.2) + residual
    assert torch.equal(got, want.view(x.shape))
    assert layer.mlp_dropout_p == 0.2 and layer.eval().mlp_dropout_p == 0.0
