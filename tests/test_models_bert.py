"""fusedlm's BERT against Hugging Face's, built from the same tiny config and the same weights."""
import pytest
import torch

import fusedlm.models as fm
from conftest import DEVICE, rel_err

transformers = pytest.importorskip("transformers")

CONFIG = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
              intermediate_size=64, max_position_embeddings=40, type_vocab_size=2)


def _batch(seed=0, batch=3, seq=17):
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(1, 101, (batch, seq), generator=g)
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 11:] = 0   # padding in the batch
    mask[2, 5:] = 0
    ids = ids * mask
    types = (torch.arange(seq)[None, :] >= 6).long().expand(batch, seq).contiguous()
    labels = torch.full((batch, seq), -100)
    pick = (torch.rand(batch, seq, generator=g) < 0.3) & (mask == 1)
    labels[pick] = ids[pick]
    labels[0, 1] = ids[0, 1]
    nsp = torch.tensor([0, 1, 1])
    return [t.to(DEVICE) for t in (ids, mask, types, labels, nsp)]


def _pair(hf_cls, our_cls):
    torch.manual_seed(0)
    hf_config = transformers.BertConfig(**CONFIG, attn_implementation="eager")
    hf = hf_cls(hf_config).to(DEVICE).eval()
    ours = our_cls(fm.BertConfig.from_hf(hf_config)).to(DEVICE).eval()
    missing, unexpected = ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def _param_grads(model):
    """Gradients by state-dict name (Hugging Face's, for both models; tied ones under each name)."""
    return {n: p.grad for n, p in model.state_dict(keep_vars=True).items()
            if isinstance(p, torch.nn.Parameter) and p.grad is not None}


def _assert_grads_match(hf, ours):
    g_hf, g_ours = _param_grads(hf), _param_grads(ours)
    assert set(g_ours) == set(g_hf)
    for name in g_hf:
        if g_hf[name].norm() < 1e-9:  # the key bias: softmax ignores it, its gradient is noise
            assert g_ours[name].norm() < 1e-9, name
            continue
        assert rel_err(g_ours[name], g_hf[name]) < 1e-4, name


def test_state_dict_keys_are_hugging_faces():
    hf, ours = _pair(transformers.BertForPreTraining, fm.BertForPreTraining)
    assert set(ours.state_dict()) == set(hf.state_dict())
    assert ours.cls.predictions.decoder.weight is ours.bert.embeddings.word_embeddings.weight


def test_pretraining_matches_hugging_face_with_padding():
    hf, ours = _pair(transformers.BertForPreTraining, fm.BertForPreTraining)
    ids, mask, types, labels, nsp = _batch()
    theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels,
                next_sentence_label=nsp)
    mine = ours(ids, mask, types, labels=labels, next_sentence_label=nsp)
    assert rel_err(mine.loss, theirs.loss) < 1e-5
    assert rel_err(mine.seq_relationship_logits, theirs.seq_relationship_logits) < 1e-5
    theirs.loss.backward()
    mine.loss.backward()
    _assert_grads_match(hf, ours)


def test_pretraining_under_autocast_matches_hugging_face():
    """bf16 autocast, as `fusedlm demo` trains on a GPU: sublayer outputs in bf16 meet the fp32
    residual stream in the fused residual + LayerNorm, and the fp32 decoder in the loss."""
    hf, ours = _pair(transformers.BertForPreTraining, fm.BertForPreTraining)
    ids, mask, types, labels, nsp = _batch()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels,
                    next_sentence_label=nsp)
        mine = ours(ids, mask, types, labels=labels, next_sentence_label=nsp)
    assert rel_err(mine.loss, theirs.loss) < 2e-2
    mine.loss.backward()
    grads = _param_grads(ours)
    assert grads and all(torch.isfinite(g).all() and g.dtype == torch.float32 for g in grads.values())


def test_pretraining_logits_without_labels():
    hf, ours = _pair(transformers.BertForPreTraining, fm.BertForPreTraining)
    ids, mask, types, _, _ = _batch(1)
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask, token_type_ids=types).prediction_logits
        mine = ours(ids, mask, types).prediction_logits
    real = mask.bool()
    assert rel_err(mine[real], theirs[real]) < 1e-5
    assert torch.count_nonzero(mine[~real]) == 0  # nothing is computed for padding


def test_masked_lm_and_classification_match():
    hf, ours = _pair(transformers.BertForMaskedLM, fm.BertForMaskedLM)
    ids, mask, types, labels, nsp = _batch(2)
    t = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=labels).loss
    m = ours(ids, mask, types, labels=labels).loss
    assert rel_err(m, t) < 1e-5
    hf, ours = _pair(transformers.BertForSequenceClassification, fm.BertForSequenceClassification)
    t = hf(input_ids=ids, attention_mask=mask, token_type_ids=types, labels=nsp)
    m = ours(ids, mask, types, labels=nsp)
    assert rel_err(m.logits, t.logits) < 1e-5 and rel_err(m.loss, t.loss) < 1e-5


def test_a_few_steps_lower_the_loss():
    torch.manual_seed(0)
    model = fm.BertForPreTraining(fm.BertConfig(**CONFIG)).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids, mask, types, labels, nsp = _batch(3)
    losses = []
    for _ in range(20):
        loss = model(ids, mask, types, labels=labels, next_sentence_label=nsp).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.7 * losses[0], losses


def test_bad_input():
    model = fm.BertModel(fm.BertConfig(**CONFIG)).to(DEVICE)
    ids = torch.ones(2, 50, dtype=torch.long, device=DEVICE)
    with pytest.raises(ValueError, match="max_position_embeddings"):
        model(ids)
    with pytest.raises(ValueError, match="attention_mask"):
        model(ids[:, :10], torch.ones(2, 9, device=DEVICE))


@pytest.mark.parametrize("family", ["bert", "gpt"])
def test_weights_start_as_bert_and_gpt2_initialize_them(family):
    """From scratch, weights are N(0, initializer_range) (GPT-2's residual projections scaled by
    1/sqrt(2 * n_layer)), biases 0, norms 1/0, BERT's padding embedding 0, the decoder still tied."""
    torch.manual_seed(0)
    if family == "bert":
        m = fm.BertForPreTraining(fm.BertConfig(vocab_size=3000, hidden_size=64, num_hidden_layers=2,
                                                num_attention_heads=2, intermediate_size=256,
                                                initializer_range=0.05))
        assert m.bert.embeddings.word_embeddings.weight[0].abs().max() == 0
        assert m.cls.predictions.decoder.weight is m.bert.embeddings.word_embeddings.weight
    else:
        m = fm.GPTForCausalLM(fm.GPTConfig(vocab_size=3000, n_embd=64, n_layer=8, n_head=2,
                                           initializer_range=0.05))
        assert m.lm_head.weight is m.transformer.wte.weight
    for name, p in m.named_parameters():
        if "LayerNorm" in name or ".ln_" in name:
            assert torch.all(p == (1 if name.endswith("weight") else 0)), name
        elif name.endswith("bias"):
            assert torch.all(p == 0), name
        elif p.numel() >= 4096:
            want = 0.05 / 4 if "c_proj" in name else 0.05
            assert abs(p.std().item() / want - 1) < 0.1, (name, p.std().item())


def test_roberta_masked_lm_matches_hugging_face_with_padding():
    """RoBERTa: positions start after the padding index and count real tokens only; the head's
    parameters have RoBERTa's names; checkpoints load and save one to one."""
    torch.manual_seed(0)
    hf_config = transformers.RobertaConfig(**{**CONFIG, "type_vocab_size": 1}, pad_token_id=1,
                                           attn_implementation="eager")
    hf = transformers.RobertaForMaskedLM(hf_config).to(DEVICE).eval()
    ours = fm.RobertaForMaskedLM(fm.RobertaConfig.from_hf(hf_config)).to(DEVICE).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    assert set(ours.state_dict()) == set(hf.state_dict())
    ids, mask, _, labels, _ = _batch()
    ids = torch.where(mask.bool(), ids.clamp_min(2), torch.ones_like(ids))  # RoBERTa pads with 1
    labels = torch.where(labels != -100, ids, labels)
    theirs = hf(input_ids=ids, attention_mask=mask, labels=labels)
    mine = ours(ids, mask, labels=labels)
    assert rel_err(mine.loss, theirs.loss) < 1e-5
    theirs.loss.backward()
    mine.loss.backward()
    _assert_grads_match(hf, ours)
    logits = ours(ids, mask).prediction_logits
    real = mask.bool()
    assert rel_err(logits[real], hf(input_ids=ids, attention_mask=mask).logits[real]) < 1e-5
    # And back: our state dict loads into Hugging Face's model unchanged.
    fresh = transformers.RobertaForMaskedLM(hf_config).to(DEVICE)
    fresh.load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.parametrize("cls", [fm.BertForMaskedLM, fm.RobertaForMaskedLM])
def test_masked_lm_models_honour_mlm_capacity(cls):
    """config.mlm_capacity reaches the head of every masked-LM model (RoBERTa's ignored it):
    the same loss at a capacity above the labelled count, an error below it."""
    import dataclasses
    config = (fm.RobertaConfig if cls is fm.RobertaForMaskedLM else fm.BertConfig)(**CONFIG)
    ids, mask, _, labels, _ = _batch()
    ids = ids.clamp_min(2)  # RoBERTa's padding index is 1; the mask marks the padding
    n = int((labels != -100).sum())
    torch.manual_seed(0)
    model = cls(config).to(DEVICE).eval()  # no dropout: the two calls compare
    want = model(ids, mask, labels=labels).loss
    for capacity, error in ((n, None), (n - 1, "more labelled rows than capacity")):
        capped = cls(dataclasses.replace(config, mlm_capacity=capacity)).to(DEVICE).eval()
        capped.load_state_dict(model.state_dict())
        if error:
            with pytest.raises(ValueError, match=error):
                capped(ids, mask, labels=labels)
        else:
            assert rel_err(capped(ids, mask, labels=labels).loss, want) < 1e-6


@pytest.mark.parametrize("num_labels", [3, 1])
def test_roberta_classification_matches_hugging_face_with_padding(num_labels):
    """RobertaForSequenceClassification: the head reads <s> (no pooler), dropout -> dense ->
    tanh -> dropout -> out_proj; keys load one to one; loss (CE, or MSE for one label) and
    every gradient equal Hugging Face's."""
    torch.manual_seed(0)
    hf_config = transformers.RobertaConfig(**{**CONFIG, "type_vocab_size": 1}, pad_token_id=1,
                                           num_labels=num_labels, attn_implementation="eager")
    hf = transformers.RobertaForSequenceClassification(hf_config).to(DEVICE).eval()
    ours = fm.RobertaForSequenceClassification(fm.RobertaConfig.from_hf(hf_config)).to(DEVICE).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    assert set(ours.state_dict()) == set(hf.state_dict())
    ids, mask, _, _, _ = _batch()
    ids = torch.where(mask.bool(), ids.clamp_min(2), torch.ones_like(ids))
    labels = (torch.tensor([0, 2, 1], device=DEVICE) if num_labels > 1
              else torch.tensor([0.5, -1.0, 2.0], device=DEVICE))
    theirs = hf(input_ids=ids, attention_mask=mask, labels=labels)
    mine = ours(ids, mask, labels=labels)
    assert rel_err(mine.logits, theirs.logits) < 1e-5 and rel_err(mine.loss, theirs.loss) < 1e-5
    theirs.loss.backward()
    mine.loss.backward()
    _assert_grads_match(hf, ours)


def test_from_hf_refuses_a_decoder_or_another_model_type():
    for option in ("is_decoder", "add_cross_attention"):
        with pytest.raises(ValueError, match=f"config.{option}=True is not supported by BertConfig"):
            fm.BertConfig.from_hf(transformers.BertConfig(**CONFIG, **{option: True}))
    with pytest.raises(ValueError, match="'gpt2' config; BertConfig.from_hf takes model_type 'bert'"):
        fm.BertConfig.from_hf(transformers.GPT2Config())
    with pytest.raises(ValueError, match="'bert' config; RobertaConfig.from_hf takes model_type 'roberta'"):
        fm.RobertaConfig.from_hf(transformers.BertConfig())


def test_float_attention_mask_is_refused_not_reinterpreted():
    """0/1 to Hugging Face, additive to torch: a float mask's meaning is the caller's, and
    reading an additive 0 / -10000 mask as 0/1 inverts it."""
    _, ours = _pair(transformers.BertForPreTraining, fm.BertForPreTraining)
    ids, mask, types, labels, nsp = _batch()
    additive = (1.0 - mask.float()) * -10000.0
    for bad in (additive, mask.float()):
        with pytest.raises(TypeError, match="attention_mask must be bool or integer"):
            ours(ids, attention_mask=bad, token_type_ids=types)


@pytest.mark.parametrize("row", [1, 2])  # in the middle of the batch; the last row
def test_a_sequence_of_padding_only_is_an_error_not_anothers_state(row):
    _, ours = _pair(transformers.BertForSequenceClassification, fm.BertForSequenceClassification)
    ids, mask, types, labels, nsp = _batch()
    mask[row] = 0
    with pytest.raises(ValueError, match="every row of attention_mask needs a real token"):
        ours(ids, attention_mask=mask, token_type_ids=types)
    mask[:] = 0
    with pytest.raises(ValueError, match="every row of attention_mask needs a real token"):
        ours(ids, attention_mask=mask, token_type_ids=types)
