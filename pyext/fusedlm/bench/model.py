"""Model benchmark: one training step (forward + backward) of BERT masked-LM + NSP pretraining
and GPT-2 causal-LM training, Hugging Face eager (sdpa attention) against Hugging Face under
torch.compile, the same model patched by fusedlm, and fusedlm's own model with the same
weights. Padded batches (a `padding` fraction of each batch is padding) show what skipping
padding is worth. Reported: ms per step, real tokens per second, peak memory, speed-up over
Hugging Face eager. bf16 autocast on a GPU, fp32 on a CPU.
"""
import contextlib
import copy

import torch

from .harness import time_ms

CASES = {
    # name: (family, batch, seq, model config overrides)
    "bert-base": ("bert", 32, 512, dict()),
    "gpt2-small": ("gpt2", 8, 1024, dict()),
    "bert-tiny": ("bert", 4, 64, dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=128)),
    "gpt2-tiny": ("gpt2", 4, 64, dict(n_embd=64, n_layer=2, n_head=2)),
}


def _hf_models(family, overrides):
    try:
        import transformers as t
    except ImportError as e:
        raise SystemExit(f"fusedlm bench model compares with Hugging Face models: "
                         f"pip install transformers ({e})")
    import fusedlm.models as fm
    if family == "bert":
        config = t.BertConfig(**overrides, attn_implementation="sdpa")
        hf = t.BertForPreTraining(config)
        ours = fm.BertForPreTraining(fm.BertConfig.from_hf(config))
    else:
        config = t.GPT2Config(**overrides, attn_implementation="sdpa")
        hf = t.GPT2LMHeadModel(config)
        ours = fm.GPTForCausalLM(fm.GPTConfig.from_hf(config))
    ours.load_state_dict(hf.state_dict())
    return hf, ours, config


def _batch(family, batch, seq, vocab, padding, device):
    g = torch.Generator().manual_seed(0)
    lo = max(int(seq * (1 - 2 * padding)), 1)
    lens = torch.randint(lo, seq + 1, (batch,), generator=g) if padding else torch.full((batch,), seq)
    mask = (torch.arange(seq)[None, :] < lens[:, None]).long()
    ids = torch.randint(5, vocab, (batch, seq), generator=g) * mask
    if family == "bert":
        labels = torch.full_like(ids, -100)
        pick = (torch.rand(batch, seq, generator=g) < 0.15) & (mask == 1)
        labels[pick] = ids[pick]
        kw = dict(input_ids=ids, attention_mask=mask, labels=labels,
                  next_sentence_label=torch.randint(0, 2, (batch,), generator=g))
    else:
        kw = dict(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100))
    return {k: v.to(device) for k, v in kw.items()}, int(mask.sum())


def _impls(family, overrides, device, compile_hf):
    import fusedlm
    hf, ours, config = _hf_models(family, overrides)
    impls = {"hf eager (sdpa)": hf.to(device)}
    if compile_hf:
        impls["hf torch.compile"] = torch.compile(copy.deepcopy(hf))
    patched = copy.deepcopy(hf)
    fusedlm.patch(patched)
    impls["hf patched by fusedlm"] = patched
    impls["fusedlm model"] = ours.to(device)
    return impls, config.vocab_size


def _step(model, kw, device):
    autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda"
                else contextlib.nullcontext())

    def run():
        model.zero_grad(set_to_none=True)
        with autocast:
            loss = model(**kw).loss
        loss.backward()
    return run


def run(cases=("bert-base", "gpt2-small"), paddings=(0.0, 0.5), device=None, log=print):
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for case in cases:
        family, batch, seq, overrides = CASES[case]
        impls, vocab = _impls(family, overrides, device, compile_hf=device == "cuda")
        for padding in paddings:
            kw, tokens = _batch(family, batch, seq, vocab, padding, device)
            log(f"  {case}: batch {batch} x seq {seq}, {1 - tokens / (batch * seq):.0%} padding")
            base = None
            for name, model in impls.items():
                model.train()
                step = _step(model, kw, device)
                try:
                    ms = time_ms(step, device, warmup=3, rep=30)
                    peak = None
                    if device == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        step()
                        peak = torch.cuda.max_memory_allocated() / 2 ** 20
                except Exception as e:  # report a peer that fails (e.g. out of memory) and go on
                    log(f"    {name:<24} failed ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
                    continue
                base = base or (ms if name.startswith("hf eager") else None)
                rec = dict(op="model", case=case, padding=padding, batch=batch, seq=seq,
                           real_tokens=tokens, impl=name, ms=round(ms, 3),
                           tokens_per_s=round(tokens / ms * 1e3),
                           peak_mib=None if peak is None else round(peak, 1),
                           speedup_vs_hf_eager=round(base / ms, 3) if base else None)
                results.append(rec)
                mem = "" if peak is None else f" {peak:9.1f} MiB"
                log(f"    {name:<24} {ms:9.2f} ms {rec['tokens_per_s']:>10} tok/s{mem}  "
                    f"x{rec['speedup_vs_hf_eager']}")
    return results
