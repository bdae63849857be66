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
    }


def _inputs(name):
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, 101, (3, 15), generator=g)
    mask = torch.ones(3, 15, dtype=torch.long)
    mask[1, 10:] = 0
    mask[2, 4:] = 0
    kw = dict(input_ids=ids, attention_mask=mask)
    if name == "GPT2LMHeadModel":
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
    assert "forward" not in model.__dict__
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
