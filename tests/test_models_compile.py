"""fusedlm's own models under torch.compile(fullgraph=True): a whole training step in one graph
(no host read, shapes fixed by the batch's: `unpad_static`), with the eager step's loss and
gradients."""
import subprocess
import sys

import pytest
import torch

import fusedlm
import fusedlm.models as fm
from fusedlm.ops import pad, unpad, unpad_static
from conftest import DEVICE, rel_err

BERT = dict(vocab_size=99, hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
            intermediate_size=64, max_position_embeddings=64)
GPT = dict(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4)


def _mask(batch=3, seq=13):
    mask = torch.ones(batch, seq, dtype=torch.long)
    mask[1, 9:] = 0   # right padding
    mask[2, :3] = 0   # left padding
    mask[2, 7:] = 0
    return mask.to(DEVICE)


def _step(name, dropout):
    """(model, inputs) for one training step of model family `name`, padded batch; a label on a
    padding position too, which both paths must ignore."""
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    mask = _mask()
    if name == "gpt":
        cfg = fm.GPTConfig(**GPT, resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout)
        model = fm.GPTForCausalLM(cfg)
        ids = torch.randint(0, 97, mask.shape, generator=g).to(DEVICE)
        return model.to(DEVICE).train(), dict(input_ids=ids, attention_mask=mask, labels=ids.clone())
    cfg_cls = fm.RobertaConfig if name == "roberta" else fm.BertConfig
    extra = dict(pad_token_id=1) if name == "roberta" else {}
    cfg = cfg_cls(**BERT, hidden_dropout_prob=dropout, attention_probs_dropout_prob=dropout,
                  num_labels=3, **extra)
    ids = torch.randint(2, 99, mask.shape, generator=g).to(DEVICE)
    labels = torch.full(mask.shape, -100, device=DEVICE)
    labels[:, 4] = 7
    labels[1, 11] = 5  # on padding: ignored
    kw = dict(input_ids=ids, attention_mask=mask, labels=labels)
    if name == "bert":
        model = fm.BertForPreTraining(cfg)
        kw["next_sentence_label"] = torch.tensor([0, 1, 1], device=DEVICE)
    elif name == "roberta":
        model = fm.RobertaForMaskedLM(cfg)
        kw["input_ids"] = ids.masked_fill(mask == 0, 1)
    else:
        model = fm.BertForSequenceClassification(cfg)
        kw["labels"] = torch.tensor([0, 2, 1], device=DEVICE)
    return model.to(DEVICE).train(), kw


FAMILIES = ["bert", "roberta", "classify", "gpt"]


@pytest.mark.parametrize("name", FAMILIES)
def test_training_step_compiles_whole_and_matches_eager(name):
    model, kw = _step(name, dropout=0.0)
    params = [p for p in model.parameters() if p.requires_grad]
    torch._dynamo.reset()
    compiled = torch.compile(lambda **k: model(**k).loss, fullgraph=True, backend="aot_eager")
    loss = compiled(**kw)
    grads = torch.autograd.grad(loss, params, allow_unused=True)
    eager = model(**kw).loss
    eager_grads = torch.autograd.grad(eager, params, allow_unused=True)
    assert torch.isfinite(loss) and rel_err(loss, eager) < 1e-5
    scale = max(e.norm() for e in eager_grads if e is not None)
    for (n, _), got, want in zip(model.named_parameters(), grads, eager_grads):
        if want is None:
            assert got is None or got.abs().max() == 0, n
        elif want.norm() > 1e-6 * scale:  # not the key bias: the softmax ignores it
            assert rel_err(got, want) < 1e-4, n


@pytest.mark.parametrize("name", ["bert", "gpt"])
def test_training_step_with_dropout_compiles_whole(name):
    model, kw = _step(name, dropout=0.1)
    torch._dynamo.reset()
    compiled = torch.compile(lambda **k: model(**k).loss, fullgraph=True, backend="aot_eager")
    loss = compiled(**kw)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("compiled", [False, True])
def test_mlm_capacity_gives_the_same_step_with_the_labelled_rows_alone(compiled):
    """config.mlm_capacity: the head computes a fixed number of rows (the labelled ones first),
    not every token, under torch.compile too; same loss and gradients as the exact eager step."""
    import dataclasses
    model, kw = _step("bert", dropout=0.0)
    capped = fm.BertForPreTraining(dataclasses.replace(model.config, mlm_capacity=0.25)).to(DEVICE)
    capped.load_state_dict(model.state_dict())
    rows = fusedlm.nn.lm_head.capacity_rows(0.25, kw["labels"].numel())
    assert (kw["labels"] != -100).sum() <= rows < kw["labels"].numel()
    seen = []
    capped.cls.predictions.transform.register_forward_hook(lambda m, i, o: seen.append(i[0].shape[0]))
    torch._dynamo.reset()
    fn = (torch.compile(lambda **k: capped(**k).loss, fullgraph=True, backend="aot_eager")
          if compiled else (lambda **k: capped(**k).loss))
    loss = fn(**kw)
    grads = torch.autograd.grad(loss, list(capped.parameters()))
    eager = model(**kw).loss
    eager_grads = torch.autograd.grad(eager, list(model.parameters()))
    assert rel_err(loss, eager) < 1e-5
    for (n, _), got, want in zip(model.named_parameters(), grads, eager_grads):
        assert rel_err(got, want) < 1e-4 or want.abs().max() < 1e-9, n
    if not compiled:  # eager: a quarter of the real tokens (the head is given those alone)
        real = int(kw["attention_mask"].sum())
        assert seen == [fusedlm.nn.lm_head.capacity_rows(0.25, real)] and seen[0] < real


def test_compiled_outputs_without_labels_match_eager():
    """Logits at padding are zero in both paths (the compiled one computes padding rows and
    masks them)."""
    model, kw = _step("gpt", dropout=0.0)
    model.eval()
    del kw["labels"]
    torch._dynamo.reset()
    compiled = torch.compile(lambda **k: model(**k).logits, fullgraph=True, backend="aot_eager")
    got, want = compiled(**kw), model(**kw).logits
    assert torch.equal(got == 0, want == 0) and rel_err(got, want) < 1e-5


def test_unpad_static_keeps_every_token_and_separates_real_from_padding():
    mask = _mask()
    x = torch.randn(*mask.shape, 5, device=DEVICE)
    rows, idx, cu, cu_k, max_len, real = unpad_static(x, mask)
    assert rows.shape == (mask.numel(), 5) and max_len == mask.shape[1]
    assert sorted(idx.tolist()) == list(range(mask.numel()))     # a permutation
    assert torch.equal(pad(rows, idx, *mask.shape), x)          # every token back in place
    packed, _, cu_eager, _ = unpad(x, mask)
    batch, real_rows = mask.shape[0], packed.shape[0]
    assert torch.equal(rows[real], packed) and real[:real_rows].all() and not real[real_rows:].any()
    # The real tokens are sequences 0..batch-1, as unpad's; each row's padding follows as a
    # sequence of queries with no keys.
    assert torch.equal(cu[:batch + 1], cu_eager) and torch.equal(cu_k[:batch + 1], cu_eager)
    assert (cu[batch + 1:].diff(prepend=cu[batch:batch + 1]) == (mask == 0).sum(1)).all()
    assert cu[-1] == mask.numel() and (cu_k[batch:] == real_rows).all()


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_unpad_static_spends_no_attention_on_padding(backend):
    """Packed by unpad_static, a padded batch's real rows attend as unpad's do, each padding
    row sees no key (output 0) and the padding's keys get gradient 0; the key rows past the
    last key sequence are read by no kernel (their values do not matter)."""
    mask = _mask()
    q, k, v = (torch.randn(*mask.shape, 2, 16, device=DEVICE, dtype=torch.float16,
                           requires_grad=True) for _ in range(3))
    rows_q, idx, cu, cu_k, max_len, real = unpad_static(q, mask)
    rows_k, rows_v = (unpad_static(t, mask)[0] for t in (k, v))
    out = fusedlm.attention_varlen(rows_q, rows_k, rows_v, cu, cu_k, max_len, max_len, causal=True,
                                   backend=backend)
    packed_q, _, cu_eager, max_eager = unpad(q, mask)
    ref = fusedlm.attention_varlen(packed_q, unpad(k, mask)[0], unpad(v, mask)[0], cu_eager,
                                   cu_eager, max_eager, max_eager, causal=True, backend=backend)
    assert torch.equal(out[real], ref) and not out[~real].any()
    g = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), g.masked_fill(~real[:, None, None], 0))
    ref_grads = torch.autograd.grad(ref, (q, k, v), g[real])
    for got, want in zip(grads, ref_grads):
        assert torch.allclose(got, want, atol=1e-3), (got - want).abs().max()
    # Garbage in the key rows past cu_k[-1] changes nothing.
    poisoned_k = rows_k.detach().clone()
    poisoned_k[~real] = float("nan")
    again = fusedlm.attention_varlen(rows_q, poisoned_k, rows_v, cu, cu_k, max_len, max_len,
                                     causal=True, backend=backend)
    assert torch.equal(again, out)


def test_unpad_static_refuses_what_unpad_refuses():
    x = torch.randn(2, 4, 3)
    with pytest.raises(TypeError, match="attention_mask must be bool or integer"):
        unpad_static(x, torch.ones(2, 4))
    with pytest.raises(ValueError, match=r"attention_mask must have shape \(2, 4\)"):
        unpad_static(x, torch.ones(2, 5, dtype=torch.long))


_FRESH = """
import os, sys
os.environ.setdefault("TRITON_INTERPRET", "1")
import torch
import fusedlm.models as fm
name = sys.argv[1]
mask = torch.ones(2, 12, dtype=torch.long); mask[1, 7:] = 0
ids = torch.randint(2, 90, (2, 12))
if name == "gpt":
    model = fm.GPTForCausalLM(fm.GPTConfig(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4))
    kw = dict(labels=ids)
else:
    model = fm.BertForPreTraining(fm.BertConfig(vocab_size=99, hidden_size=32, num_hidden_layers=2,
                                                num_attention_heads=2, intermediate_size=64))
    labels = torch.full((2, 12), -100); labels[:, 3] = 5
    kw = dict(labels=labels, next_sentence_label=torch.tensor([0, 1]))
step = torch.compile(lambda: model(ids, attention_mask=mask, **kw).loss, fullgraph=True,
                     backend="aot_eager")
loss = step()
loss.backward()
assert torch.isfinite(loss)
print("first step compiled whole: ok")
"""


@pytest.mark.parametrize("name", ["bert", "gpt"])
def test_first_step_of_a_fresh_process_compiles_whole(name, tmp_path):
    """The first call in a process is a compiled training step: deciding backends, importing
    kernels and drawing seeds must all happen outside the trace or be traceable."""
    script = tmp_path / "fresh.py"
    script.write_text(_FRESH)
    run = subprocess.run([sys.executable, str(script), name], capture_output=True, text=True,
                         timeout=600)
    assert run.returncode == 0 and "compiled whole: ok" in run.stdout, run.stderr[-3000:]
