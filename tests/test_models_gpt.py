"""fusedlm's GPT against Hugging Face's GPT-2, built from the same tiny config and weights."""
import pytest
import torch

import fusedlm.models as fm
from conftest import DEVICE, rel_err

transformers = pytest.importorskip("transformers")

CONFIG = dict(vocab_size=97, n_positions=32, n_embd=32, n_layer=2, n_head=4, bos_token_id=0,
              eos_token_id=0)


def _pair():
    torch.manual_seed(0)
    hf_config = transformers.GPT2Config(**CONFIG, attn_implementation="eager")
    hf = transformers.GPT2LMHeadModel(hf_config).to(DEVICE).eval()
    ours = fm.GPTForCausalLM(fm.GPTConfig.from_hf(hf_config)).to(DEVICE).eval()
    ours.load_state_dict(hf.state_dict(), strict=True)
    return hf, ours


def _batch():
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 97, (3, 13), generator=g)
    mask = torch.ones(3, 13, dtype=torch.long)
    mask[1, 9:] = 0   # right padding
    mask[2, 4:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    return ids.to(DEVICE), mask.to(DEVICE), labels.to(DEVICE)


def test_state_dict_is_gpt2s_including_conv1d_layout():
    hf, ours = _pair()
    sd = ours.state_dict()
    assert set(sd) == set(hf.state_dict())
    for k, v in hf.state_dict().items():
        assert sd[k].shape == v.shape, k   # Conv1D weights stay (in, out)
    assert ours.lm_head.weight is ours.transformer.wte.weight


def test_causal_lm_loss_and_grads_match_gpt2_with_padding():
    hf, ours = _pair()
    ids, mask, labels = _batch()
    theirs = hf(input_ids=ids, attention_mask=mask, labels=labels)
    mine = ours(ids, mask, labels=labels)
    assert rel_err(mine.loss, theirs.loss) < 1e-5
    theirs.loss.backward()
    mine.loss.backward()
    g_hf = {n: p.grad for n, p in hf.named_parameters() if p.grad is not None}
    g_ours = {n: p.grad for n, p in ours.named_parameters() if p.grad is not None}
    assert set(g_ours) == set(g_hf)
    for n in g_hf:
        assert rel_err(g_ours[n], g_hf[n]) < 1e-4, n


def test_causal_lm_under_autocast_matches_gpt2():
    """bf16 autocast: the pre-LN blocks' bf16 sublayer outputs join the fp32 residual stream."""
    hf, ours = _pair()
    ids, mask, labels = _batch()
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        theirs = hf(input_ids=ids, attention_mask=mask, labels=labels)
        mine = ours(ids, mask, labels=labels)
    assert rel_err(mine.loss, theirs.loss) < 2e-2
    mine.loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in ours.parameters() if p.grad is not None)


def test_logits_without_labels_match_on_real_tokens():
    hf, ours = _pair()
    ids, mask, _ = _batch()
    with torch.no_grad():
        theirs = hf(input_ids=ids, attention_mask=mask).logits
        mine = ours(ids, mask).logits
    real = mask.bool()
    assert rel_err(mine[real], theirs[real]) < 1e-5
    assert torch.count_nonzero(mine[~real]) == 0


def test_training_steps_lower_the_loss():
    torch.manual_seed(0)
    model = fm.GPTForCausalLM(fm.GPTConfig(vocab_size=97, n_positions=32, n_embd=32, n_layer=2,
                                           n_head=4)).to(DEVICE)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids, mask, labels = _batch()
    losses = []
    for _ in range(8):
        loss = model(ids, mask, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    assert losses[-1] < 0.8 * losses[0], losses


@pytest.mark.parametrize("option, value", [("scale_attn_by_inverse_layer_idx", True),
                                           ("scale_attn_weights", False),
                                           ("add_cross_attention", True)])
def test_from_hf_refuses_an_option_it_does_not_implement(option, value):
    config = transformers.GPT2Config(**CONFIG, **{option: value})
    with pytest.raises(ValueError, match=f"config.{option}={value!r} is not supported by GPTConfig"):
        fm.GPTConfig.from_hf(config)


def test_from_hf_refuses_another_model_type():
    with pytest.raises(ValueError, match="'bert' config; GPTConfig.from_hf takes model_type 'gpt2'"):
        fm.GPTConfig.from_hf(transformers.BertConfig())
