"""Packed batches with static shapes (fusedlm.packing) and fusedlm's models on them: no token
lost or duplicated, no attention across sequences, the same losses as the padded batch, the same
shapes every step."""
import pytest
import torch

import fusedlm.models as fm
from fusedlm.packing import IGNORE_INDEX, PackedBatchSampler, PackingCollator
from conftest import DEVICE, rel_err

BERT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
            attention_probs_dropout_prob=0.0)
GPT = dict(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, resid_pdrop=0.0,
           embd_pdrop=0.0, attn_pdrop=0.0)


def _samples(lengths, seed=0, vocab=90):
    g = torch.Generator().manual_seed(seed)
    out = []
    for i, n in enumerate(lengths):
        ids = torch.randint(2, vocab, (n,), generator=g)
        labels = torch.full((n,), IGNORE_INDEX)
        labels[torch.rand(n, generator=g) < 0.3] = 7
        split = int(torch.randint(1, n, (), generator=g)) if n > 1 else 1
        types = (torch.arange(n) >= split).long()
        out.append(dict(input_ids=ids, token_type_ids=types, labels=labels,
                        next_sentence_label=i % 2))
    return out


def _to(batch):
    return {k: v.to(DEVICE) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def test_collator_keeps_every_token_once_and_every_pair_with_its_label():
    samples = _samples([5, 9, 1, 12])
    batch = PackingCollator(tokens=40, max_sequences=8, max_seqlen=16)(samples)
    cu = batch["cu_seqlens"]
    assert batch["input_ids"].shape == (40,) and cu.shape == (9,) and batch["max_seqlen"] == 16
    assert cu[0] == 0 and cu[-1] == 40 and (cu.diff() >= 0).all() and (cu.diff() <= 16).all()
    for i, s in enumerate(samples):  # sample i is slot i, whole, with its own labels
        a, b = int(cu[i]), int(cu[i + 1])
        assert torch.equal(batch["input_ids"][a:b], s["input_ids"])
        assert torch.equal(batch["token_type_ids"][a:b], s["token_type_ids"])
        assert torch.equal(batch["labels"][a:b], s["labels"])
        assert batch["next_sentence_label"][i] == s["next_sentence_label"]
    assert (batch["labels"][int(cu[4]):] == IGNORE_INDEX).all()        # filler: never a target
    assert (batch["next_sentence_label"][4:] == IGNORE_INDEX).all()    # filler and empty slots


def test_collator_refuses_what_does_not_fit_and_says_why():
    collate = PackingCollator(tokens=20, max_sequences=6, max_seqlen=16)
    with pytest.raises(ValueError, match="do not fit one step.*PackedBatchSampler"):
        collate(_samples([12, 12]))
    with pytest.raises(ValueError, match="1 to max_seqlen=16"):
        collate(_samples([17]))
    bad = _samples([3])
    bad[0]["labels"] = bad[0]["labels"][:2]
    with pytest.raises(ValueError, match=r"samples\[0\]\['labels'\] must have input_ids' length 3"):
        collate(bad)
    with pytest.raises(ValueError, match="max_sequences must be at least 3"):
        PackingCollator(tokens=20, max_sequences=2, max_seqlen=16)


@pytest.mark.parametrize("replicas", [1, 3])
def test_sampler_steps_fit_the_budget_and_cover_the_data(replicas):
    lengths = torch.randint(1, 17, (200,), generator=torch.Generator().manual_seed(0)).tolist()
    samplers = [PackedBatchSampler(lengths, tokens=64, max_sequences=10, max_seqlen=16,
                                   num_replicas=replicas, rank=r, seed=3) for r in range(replicas)]
    seen = []
    for s in samplers:
        steps = list(s)
        assert len(steps) == len(samplers[0])        # every rank the same number of steps
        for step in steps:
            n = sum(lengths[i] for i in step)
            assert n <= 64 and len(step) + -(-(64 - n) // 16) <= 10
            PackingCollator(tokens=64, max_sequences=10, max_seqlen=16)(_samples([lengths[i] for i in step]))
        seen += [i for step in steps for i in step]
    assert len(seen) == len(set(seen))                # no sample twice, across ranks too
    if replicas == 1:
        assert sorted(seen) == list(range(200))       # none lost
    first = list(samplers[0])
    samplers[0].set_epoch(1)
    assert list(samplers[0]) != first                 # reshuffled per epoch


def _padded(samples, keys):
    """The same samples as a right-padded batch (what the packed batch must reproduce)."""
    seq = max(len(s["input_ids"]) for s in samples)
    out = {"attention_mask": torch.zeros(len(samples), seq, dtype=torch.long)}
    for k in keys:
        out[k] = torch.full((len(samples), seq), IGNORE_INDEX if k == "labels" else 0)
    for i, s in enumerate(samples):
        n = len(s["input_ids"])
        out["attention_mask"][i, :n] = 1
        for k in keys:
            out[k][i, :n] = s[k]
    return out


def test_bert_pretraining_on_a_packed_batch_equals_the_padded_batch():
    """MLM and NSP losses and every gradient: packing changes where tokens sit, not what is
    computed (no attention across sequences, NSP pairs intact, filler ignored)."""
    torch.manual_seed(0)
    model = fm.BertForPreTraining(fm.BertConfig(**BERT)).to(DEVICE)
    samples = _samples([5, 9, 1, 12], seed=1)
    packed = _to(PackingCollator(tokens=48, max_sequences=8, max_seqlen=16)(samples))
    padded = _to(_padded(samples, ("input_ids", "token_type_ids", "labels")))
    padded["next_sentence_label"] = torch.tensor([s["next_sentence_label"] for s in samples], device=DEVICE)
    params = list(model.parameters())
    out_p = model(**packed)
    out_d = model(**padded)
    for name in ("mlm_loss", "nsp_loss", "mlm_accuracy"):
        assert rel_err(getattr(out_p, name), getattr(out_d, name)) < 1e-5, name
    g_p = torch.autograd.grad(out_p.loss, params, allow_unused=True)
    g_d = torch.autograd.grad(out_d.loss, params, allow_unused=True)
    for (n, _), a, b in zip(model.named_parameters(), g_p, g_d):
        if b is not None and b.norm() > 1e-7:
            assert rel_err(a, b) < 1e-4, n


def test_gpt_logits_on_a_packed_batch_equal_each_sequence_alone():
    torch.manual_seed(0)
    model = fm.GPTForCausalLM(fm.GPTConfig(**GPT)).to(DEVICE).eval()
    samples = _samples([7, 3, 11], seed=2)
    batch = _to(PackingCollator(tokens=32, max_sequences=6, max_seqlen=16)(
        [dict(input_ids=s["input_ids"], labels=s["input_ids"]) for s in samples]))
    logits = model(batch["input_ids"], cu_seqlens=batch["cu_seqlens"],
                   max_seqlen=batch["max_seqlen"]).logits
    cu = batch["cu_seqlens"].tolist()
    for i, s in enumerate(samples):
        alone = model(s["input_ids"][None].to(DEVICE)).logits[0]
        assert rel_err(logits[cu[i]:cu[i + 1]], alone) < 1e-5
    # The loss: each sequence's next-token loss, none across a boundary or into the filler.
    loss = model(**batch).loss
    terms = [torch.nn.functional.cross_entropy(model(s["input_ids"][None].to(DEVICE)).logits[0, :-1],
                                               s["input_ids"][1:].to(DEVICE), reduction="sum")
             for s in samples]
    assert rel_err(loss, sum(terms) / sum(len(s["input_ids"]) - 1 for s in samples)) < 1e-5


def test_classification_ignores_filler_and_empty_slots():
    torch.manual_seed(0)
    model = fm.BertForSequenceClassification(fm.BertConfig(**BERT, num_labels=3)).to(DEVICE).eval()
    samples = [dict(input_ids=s["input_ids"], labels=i % 3) for i, s in enumerate(_samples([6, 4]))]
    batch = _to(PackingCollator(tokens=24, max_sequences=5, max_seqlen=16)(samples))
    assert batch["labels"].tolist() == [0, 1, IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX]
    batch["labels"][-1] = 2  # a label on an empty slot is ignored, not trained on
    got = model(**batch).loss
    want = model(**_to(_padded(samples, ("input_ids",))), labels=torch.tensor([0, 1], device=DEVICE)).loss
    assert rel_err(got, want) < 1e-5


def test_packed_input_errors_name_the_argument():
    model = fm.BertForMaskedLM(fm.BertConfig(**BERT))
    ids, cu = torch.randint(2, 90, (10,)), torch.tensor([0, 4, 10], dtype=torch.int32)
    with pytest.raises(ValueError, match="attention_mask must be None with cu_seqlens"):
        model(ids, attention_mask=torch.ones(10), cu_seqlens=cu, max_seqlen=8)
    with pytest.raises(ValueError, match=r"input_ids must have shape \(tokens,\)"):
        model(ids[None], cu_seqlens=cu, max_seqlen=8)
    with pytest.raises(ValueError, match=r"max_seqlen must be an int in \[1, 64\]"):
        model(ids, cu_seqlens=cu, max_seqlen=None)
    with pytest.raises(ValueError, match="token_type_ids must have input_ids' shape"):
        model(ids, token_type_ids=torch.zeros(9, dtype=torch.long), cu_seqlens=cu, max_seqlen=8)
    with pytest.raises(TypeError, match="cu_seqlens must be int32 or int64, got torch.float32"):
        model(ids, cu_seqlens=cu.float(), max_seqlen=8)


@pytest.mark.parametrize("family", ["bert", "gpt"])
@pytest.mark.parametrize("bad", [[0, 4, 11], [1, 4, 10], [0, 6, 4, 10], [0, 9, 10]])
def test_a_packed_batchs_bad_offsets_are_an_error_from_the_model(family, bad):
    """The model checks a caller's offsets once for all its layers (which then skip the check):
    offsets that do not rise from 0 to the tokens, or a sequence longer than max_seqlen, are a
    ValueError naming cu_seqlens, never a kernel reading out of bounds."""
    # On the CPU: a GPU checks on the device (an assert that ends the process's CUDA context).
    model = (fm.BertForMaskedLM(fm.BertConfig(**BERT)) if family == "bert"
             else fm.GPTForCausalLM(fm.GPTConfig(**GPT)))
    ids, cu = torch.randint(2, 90, (10,)), torch.tensor(bad, dtype=torch.int32)
    with pytest.raises(ValueError, match="cu_seqlens must rise from 0 to 10 .* max_seqlen=8"):
        model(ids, cu_seqlens=cu, max_seqlen=8)


@pytest.mark.parametrize("family", ["bert", "gpt"])
@pytest.mark.parametrize("packed", [False, True])
def test_offsets_are_checked_once_a_forward_not_once_a_layer(family, packed, monkeypatch):
    """Each check of the offsets is about ten small kernels on a GPU: a caller's are checked
    once a forward whatever the depth, and those the model makes from an attention mask
    (unpad) not at all."""
    import importlib
    attention_ops = importlib.import_module("fusedlm.ops.attention")
    bert_mod = importlib.import_module("fusedlm.models.bert")
    calls = []
    real = attention_ops.check_varlen_offsets
    spy = lambda *a, **k: (calls.append(a[0]), real(*a, **k))[1]
    monkeypatch.setattr(attention_ops, "check_varlen_offsets", spy)
    monkeypatch.setattr(bert_mod, "check_varlen_offsets", spy)
    deep = dict(BERT, num_hidden_layers=4) if family == "bert" else dict(GPT, n_layer=4)
    model = (fm.BertForMaskedLM(fm.BertConfig(**deep)) if family == "bert"
             else fm.GPTForCausalLM(fm.GPTConfig(**deep))).to(DEVICE)
    ids = torch.randint(2, 90, (10,), device=DEVICE)
    if packed:
        model(ids, cu_seqlens=torch.tensor([0, 4, 10], dtype=torch.int32, device=DEVICE),
              max_seqlen=8)
        assert calls == ["cu_seqlens"]
    else:
        mask = torch.tensor([[1] * 5, [1] * 3 + [0] * 2], device=DEVICE)
        model(ids.view(2, 5), attention_mask=mask)
        assert calls == []


def test_packed_steps_compile_once_for_the_whole_run():
    """Two steps with different samples: the same shapes, so the compiled step is not traced
    again (dynamo's recompilation would raise here)."""
    torch.manual_seed(0)
    model = fm.BertForPreTraining(fm.BertConfig(**BERT)).to(DEVICE)
    collate = PackingCollator(tokens=48, max_sequences=8, max_seqlen=16)
    torch._dynamo.reset()
    step = torch.compile(lambda b: model(**b).loss, fullgraph=True, backend="aot_eager",
                         dynamic=False)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for seed, lengths in ((1, [5, 9, 1, 12]), (2, [16, 16, 3])):
            loss = step(_to(collate(_samples(lengths, seed=seed))))
            loss.backward()
            assert torch.isfinite(loss)
