"""fusedlm.patch on Hugging Face models: same losses and gradients, padding kept, unpatch exact."""
import copy

import pytest
import torch

import fusedlm
from conftest import DEVICE, rel_err

transformers = pytest.importorskip("transformers")

SMALL = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             intermediate_size=64, max_position_embeddings=40)


def _models():
    t = transformers
    return {
        "BertForMaskedLM": lambda: t.BertForMaskedLM(t.BertConfig(**SMALL)),
        "BertForPreTraining": lambda: t.BertForPreTraining(t.BertConfig(**SMALL)),
        "BertForSequenceClassification": lambda: t.BertForSequenceClassification(t.BertConfig(**SMALL)),
        "BertModel": lambda: t.BertModel(t.BertConfig(**SMALL)),
        "RobertaForMaskedLM": lambda: t.RobertaForMaskedLM(t.RobertaConfig(**dict(SMALL, max_position_embeddings=44), pad_token_id=1)),
        "DistilBertForMaskedLM": lambda: t.DistilBertForMaskedLM(t.DistilBertConfig(
            vocab_size=101, dim=32, n_layers=2, n_heads=4, hidden_dim=64, max_position_embeddings=40)),
        "GPT2LMHeadModel": lambda: t.GPT2LMHeadModel(t.GPT2Config(vocab_size=101, n_positions=40, n_embd=32,
                                                                  n_layer=2, n_head=4, bos_token_id=0, eos_token_id=0)),
        # The Llama family: grouped-query heads (4 query, 2 key/value), RoPE, RMSNorm.
        "LlamaForCausalLM": lambda: t.LlamaForCausalLM(t.LlamaConfig(**LLAMA)),
        "MistralForCausalLM": lambda: t.MistralForCausalLM(t.MistralConfig(**LLAMA, sliding_window=None)),
        "Qwen2ForCausalLM": lambda: t.Qwen2ForCausalLM(t.Qwen2Config(**LLAMA)),
        "Qwen3ForCausalLM": lambda: t.Qwen3ForCausalLM(t.Qwen3Config(**LLAMA, head_dim=8)),
        # ModernBERT: rotary, bias-free LayerNorms, GeGLU; local (sliding-window) layers between
        # global ones, the window (2 each side) much shorter than the batch's 15 tokens.
        "ModernBertForMaskedLM": lambda: t.ModernBertForMaskedLM(t.ModernBertConfig(**MODERNBERT)),
        "ModernBertModel": lambda: t.ModernBertModel(t.ModernBertConfig(**MODERNBERT)),
    }


LLAMA = dict(vocab_size=101, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, intermediate_size=64, max_position_embeddings=40,
             bos_token_id=0, eos_token_id=0, pad_token_id=0)


MODERNBERT = dict(vocab_size=101, hidden_size=32, intermediate_size=48, num_hidden_layers=3,
                  num_attention_heads=4, global_attn_every_n_layers=2, local_attention=4,
                  max_position_embeddings=40, pad_token_id=0, bos_token_id=1, eos_token_id=2,
                  cls_token_id=1, sep_token_id=2)


def _inputs(name):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 101, (3, 15), generator=g)
    mask = torch.ones(3, 15, dtype=torch.long)
    mask[1, 10:] = 0
    mask[2, 4:] = 0
    kw = dict(input_ids=ids, attention_mask=mask)
    if name == "GPT2LMHeadModel" or name.endswith("ForCausalLM"):
        kw["labels"] = ids.masked_fill(mask == 0, -100)
    elif name.endswith("MaskedLM") or name == "BertForPreTraining":
        labels = torch.full_like(ids, -100)
        pick = (torch.rand(3, 15, generator=g) < 0.4) & (mask == 1)
        labels[pick] = ids[pick]
        labels[0, 2] = ids[0, 2]
        kw["labels"] = labels
        if name == "BertForPreTraining":
            kw["next_sentence_label"] = torch.tensor([0, 1, 0])
    elif name == "BertForSequenceClassification":
        kw["labels"] = torch.tensor([0, 1, 1])
    return {k: v.to(DEVICE) for k, v in kw.items()}, mask.to(DEVICE).bool()


def _scalar(out, mask):
    if getattr(out, "loss", None) is not None:
        return out.loss
    # A fixed random projection of the real tokens' states (their squared norm after the final
    # LayerNorm is the constant H: its gradient would be rounding noise).
    h = out.last_hidden_state[mask]
    w = torch.randn(h.shape, generator=torch.Generator().manual_seed(5)).to(h.device)
    return (h * w).sum()


@pytest.mark.parametrize("name", list(_models()))
def test_patched_model_matches_the_original(name):
    torch.manual_seed(0)
    ref = _models()[name]().to(DEVICE).eval()
    model = copy.deepcopy(ref)
    report = fusedlm.patch(model)
    assert any(p.startswith("attention") for p in report.patched)
    kw, mask = _inputs(name)
    want = _scalar(ref(**kw), mask)
    got = _scalar(model(**kw), mask)
    assert rel_err(got, want) < 1e-5
    want.backward()
    got.backward()
    scale = max(p.grad.norm() for p in ref.parameters() if p.grad is not None)
    for (n, p), (_, q) in zip(ref.named_parameters(), model.named_parameters()):
        if p.grad is None or p.grad.norm() < 1e-6 * scale:  # e.g. the key bias: softmax ignores it
            assert q.grad is None or q.grad.norm() < 1e-6 * scale, n
            continue
        assert rel_err(q.grad, p.grad) < 1e-4, n


@pytest.mark.parametrize("name", ["GPT2LMHeadModel", "RobertaForMaskedLM", "BertForMaskedLM",
                                  "BertForPreTraining", "ModernBertForMaskedLM"])
def test_loss_honours_num_items_in_batch_as_the_original_does(name):
    """Trainer passes num_items_in_batch with gradient accumulation: a class whose own loss
    divides the sum by it must get the same from the patch (the others average either way)."""
    torch.manual_seed(0)
    ref = _models()[name]().to(DEVICE).eval()
    model = copy.deepcopy(ref)
    fusedlm.patch(model)
    kw, _ = _inputs(name)
    for n in (100, torch.tensor(7, device=DEVICE)):
        want, got = ref(**kw, num_items_in_batch=n).loss, model(**kw, num_items_in_batch=n).loss
        assert rel_err(got, want) < 1e-5, (float(got.detach()), float(want.detach()))


def test_pretraining_with_masked_lm_labels_only_is_the_originals():
    """Hugging Face's BertForPreTraining gives no loss without next_sentence_label (and its
    logits); the patch must not invent one."""
    ref = _models()["BertForPreTraining"]().to(DEVICE).eval()
    model = copy.deepcopy(ref)
    fusedlm.patch(model)
    kw, _ = _inputs("BertForPreTraining")
    del kw["next_sentence_label"]
    want, got = ref(**kw), model(**kw)
    assert want.loss is None and got.loss is None
    assert rel_err(got.prediction_logits, want.prediction_logits) < 1e-5


def _unservable():
    t = transformers
    if not hasattr(t, "GptOssForCausalLM"):
        return {}
    cfg = dict(vocab_size=101, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, head_dim=8, num_local_experts=2,
               num_experts_per_tok=1, max_position_embeddings=64)
    return {"gpt-oss attention sinks": (lambda: t.GptOssForCausalLM(t.GptOssConfig(**cfg)), "s_aux")}


@pytest.mark.parametrize("case", list(_unservable()))
def test_attention_it_cannot_serve_is_left_alone_and_reported(case):
    make, why = _unservable()[case]
    torch.manual_seed(0)
    ref = make().to(DEVICE).eval()
    model = copy.deepcopy(ref)
    report = fusedlm.patch(model)
    assert any(a == "attention" and why in w for a, w in report.left_alone), str(report)
    assert not any(p.startswith("attention") for p in report.patched)
    ids = torch.randint(3, 101, (2, 12), generator=torch.Generator().manual_seed(0)).to(DEVICE)
    want = ref(input_ids=ids, use_cache=False).logits
    assert rel_err(model(input_ids=ids, use_cache=False).logits, want) < 1e-5


def test_attention_refuses_sinks_passed_at_the_call():
    from fusedlm.integrations.hf import _attention_forward
    q = torch.randn(1, 2, 5, 16, device=DEVICE)
    for kwarg in ("s_aux",):
        with pytest.raises(ValueError, match=f"fusedlm attention has no {kwarg}"):
            _attention_forward(torch.nn.Module(), q, q, q, None, **{kwarg: 4})


@pytest.mark.parametrize("family", ["mistral", "qwen2", "gemma2"])
def test_sliding_window_models_are_patched_and_match(family):
    """Mistral (every layer) and Qwen2 (use_sliding_window: the upper layers) with a window
    shorter than the batch: fusedlm's windowed attention, padded batch, loss and gradients
    equal the unpatched model's; greedy generation with a cache too."""
    t = transformers
    torch.manual_seed(0)
    if family == "mistral":
        ref = t.MistralForCausalLM(t.MistralConfig(**dict(LLAMA, sliding_window=4)))
    elif family == "qwen2":
        ref = t.Qwen2ForCausalLM(t.Qwen2Config(**LLAMA, use_sliding_window=True, sliding_window=4,
                                               max_window_layers=1))
    else:  # sliding window on alternate layers, attention logits soft-capped at 5
        ref = t.Gemma2ForCausalLM(t.Gemma2Config(**LLAMA, head_dim=8, sliding_window=4,
                                                 attn_logit_softcapping=5.0))
    ref = ref.to(DEVICE).eval()
    model = copy.deepcopy(ref)
    report = fusedlm.patch(model)
    assert any(p.startswith("attention") for p in report.patched), str(report)
    kw, _ = _inputs(f"{family}ForCausalLM")
    want, got = ref(**kw).loss, model(**kw).loss
    assert rel_err(got, want) < 1e-5
    want.backward()
    got.backward()
    for (n, p), q in zip(ref.named_parameters(), model.parameters()):
        if p.grad is not None and p.grad.norm() > 1e-7:
            assert rel_err(q.grad, p.grad) < 1e-4, n
    ids = kw["input_ids"][:1, :5]
    gen = dict(max_new_tokens=8, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **gen), ref.generate(ids, **gen))


def test_patched_gpt2_generates_what_the_original_does():
    """generate() with a cache: one new query against all the cached keys at every step (in
    Hugging Face's (batch, heads, seq, D) layout, where seq_q != seq_k)."""
    torch.manual_seed(0)
    ref = _models()["GPT2LMHeadModel"]().to(DEVICE).eval()
    model = copy.deepcopy(ref)
    fusedlm.patch(model)
    ids = torch.randint(3, 101, (2, 6), generator=torch.Generator().manual_seed(1)).to(DEVICE)
    kw = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(model.generate(ids, **kw), ref.generate(ids, **kw))


def test_padding_is_masked_not_dropped():
    """Padded keys must not leak into real tokens: compare a padded row with the same tokens alone."""
    torch.manual_seed(0)
    model = _models()["BertModel"]().to(DEVICE).eval()
    fusedlm.patch(model)
    ids = torch.randint(3, 101, (2, 12), device=DEVICE)
    mask = torch.ones(2, 12, dtype=torch.long, device=DEVICE)
    mask[1, 7:] = 0
    padded = model(input_ids=ids, attention_mask=mask).last_hidden_state[1, :7]
    alone = model(input_ids=ids[1:, :7]).last_hidden_state[0]
    assert rel_err(padded, alone) < 1e-5


def test_unpatch_restores_exactly_and_patches_do_not_leak():
    torch.manual_seed(0)
    model = _models()["BertForMaskedLM"]().to(DEVICE)
    before = {n: type(m) for n, m in model.named_modules()}
    impl = model.config._attn_implementation
    other = _models()["BertForMaskedLM"]().to(DEVICE)
    report = fusedlm.patch(model)
    assert "LayerNorm: " in str(report) and model.config._attn_implementation == "fusedlm"
    assert other.config._attn_implementation == impl       # another model is untouched
    with pytest.raises(ValueError, match="already patched"):
        fusedlm.patch(model)
    kw, _ = _inputs("BertForMaskedLM")
    assert model(**kw).logits is None                        # the logits were never built
    fusedlm.unpatch(model)
    assert {n: type(m) for n, m in model.named_modules()} == before
    assert model.config._attn_implementation == impl
    assert not any(k in m.__dict__ for m in model.modules()  # no fused forward left
                   for k in ("forward", "feed_forward_chunk", "_fusedlm_mlp_activation"))
    assert model(**kw).logits is not None
    with pytest.raises(ValueError, match="not patched"):
        fusedlm.unpatch(model)


def test_patch_rejects_what_it_cannot_patch():
    with pytest.raises(TypeError, match="PreTrainedModel"):
        fusedlm.patch(torch.nn.Linear(2, 2))
    model = _models()["BertForSequenceClassification"]()
    report = fusedlm.patch(model)
    assert any(w == "loss" for w, _ in report.left_alone)
    fusedlm.unpatch(model)


@pytest.mark.gpu
@pytest.mark.parametrize("name", ["BertForPreTraining", "GPT2LMHeadModel"])
def test_patched_model_in_bf16_on_the_gpu_kernels(name):
    """On a GPU in bf16 the patch runs the Triton attention and loss kernels: the loss stays
    within bf16 tolerance of the unpatched model's."""
    torch.manual_seed(0)
    ref = _models()[name]().to("cuda", torch.bfloat16).eval()
    model = copy.deepcopy(ref)
    fusedlm.patch(model)
    kw, mask = _inputs(name)
    want = ref(**kw).loss.float()
    got = model(**kw).loss
    assert fusedlm.explain("attention").backend == "triton"
    assert abs(float(got) - float(want)) < 2e-2 * abs(float(want))


def test_patched_model_under_torch_compile():
    torch.manual_seed(0)
    model = _models()["BertForMaskedLM"]().to(DEVICE).eval()
    fusedlm.patch(model)
    kw, _ = _inputs("BertForMaskedLM")
    eager = model(**kw).loss
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="aot_eager")(**kw).loss
    assert rel_err(compiled, eager) < 1e-6


@pytest.mark.parametrize("name", ["BertForPreTraining", "RobertaForMaskedLM", "GPT2LMHeadModel"])
@pytest.mark.parametrize("dropout", [False, True])
def test_patched_training_step_compiles_whole(name, dropout):
    """A patched model's training step (padded batch, dropout, fused loss) traces into one graph
    under torch.compile(fullgraph=True): nothing reads a value back to the host (the padding
    mask is not asked whether it is all ones; a drawn dropout seed stays a tensor). Without
    dropout, compiled and eager agree on the loss and every gradient."""
    torch.manual_seed(0)
    model = _models()[name]().to(DEVICE)
    if not dropout:
        for m in model.modules():
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
        for cfg in {id(m.config): m.config for m in model.modules() if hasattr(m, "config")}.values():
            for attr in ("attention_probs_dropout_prob", "attn_pdrop"):
                if hasattr(cfg, attr):
                    setattr(cfg, attr, 0.0)
    fusedlm.patch(model)
    model.train()
    kw, _ = _inputs(name)
    torch._dynamo.reset()
    compiled = torch.compile(lambda **k: model(**k).loss, fullgraph=True, backend="aot_eager")
    loss = compiled(**kw)
    grads = torch.autograd.grad(loss, [p for p in model.parameters() if p.requires_grad],
                                allow_unused=True)
    assert torch.isfinite(loss)
    if dropout:
        return
    eager = model(**kw).loss
    eager_grads = torch.autograd.grad(eager, [p for p in model.parameters() if p.requires_grad],
                                      allow_unused=True)
    assert rel_err(loss, eager) < 1e-5
    scale = max(e.norm() for e in eager_grads if e is not None)
    for (n, _), g, e in zip(model.named_parameters(), grads, eager_grads):
        if e is not None and e.norm() > 1e-6 * scale:  # not the key bias: softmax ignores it
            assert rel_err(g, e) < 1e-4, n


def _packed_batch(lengths, seed=3):
    g = torch.Generator().manual_seed(seed)
    seqs = [torch.randint(3, 101, (n,), generator=g) for n in lengths]
    ids = torch.cat(seqs)[None].to(DEVICE)
    positions = torch.cat([torch.arange(n) for n in lengths])[None].to(DEVICE)
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32, device=DEVICE)
    return seqs, ids, positions, cu


@pytest.mark.parametrize("name", ["GPT2LMHeadModel", "BertModel", "ModernBertModel"])
@pytest.mark.parametrize("given", ["position_ids", "cu_seq_lens"])
def test_packed_row_attends_within_each_sequence(name, given):
    """Padding-free batches (one row of concatenated sequences, as DataCollatorWithFlattening
    makes): each sequence's states equal those of the sequence run alone, whether the
    boundaries come from position_ids restarting or from cu_seq_lens_q/k."""
    torch.manual_seed(0)
    model = _models()[name]().to(DEVICE).eval()
    fusedlm.patch(model)
    lengths = [5, 9, 3]
    seqs, ids, positions, cu = _packed_batch(lengths)
    kw = dict(input_ids=ids, position_ids=positions)
    if given == "cu_seq_lens":
        kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9)
    hidden = lambda out: out.logits if name == "GPT2LMHeadModel" else out.last_hidden_state
    packed = hidden(model(**kw))[0]
    for s, (a, b) in zip(seqs, zip(cu[:-1].tolist(), cu[1:].tolist())):
        alone = hidden(model(input_ids=s[None].to(DEVICE)))[0]
        assert rel_err(packed[a:b], alone) < 1e-5


@pytest.mark.parametrize("given", ["position_ids", "cu_seq_lens"])
def test_packed_row_offsets_are_made_once_a_forward_not_once_a_layer(given, monkeypatch):
    """A padding-free row's offsets: made from position_ids (a host read) or checked (given)
    by the first layer, reused by the others: a patched forward reads the host as often at
    depth 4 as at depth 2 (1-1.5 more reads a layer before), and launches fewer kernels a layer
    than a forward in which every layer makes and checks its own. Counted on the Triton
    backend with its launches stubbed, as a GPU would run it (the torch backend's varlen
    emulation reads the offsets itself)."""
    from fusedlm.bench.host import count_launches, launches_stubbed
    from fusedlm.integrations import hf
    from fusedlm.ops import dispatch
    monkeypatch.setenv(dispatch.ENV_VAR, "triton")
    lengths = [5, 9, 3]
    _, ids, positions, cu = _packed_batch(lengths)
    kw = dict(input_ids=ids, position_ids=positions)
    if given == "cu_seq_lens":
        kw.update(cu_seq_lens_q=cu, cu_seq_lens_k=cu, max_length_q=9, max_length_k=9)
    counts = {}
    for layers in (2, 4):
        torch.manual_seed(0)
        model = transformers.BertModel(transformers.BertConfig(**dict(
            SMALL, hidden_size=64, intermediate_size=64, num_hidden_layers=layers)))  # head dim 16
        fusedlm.patch(model.to(DEVICE, torch.float16).eval())  # the Triton attention's dtypes
        with launches_stubbed(), torch.no_grad():
            counts[layers] = count_launches(lambda: model(**kw))
            # The same forward with every layer on its own (outside a patched forward's scope).
            scope = model._forward_pre_hooks.copy()
            model._forward_pre_hooks.clear()
            try:
                hf._offsets_scope = None
                counts[layers, "each"] = count_launches(lambda: model(**kw))
            finally:
                model._forward_pre_hooks.update(scope)
    assert counts[4][2] == counts[2][2], counts  # host reads
    per_layer = (counts[4][0] - counts[2][0]) / 2
    each = (counts[4, "each"][0] - counts[2, "each"][0]) / 2
    assert per_layer < each - 4, counts


@pytest.mark.parametrize("name", ["BertForMaskedLM", "GPT2LMHeadModel"])
def test_padding_free_step_with_the_collators_offsets_compiles_whole(name):
    """A padding-free batch with DataCollatorWithFlattening's cu_seq_lens/max_length
    (return_flash_attn_kwargs=True) traces into one graph under torch.compile(fullgraph=True),
    loss and gradients as in eager mode (position_ids alone give the boundaries only through a
    data-dependent size: that batch breaks the graph, as with transformers' flash attention)."""
    torch.manual_seed(0)
    model = _models()[name]().to(DEVICE).eval()  # eval: no dropout, so the two runs compare
    fusedlm.patch(model)
    seqs, _, _, _ = _packed_batch([6, 11, 4], seed=2)
    batch = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True)(
        [{"input_ids": s.tolist(), "labels": s.tolist()} for s in seqs])
    batch = {k: v.to(DEVICE) if torch.is_tensor(v) else v for k, v in batch.items()}
    params = [p for p in model.parameters() if p.requires_grad]
    eager = model(**batch).loss
    want = torch.autograd.grad(eager, params, allow_unused=True)
    torch._dynamo.reset()
    loss = torch.compile(lambda **k: model(**k).loss, fullgraph=True, backend="aot_eager")(**batch)
    got = torch.autograd.grad(loss, params, allow_unused=True)
    assert rel_err(loss, eager) < 1e-5
    scale = max(w.norm() for w in want if w is not None)
    for g, w in zip(got, want):
        if w is not None and w.norm() > 1e-6 * scale:
            assert rel_err(g, w) < 1e-4


def test_packed_row_offsets_are_checked_again_in_the_next_forward():
    """Offsets are reused within one forward only: offsets written between two forwards
    through numpy (no version counter change) are checked and used afresh, whether they reach
    the kernels as they are (int32) or converted (int64)."""
    torch.manual_seed(0)
    model = _models()["BertModel"]().eval()
    fusedlm.patch(model)
    _, ids, positions, _ = _packed_batch([5, 9, 3])
    ids, positions = ids.cpu(), positions.cpu()
    run = lambda cu: model(input_ids=ids, position_ids=positions, cu_seq_lens_q=cu, cu_seq_lens_k=cu,
                           max_length_q=9, max_length_k=9).last_hidden_state
    for dtype in (torch.int32, torch.int64):
        offsets = torch.tensor([0, 5, 14, 17], dtype=dtype)
        first = run(offsets)
        offsets.numpy()[1] = 12  # a sequence of 12 rows, longer than max_length 9
        with pytest.raises(ValueError, match="cu_seqlens_q must rise from 0 to 17"):
            run(offsets)
        offsets.numpy()[1] = 8  # [0, 8, 14, 17]: valid, other sequences
        moved = run(offsets)
        assert torch.equal(moved, run(offsets.clone())) and not torch.equal(moved[0, :5], first[0, :5])


def test_modernbert_report_windows_and_exact_unpatch():
    """ModernBERT's local layers keep their window under fusedlm's attention (a model with no
    window differs), its base model gets the boundaries hook, and unpatch removes it."""
    torch.manual_seed(0)
    ref = _models()["ModernBertForMaskedLM"]().to(DEVICE).eval()
    assert [layer.attn.sliding_window for layer in ref.model.layers] == [None, 3, None]
    model = copy.deepcopy(ref)
    report = str(fusedlm.patch(model))
    assert "LayerNorm: 8 module(s)" in report and "loss: fused" in report
    assert "ModernBertModel: padding-free rows' sequence boundaries" in report
    kw, mask = _inputs("ModernBertForMaskedLM")
    kw.pop("labels")
    got = model(**kw).logits  # no labels: the original forward, on patched modules
    assert rel_err(got[mask], ref(**kw).logits[mask]) < 1e-5
    wide = transformers.ModernBertForMaskedLM(transformers.ModernBertConfig(**dict(MODERNBERT, local_attention=40)))
    wide.load_state_dict(ref.state_dict())
    assert rel_err(wide.to(DEVICE).eval()(**kw).logits[mask], got[mask]) > 1e-3  # windows matter
    fusedlm.unpatch(model)
    assert not model.model._forward_pre_hooks and model.config._attn_implementation == "sdpa"


def test_flattening_collator_loss_is_each_sequences_own():
    """DataCollatorWithFlattening through a patched GPT-2: the loss of a packed row is the mean
    over the same sequences' tokens run one by one (the first token of each predicts nothing
    from the previous sequence)."""
    torch.manual_seed(0)
    model = _models()["GPT2LMHeadModel"]().to(DEVICE).eval()
    fusedlm.patch(model)
    lengths = [6, 4, 8]
    seqs, _, _, _ = _packed_batch(lengths, seed=5)
    collator = transformers.DataCollatorWithFlattening()
    batch = collator([{"input_ids": s.tolist()} for s in seqs])
    batch = {k: v.to(DEVICE) for k, v in batch.items()}
    packed = model(**batch).loss
    sums = [model(input_ids=s[None].to(DEVICE), labels=s[None].to(DEVICE)).loss * (len(s) - 1)
            for s in seqs]
    assert rel_err(packed, sum(sums) / sum(n - 1 for n in lengths)) < 1e-5


_ATTN_IMPLEMENTATION = """
import os, sys
os.environ.setdefault("TRITON_INTERPRET", "1")
order = sys.argv[1]
if order == "transformers first":
    import transformers.modeling_utils  # noqa: F401
import fusedlm
import torch
import transformers
cfg = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
           intermediate_size=64, max_position_embeddings=32)
torch.manual_seed(0)
ref = transformers.BertModel(transformers.BertConfig(**cfg, attn_implementation="sdpa")).eval()
ours = transformers.BertModel(transformers.BertConfig(**cfg, attn_implementation="fusedlm")).eval()
ours.load_state_dict(ref.state_dict())
assert ours.config._attn_implementation == "fusedlm"
ids = torch.randint(1, 99, (2, 12))
mask = torch.ones(2, 12, dtype=torch.long); mask[1, 7:] = 0
want = ref(ids, attention_mask=mask).last_hidden_state
got = ours(ids, attention_mask=mask).last_hidden_state
assert fusedlm.explain("attention") is not None, "fusedlm's attention never ran"
err = ((got - want)[mask.bool()].norm() / want[mask.bool()].norm()).item()
assert err < 1e-5, err
if hasattr(ref, "set_attn_implementation"):
    ref.set_attn_implementation("fusedlm")
    assert ref.config._attn_implementation == "fusedlm"
print("attn_implementation fusedlm: ok")
"""


@pytest.mark.parametrize("order", ["fusedlm first", "transformers first"])
def test_attn_implementation_fusedlm_without_a_patch(order, tmp_path):
    """After `import fusedlm` (before or after transformers), attn_implementation="fusedlm"
    builds a model on fusedlm's attention, padding mask included, equal to sdpa's; `import
    fusedlm` itself imports no transformers (tests/test_core.py)."""
    import subprocess
    import sys
    script = tmp_path / "attn_impl.py"
    script.write_text(_ATTN_IMPLEMENTATION)
    run = subprocess.run([sys.executable, str(script), order], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and "fusedlm: ok" in run.stdout, run.stderr[-3000:]


def test_import_hook_leaves_the_hooked_module_its_own_loader(tmp_path, monkeypatch):
    """The hook runs its function after the module executes and leaves nothing of itself
    behind: the module keeps its own loader (tracebacks, get_source), the hook is gone."""
    import importlib
    import sys
    from fusedlm._after_import import call_after_import, _Hook
    (tmp_path / "fusedlm_probe_mod.py").write_text("VALUE = 41\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    seen = []
    call_after_import("fusedlm_probe_mod", lambda: seen.append(sys.modules["fusedlm_probe_mod"].VALUE))
    def hooked():
        return [f for f in sys.meta_path if isinstance(f, _Hook) and f.name == "fusedlm_probe_mod"]
    assert seen == [] and hooked()
    mod = importlib.import_module("fusedlm_probe_mod")
    assert seen == [41] and not hooked()
    assert type(mod.__loader__).__name__ == "SourceFileLoader" and "VALUE" in mod.__loader__.get_source("fusedlm_probe_mod")
    call_after_import("fusedlm_probe_mod", lambda: seen.append("now"))  # already imported: at once
    assert seen == [41, "now"]
    with pytest.warns(RuntimeWarning, match="could not hook into fusedlm_probe_mod"):
        call_after_import("fusedlm_probe_mod", lambda: 1 / 0)
    monkeypatch.delitem(sys.modules, "fusedlm_probe_mod")


@pytest.mark.parametrize("name, norms", [("LlamaForCausalLM", "LlamaRMSNorm: 5 module(s)"),
                                         ("Qwen3ForCausalLM", "Qwen3RMSNorm: 9 module(s)")])
def test_llama_family_report_and_exact_unpatch(name, norms):
    """Attention, every RMSNorm (Qwen3's per-head q/k norms too) and the fused causal-LM loss;
    unpatch gives back the very modules."""
    model = _models()[name]().to(DEVICE)
    before = {n: m for n, m in model.named_modules()}
    report = fusedlm.patch(model)
    text = str(report)
    assert norms in text and "attention:" in text and "loss: fused" in text, text
    kw, _ = _inputs(name)
    assert model(**kw).logits is None
    fusedlm.unpatch(model)
    assert {n: m for n, m in model.named_modules()} == before  # the same objects
    assert model(**kw).logits is not None


def test_an_rms_norm_that_computes_something_else_is_left_alone():
    """Gemma's RMSNorm scales by (1 + weight): swapping it for weight * x / rms(x) would be a
    silent wrong answer, so it stays, named in the report; the patched model still matches."""
    t = transformers
    if not hasattr(t, "GemmaForCausalLM"):
        pytest.skip("this transformers has no Gemma")
    torch.manual_seed(0)
    ref = t.GemmaForCausalLM(t.GemmaConfig(**dict(LLAMA, head_dim=8))).to(DEVICE).eval()
    model = copy.deepcopy(ref)
    report = fusedlm.patch(model)
    assert any(n == "GemmaRMSNorm" for n, _ in report.left_alone), str(report)
    assert not any("GemmaRMSNorm" in p for p in report.patched)
    kw, mask = _inputs("GemmaForCausalLM")
    assert rel_err(model(**kw).logits[mask], ref(**kw).logits[mask]) < 1e-5


@pytest.mark.parametrize("version, ok", [("4.55.4", False), ("4.56.0", True), ("5.17.0", True),
                                         ("5.24.0", True), ("5.30.0.dev0", True), ("6.0.0rc1", False)])
def test_transformers_versions_outside_the_range_are_refused_by_name(version, ok):
    from fusedlm.integrations.hf import check_transformers_version
    if ok:
        check_transformers_version(version)
    else:
        with pytest.raises(RuntimeError, match=rf"transformers >= 4.56 and < 6.0, found {version}"):
            check_transformers_version(version)
    check_transformers_version(transformers.__version__)  # the installed one is in the range


def test_bert_dropout_add_norm_runs_in_the_norms_kernels():
    """Patched, BertSelfOutput and BertOutput run "dense, dropout, add & norm" as the norm's
    fused dropout, with the module's p and a seed from torch's generator; a class whose forward
    computes anything else is left alone (recognized by its code)."""
    from fusedlm.integrations import hf
    torch.manual_seed(0)
    model = _models()["BertForMaskedLM"]().to(DEVICE)
    report = str(fusedlm.patch(model))
    assert "BertSelfOutput: " in report and "BertOutput: " in report
    out = model.bert.encoder.layer[0].attention.output
    h, r = (torch.randn(5, out.dense.in_features, device=DEVICE) for _ in range(2))
    model.train()
    torch.manual_seed(4)
    got = out(h, r)
    torch.manual_seed(4)
    ln = out.LayerNorm
    from fusedlm.ops._tensors import dropout_seed
    seed = dropout_seed(out.dropout.p, None)  # the draw the fused forward makes
    want = fusedlm.layer_norm(out.dense(h), ln.weight, ln.bias, ln.eps, residual=r,
                              dropout_p=out.dropout.p, seed=seed)
    assert out.dropout.p > 0 and torch.equal(got, want)

    class Other(torch.nn.Module):
        def forward(self, hidden_states, input_tensor):
            hidden_states = self.dense(hidden_states)
            hidden_states = self.LayerNorm(hidden_states + input_tensor)  # no dropout
            return hidden_states
    assert hf._is_dropout_add_norm(type(out)) and not hf._is_dropout_add_norm(Other)


def _wide_saved(model, kw, width):
    """Distinct activations `width` wide (the MLPs' intermediate width) that a training forward
    keeps for its backward (the parameters it keeps not counted)."""
    seen = set()
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}

    def pack(t):
        if t.dim() >= 2 and t.shape[-1] == width and t.untyped_storage().data_ptr() not in params:
            seen.add((t.untyped_storage().data_ptr(), t.storage_offset()))
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = model(**kw)
    return len(seen), out


@pytest.mark.parametrize("name,cls,width,kept", [("BertForMaskedLM", "BertLayer", 64, 1),
                                                 ("RobertaForMaskedLM", "RobertaLayer", 64, 1),
                                                 ("DistilBertForMaskedLM", "FFN", 64, 1),
                                                 ("GPT2LMHeadModel", "GPT2MLP", 128, 1),
                                                 ("LlamaForCausalLM", "LlamaMLP", 64, 2),
                                                 ("Qwen2ForCausalLM", "Qwen2MLP", 64, 2),
                                                 ("ModernBertForMaskedLM", "ModernBertMLP", 48, 2)])
def test_mlps_run_as_the_fused_op_keeping_one_activation_tensor(name, cls, width, kept):
    """BERT's feed-forward, GPT-2's MLP, Llama's gated MLP and ModernBERT's GeGLU run as
    fusedlm.ops.mlp: a layer keeps the activation's input for the backward (and the up
    projection, gated) where the original keeps the activation's output (and the product) too,
    with the original's loss (test_patched_model_matches_the_original checks every gradient)."""
    torch.manual_seed(0)
    ref = _models()[name]().to(DEVICE).train()
    model = copy.deepcopy(ref)
    report = fusedlm.patch(model)
    layers = getattr(ref.config, "num_hidden_layers", None) or ref.config.n_layers
    assert f"{cls}: {layers} module(s): the MLP as fusedlm.ops.mlp" in str(report)
    kw, _ = _inputs(name)
    torch.manual_seed(1)
    n_ref, want = _wide_saved(ref, kw, width)
    torch.manual_seed(1)
    n_got, got = _wide_saved(model, kw, width)
    assert n_got == layers * kept and n_ref >= 2 * layers * kept, (n_got, n_ref)
    if name == "GPT2LMHeadModel":  # dropout draws differ between the two: compare without it
        return
    ref.eval(), model.eval()
    assert rel_err(model(**kw).loss, ref(**kw).loss) < 1e-5


def test_mlps_the_op_cannot_run_are_left_as_they_are():
    """An activation fusedlm.ops.mlp does not have (quick GELU), a feed-forward computing
    something else, or mlp=False: the MLP runs its own code."""
    from fusedlm.integrations import hf
    torch.manual_seed(0)
    other = transformers.BertForMaskedLM(transformers.BertConfig(**SMALL, hidden_act="quick_gelu"))
    assert "the MLP" not in str(fusedlm.patch(other))
    assert not any("feed_forward_chunk" in m.__dict__ for m in other.modules())
    plain = _models()["BertForMaskedLM"]()
    report = fusedlm.patch(plain, mlp=False)
    assert ("MLP", "mlp=False") in report.left_alone and "the MLP" not in str(report)

    class Other(torch.nn.Module):
        def feed_forward_chunk(self, attention_output):
            intermediate_output = self.intermediate(attention_output)
            layer_output = self.output(intermediate_output, intermediate_output)  # no residual
            return layer_output
    layer = plain.bert.encoder.layer[0]
    args = ("self", "attention_output")
    assert hf._code_is(type(layer), "feed_forward_chunk", args, hf._FEED_FORWARD_CHUNK)
    assert not hf._code_is(Other, "feed_forward_chunk", args, hf._FEED_FORWARD_CHUNK)


def test_modernbert_mlp_with_dropout_training_runs_its_own_code():
    """ModernBERT's MLP drops out between the product and Wo: training with mlp_dropout > 0, the
    patched module runs transformers' forward (the same dropout draws); in eval, the fused op."""
    torch.manual_seed(0)
    ref = transformers.ModernBertForMaskedLM(transformers.ModernBertConfig(**MODERNBERT, mlp_dropout=0.3))
    model = copy.deepcopy(ref)
    fusedlm.patch(model)
    mlp, own = model.model.layers[0].mlp, ref.model.layers[0].mlp
    h = torch.randn(5, MODERNBERT["hidden_size"])
    for m in (mlp, own):
        m.train()
    torch.manual_seed(3)
    got = mlp(h)
    torch.manual_seed(3)
    assert torch.equal(got, own(h))
    mlp.eval(), own.eval()
    assert rel_err(mlp(h), own(h)) < 1e-5
    assert "forward" in mlp.__dict__
