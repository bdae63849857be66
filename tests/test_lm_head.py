"""MaskedLMHead and LMHead against the same computation written with plain torch modules."""
import pytest
import torch
import torch.nn.functional as F

import fusedlm
from conftest import DEVICE, rel_err

# Hugging Face's BertLMPredictionHead (`cls.predictions`) state_dict keys.
HF_MLM_KEYS = {"transform.dense.weight", "transform.dense.bias", "transform.LayerNorm.weight",
               "transform.LayerNorm.bias", "decoder.weight", "decoder.bias", "bias"}


def _unfused_mlm_loss(head, hidden, labels):
    t = head.transform
    h = F.layer_norm(F.gelu(t.dense(hidden)), (hidden.shape[-1],), t.LayerNorm.weight,
                     t.LayerNorm.bias, t.LayerNorm.eps)
    logits = h @ head.decoder.weight.t() + head.bias
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))


def _mlm_batch(seed=0):
    torch.manual_seed(seed)
    hidden = torch.randn(3, 11, 32, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, 97, (3, 11), device=DEVICE)
    labels[torch.rand(3, 11, device=DEVICE) > 0.3] = -100
    labels[0, 0] = 5  # at least one label
    return hidden, labels


def test_mlm_head_keys_match_hugging_face():
    head = fusedlm.nn.MaskedLMHead(32, 97)
    assert set(head.state_dict()) == HF_MLM_KEYS
    assert head.decoder.bias is head.bias


def test_mlm_head_loss_and_grads_match_unfused():
    head = fusedlm.nn.MaskedLMHead(32, 97).to(DEVICE)
    with torch.no_grad():
        head.bias.normal_()
        head.transform.LayerNorm.weight.normal_(1.0, 0.2)
    hidden, labels = _mlm_batch()
    params = [hidden] + list(head.parameters())
    loss = head(hidden, labels)
    got = torch.autograd.grad(loss, params)
    ref = _unfused_mlm_loss(head, hidden, labels)
    want = torch.autograd.grad(ref, params)
    assert rel_err(loss, ref) < 1e-5
    for g, w in zip(got, want):
        assert rel_err(g, w) < 1e-5
    # Rows without a label get exactly zero gradient (they never entered the computation).
    assert torch.equal(got[0][labels == -100], torch.zeros_like(got[0][labels == -100]))


def test_mlm_head_without_labels_returns_logits():
    head = fusedlm.nn.MaskedLMHead(32, 97).to(DEVICE)
    hidden, _ = _mlm_batch()
    assert head(hidden).shape == (3, 11, 97)


def test_mlm_head_tied_decoder_and_details():
    emb = torch.nn.Embedding(97, 32).to(DEVICE)
    head = fusedlm.nn.MaskedLMHead(32, 97, decoder_weight=emb.weight, z_loss=1e-4).to(DEVICE)
    assert head.decoder.weight is emb.weight
    hidden, labels = _mlm_batch(1)
    out = head(hidden, labels, return_details=True)
    assert int(out.count) == int((labels != -100).sum())
    out.loss.backward()
    assert emb.weight.grad is not None and emb.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="decoder_weight"):
        fusedlm.nn.MaskedLMHead(32, 97, decoder_weight=torch.nn.Parameter(torch.randn(96, 32)))
    with pytest.raises(ValueError, match="hidden_act"):
        fusedlm.nn.MaskedLMHead(32, 97, hidden_act="swish")
    with pytest.raises(ValueError, match="labels"):
        head(hidden, labels[:, :5])


def test_mlm_head_compiles_fullgraph():
    head = fusedlm.nn.MaskedLMHead(32, 97).to(DEVICE)
    hidden, labels = _mlm_batch(2)
    eager = head(hidden, labels)
    torch._dynamo.reset()
    compiled = torch.compile(head, fullgraph=True, backend="aot_eager")(hidden, labels)
    assert rel_err(compiled, eager) < 1e-6


@pytest.mark.parametrize("capacity", [0.5, 20, 1.0])
@pytest.mark.parametrize("compiled", [False, True])
def test_mlm_head_capacity_computes_the_labelled_rows_alone(capacity, compiled):
    """A capacity (rows, or a fraction of them) gives the exact loss and gradients with
    shapes fixed by the batch's: the labelled rows first, then filler rows that count for
    nothing, in eager mode and compiled whole."""
    head = fusedlm.nn.MaskedLMHead(32, 97).to(DEVICE)
    capped = fusedlm.nn.MaskedLMHead(32, 97, capacity=capacity).to(DEVICE)
    capped.load_state_dict(head.state_dict())
    hidden, labels = _mlm_batch(3)
    n = int((labels != -100).sum())
    assert n <= 16  # 0.5 of 33 rows is 17: room for them all
    params = [hidden] + list(head.parameters())
    want = head(hidden, labels)
    want_g = torch.autograd.grad(want, params)
    torch._dynamo.reset()
    fn = torch.compile(capped, fullgraph=True, backend="aot_eager") if compiled else capped
    got = fn(hidden, labels, return_details=True)
    got_g = torch.autograd.grad(got.loss, [hidden] + list(capped.parameters()))
    assert rel_err(got.loss, want) < 1e-5 and int(got.count) == n
    for g, w in zip(got_g, want_g):
        assert rel_err(g, w) < 1e-5
    assert torch.equal(got_g[0][labels == -100], torch.zeros_like(got_g[0][labels == -100]))


def test_mlm_head_capacity_too_small_is_an_error_and_bad_capacity_is_named():
    hidden, labels = _mlm_batch(3)
    n = int((labels != -100).sum())
    head = fusedlm.nn.MaskedLMHead(32, 97, capacity=n - 1).to(DEVICE)
    with pytest.raises(ValueError, match=f"more labelled rows than capacity={n - 1}"):
        head(hidden, labels)  # a labelled row left out: never a smaller loss
    assert torch.isfinite(fusedlm.nn.MaskedLMHead(32, 97, capacity=n).to(DEVICE)(hidden, labels))
    for bad in (0, -3, 0.0, 1.5, True, "20%"):
        with pytest.raises(ValueError, match="capacity must be"):
            fusedlm.nn.MaskedLMHead(32, 97, capacity=bad)


def test_lm_head_is_a_linear_with_a_causal_loss():
    torch.manual_seed(0)
    linear = torch.nn.Linear(16, 50, bias=False).to(DEVICE)
    head = fusedlm.nn.LMHead.from_linear(linear)
    assert head.weight is linear.weight and head.bias is None
    assert isinstance(head, torch.nn.Linear) and set(head.state_dict()) == {"weight"}
    hidden = torch.randn(2, 9, 16, device=DEVICE, requires_grad=True)
    labels = torch.randint(0, 50, (2, 9), device=DEVICE)
    assert torch.equal(head(hidden), linear(hidden))
    loss = head(hidden, labels)
    # GPT-2's own loss: shift logits left and labels right.
    logits = linear(hidden)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, 50), labels[:, 1:].reshape(-1))
    assert rel_err(loss, ref) < 1e-5
    g, = torch.autograd.grad(loss, [hidden])
    r, = torch.autograd.grad(ref, [hidden])
    assert rel_err(g, r) < 1e-5
    per_token = head(hidden, labels, reduction="none")
    assert per_token.shape == (2, 8)


def _bf16_heads_and_models():
    """(name, build(accum_dtype) -> module, inputs(module) -> loss, the decoder weight's name)."""
    import fusedlm.models as fm
    bert = dict(vocab_size=97, hidden_size=32, num_hidden_layers=1, num_attention_heads=4,
                intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                attention_probs_dropout_prob=0.0)
    gpt = dict(vocab_size=97, n_positions=64, n_embd=32, n_layer=1, n_head=4, resid_pdrop=0.0,
               embd_pdrop=0.0, attn_pdrop=0.0)
    ids = torch.randint(1, 97, (4, 48), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    labels = ids.clone()  # every token labelled: 192 rows, 48 chunks of 4
    hidden = torch.randn(4, 48, 32, generator=torch.Generator().manual_seed(2)).to(DEVICE)
    return [
        ("MaskedLMHead", lambda a: fusedlm.nn.MaskedLMHead(32, 97, accum_dtype=a),
         lambda m: m(hidden.bfloat16(), labels), "decoder.weight"),
        ("LMHead", lambda a: fusedlm.nn.LMHead(32, 97, accum_dtype=a),
         lambda m: m(hidden.bfloat16(), labels), "weight"),
        ("BertForPreTraining", lambda a: fm.BertForPreTraining(fm.BertConfig(**bert, lm_loss_accum_dtype=a)),
         lambda m: m(ids, labels=labels).mlm_loss, "cls.predictions.decoder.weight"),
        ("RobertaForMaskedLM", lambda a: fm.RobertaForMaskedLM(fm.RobertaConfig(**bert, lm_loss_accum_dtype=a)),
         lambda m: m(ids, labels=labels).loss, "lm_head.decoder.weight"),
        ("GPTForCausalLM", lambda a: fm.GPTForCausalLM(fm.GPTConfig(**gpt, lm_loss_accum_dtype=a)),
         lambda m: m(ids, labels=labels).loss, "lm_head.weight"),
    ]


@pytest.mark.parametrize("case", range(5), ids=[c[0] for c in _bf16_heads_and_models()])
def test_accum_dtype_reaches_the_loss_from_every_head_and_model(case, monkeypatch):
    """accum_dtype=torch.float32 on a bf16 head (a module argument, or the model config's
    lm_loss_accum_dtype) changes exactly the decoder weight's gradient (summed in fp32 across
    the loss's chunks; forced to 4 rows here) and nothing else; a bad value is named."""
    import importlib
    monkeypatch.setattr(importlib.import_module("fusedlm.ops.lm_loss"), "default_chunk_size",
                        lambda vocab, dtype: 4)
    name, build, loss_of, decoder = _bf16_heads_and_models()[case]

    def grads(accum_dtype):
        torch.manual_seed(0)
        model = build(accum_dtype).to(DEVICE, torch.bfloat16)
        loss_of(model).backward()
        tied = model.get_parameter(decoder)  # named once, under another name where tied
        return tied.grad, [p.grad for p in model.parameters() if p is not tied and p.grad is not None]

    (wide, wide_rest), (default, default_rest) = grads(torch.float32), grads(None)
    assert wide.dtype == torch.bfloat16 and not torch.equal(wide, default)
    assert len(wide_rest) == len(default_rest)
    assert all(torch.equal(a, b) for a, b in zip(wide_rest, default_rest))
    with pytest.raises(ValueError, match="accum_dtype must be None or torch.float32"):
        build(torch.bfloat16)


def test_lm_head_with_accum_dtype_is_lm_loss_with_it(monkeypatch):
    """The head's loss and gradients are lm_loss's with the same option, bit for bit."""
    import importlib
    monkeypatch.setattr(importlib.import_module("fusedlm.ops.lm_loss"), "default_chunk_size",
                        lambda vocab, dtype: 4)
    torch.manual_seed(0)
    head = fusedlm.nn.LMHead(32, 97, accum_dtype=torch.float32).to(DEVICE, torch.bfloat16)
    hidden = torch.randn(4, 48, 32, device=DEVICE, dtype=torch.bfloat16)
    labels = torch.randint(0, 97, (4, 48), device=DEVICE)
    got = torch.autograd.grad(head(hidden, labels), [head.weight])[0]
    want = torch.autograd.grad(fusedlm.lm_loss(hidden, head.weight, labels, shift=True,
                                               accum_dtype=torch.float32), [head.weight])[0]
    assert torch.equal(got, want)
