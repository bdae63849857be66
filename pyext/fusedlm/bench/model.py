"""Model benchmark: one training step (forward + backward) of BERT masked-LM + NSP pretraining
and GPT-2 causal-LM training, Hugging Face eager (sdpa attention) against Hugging Face under
torch.compile, the same model patched by fusedlm, and fusedlm's own model with the same
weights: eager on the padded batch, compiled on it, and on the same samples packed
(fusedlm.packing: no padding, static shapes), eager and compiled (on a GPU with CUDA graphs,
mode="reduce-overhead"). Padded batches (a `padding` fraction of each batch is padding) show
what skipping padding is worth. Reported: ms per step (GPU time on a GPU), host ms per step
(what Python takes to issue it, no synchronization: a step whose host time reaches its GPU
time is host-bound), real tokens per second, peak memory (on a GPU), `saved_mib` (the
activation memory one eager step's forward keeps for its backward, counted on any machine; off a
GPU it is what that machine's backends keep: fp32 attention there runs fusedlm's reference,
which keeps the probabilities), speed-up over Hugging Face eager.
bf16 autocast on a GPU, fp32 on a CPU. The compiled variants run on a GPU, or when asked
(`compiled=True`); fusedlm's compiled BERT sets `mlm_capacity` (MLM_CAPACITY), so its head
computes a fifth of the tokens, not all of them, with no host sync.
"""
import contextlib
import copy
import statistics
import time

import torch

from .harness import SavedBytes, collect, time_ms

CASES = {
    # name: (family, batch, seq, model config overrides)
    "bert-base": ("bert", 32, 512, dict()),
    "gpt2-small": ("gpt2", 8, 1024, dict()),
    "bert-base-demo": ("bert", 16, 512, dict()),  # fusedlm demo's GPU-size step: a shorter batch
    "bert-tiny": ("bert", 4, 64, dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                      intermediate_size=128)),
    "gpt2-tiny": ("gpt2", 4, 64, dict(n_embd=64, n_layer=2, n_head=2)),
    # A Llama-style decoder (fusedlm has no Llama model of its own: Hugging Face's, patched):
    # a few layers at hidden 2048, grouped-query heads (32 query, 8 key/value), V 128256.
    "llama-style": ("llama", 4, 2048, dict(hidden_size=2048, intermediate_size=5632,
                                           num_hidden_layers=4, num_attention_heads=32,
                                           num_key_value_heads=8, vocab_size=128256,
                                           max_position_embeddings=2048)),
    "llama-tiny": ("llama", 4, 64, dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                        num_attention_heads=4, num_key_value_heads=2,
                                        vocab_size=1000, max_position_embeddings=64)),
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
    elif family == "gpt2":
        config = t.GPT2Config(**overrides, attn_implementation="sdpa")
        hf = t.GPT2LMHeadModel(config)
        ours = fm.GPTForCausalLM(fm.GPTConfig.from_hf(config))
    else:
        config = t.LlamaConfig(**overrides, attn_implementation="sdpa")
        return t.LlamaForCausalLM(config), None, config
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


def _packed(kw, max_seqlen):
    """The padded batch's samples as one packed batch (fusedlm.packing), its token budget the
    real tokens rounded up to a multiple of 64."""
    from ..packing import PackingCollator
    mask = kw["attention_mask"].cpu().bool()
    samples = []
    for i in range(mask.shape[0]):
        s = {k: kw[k][i].cpu()[mask[i]] for k in ("input_ids", "labels")}
        if "next_sentence_label" in kw:
            s["next_sentence_label"] = kw["next_sentence_label"][i].cpu()
        samples.append(s)
    real = int(mask.sum())
    tokens = -(-real // 64) * 64
    slots = len(samples) + -(-tokens // max_seqlen) + 1
    out = PackingCollator(tokens, slots, max_seqlen)(samples)
    return {k: v.to(kw["input_ids"].device) if isinstance(v, torch.Tensor) else v
            for k, v in out.items()}


def _flattened(kw):
    """The padded batch's sequences as one padding-free row, as Hugging Face's
    DataCollatorWithFlattening makes it: position_ids restarting at each sequence, each
    sequence's first label -100."""
    mask = kw["attention_mask"].bool()
    ids = kw["input_ids"][mask][None]
    positions = (mask.long().cumsum(1) - 1)[mask][None]
    labels = kw["input_ids"][mask].clone()
    labels[positions[0] == 0] = -100
    return dict(input_ids=ids, position_ids=positions, labels=labels[None])


def _impls(family, overrides, device, compiled):
    """name -> (model, which batch: "padded", "packed" (fusedlm.packing) or "flattened")."""
    import fusedlm
    hf, ours, config = _hf_models(family, overrides)
    impls = {"hf eager (sdpa)": (hf.to(device), "padded")}
    if compiled:
        impls["hf torch.compile"] = (torch.compile(copy.deepcopy(hf)), "padded")
    patched = copy.deepcopy(hf)
    fusedlm.patch(patched)
    impls["hf patched by fusedlm"] = (patched, "padded")
    if ours is None:  # no model of fusedlm's own: Hugging Face's patched, padding-free too
        impls["hf patched, padding-free (flattened)"] = (patched, "flattened")
        return impls, config.vocab_size
    ours = ours.to(device)
    impls["fusedlm model"] = (ours, "padded")
    impls["fusedlm model, packed"] = (ours, "packed")
    if compiled:
        ours = _with_mlm_capacity(ours, family)
        impls["fusedlm model, compiled"] = (torch.compile(ours), "padded")
        mode = "reduce-overhead" if device == "cuda" else None  # CUDA graphs on a GPU
        name = "fusedlm model, packed, compiled" + (" + CUDA graphs" if mode else "")
        impls[name] = (torch.compile(ours, mode=mode), "packed")
    return impls, config.vocab_size


# The compiled BERT variants' masked-LM capacity (config.mlm_capacity): the batches label 15% of
# the real tokens, and a fifth of every token is far above that count (about 7 standard
# deviations at BERT-base's 16k tokens). Without it a compiled head computes every token.
MLM_CAPACITY = 0.2


def _with_mlm_capacity(model, family):
    if family != "bert":
        return model
    import dataclasses
    capped = type(model)(dataclasses.replace(model.config, mlm_capacity=MLM_CAPACITY))
    capped.load_state_dict(model.state_dict())
    return capped.to(next(model.parameters()).device)


def host_ms(step, rep=20):
    """Median wall milliseconds for Python to issue one step (no synchronization): on a GPU
    the time the host needs, whatever the GPU does meanwhile."""
    samples = []
    for _ in range(rep):
        t0 = time.perf_counter()
        step()
        samples.append((time.perf_counter() - t0) * 1e3)
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return statistics.median(samples)


def _autocast(device):
    return (torch.autocast("cuda", dtype=torch.bfloat16) if device == "cuda"
            else contextlib.nullcontext())


def _step(model, kw, device):
    def run():
        torch.compiler.cudagraph_mark_step_begin()  # a new step for CUDA graphs (else a no-op)
        model.zero_grad(set_to_none=True)
        with _autocast(device):
            loss = model(**kw).loss
        loss.backward()
    return run


def saved_mib(model, kw, device):
    """MiB one training step's forward keeps for its backward, the parameters not counted
    (harness.SavedBytes): the activation memory, the same count on a CPU as on a GPU."""
    model.zero_grad(set_to_none=True)
    with _autocast(device), SavedBytes(model.parameters()) as saved:
        loss = model(**kw).loss
    loss.backward()
    return saved.bytes / 2 ** 20


def run(cases=("bert-base", "gpt2-small"), paddings=(0.0, 0.5), device=None, compiled=None,
        impls=None, log=print, on_result=None):
    """impls: time only these implementations (names as in the table; default: all).

    Every case's eager implementations run first, the compiled ones after: on a fresh machine
    the compiles take most of the time, and a run cut short by a time limit then still has
    every eager row and the Hugging Face baseline each speed-up is measured against. Of the
    compiled ones, every case's Hugging Face compiled and fusedlm packed compiled rows (what
    the targets compare) come before fusedlm's compiled padded rows (see `_phase`)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    compiled = device == "cuda" if compiled is None else compiled
    setups = []
    for case in cases:
        family, batch, seq, overrides = CASES[case]
        available, vocab = _impls(family, overrides, device, compiled)
        chosen = {k: v for k, v in available.items() if impls is None or k in impls}
        for padding in paddings:
            kw, tokens = _batch(family, batch, seq, vocab, padding, device)
            # Only the layouts this family's implementations take (fusedlm has no Llama model).
            batches = ({"padded": kw, "flattened": _flattened(kw)} if family == "llama"
                       else {"padded": kw, "packed": _packed(kw, seq)})
            setups.append((case, batch, seq, padding, tokens, chosen, batches))
    results, base = [], {}
    for phase in _PHASES:
        for case, batch, seq, padding, tokens, chosen, batches in setups:
            todo = {k: v for k, v in chosen.items() if _phase(k, v) == phase}
            if not todo:
                continue
            log(f"  {case}: batch {batch} x seq {seq}, {1 - tokens / (batch * seq):.0%} padding"
                f" ({phase})")
            for name, (model, layout) in todo.items():
                model.train()
                step = _step(model, batches[layout], device)
                try:
                    ms = time_ms(step, device, warmup=3, rep=30)
                    host = host_ms(step)
                    # Eager rows only: a compiled step (CUDA graphs on a GPU) is not traced again.
                    saved = None if _compiled(model) else saved_mib(model, batches[layout], device)
                    peak = None
                    if device == "cuda":
                        torch.cuda.synchronize()
                        torch.cuda.reset_peak_memory_stats()
                        step()
                        peak = torch.cuda.max_memory_allocated() / 2 ** 20
                except Exception as e:  # report a peer that fails (e.g. out of memory) and go on
                    log(f"    {name:<44} failed ({type(e).__name__}: {str(e).splitlines()[0][:100]})")
                    continue
                if name.startswith("hf eager"):
                    base[(case, padding)] = ms
                hf = base.get((case, padding))
                rec = dict(op="model", case=case, padding=padding, batch=batch, seq=seq,
                           real_tokens=tokens, impl=name, ms=round(ms, 3), host_ms=round(host, 3),
                           tokens_per_s=round(tokens / ms * 1e3),
                           peak_mib=None if peak is None else round(peak, 1),
                           saved_mib=None if saved is None else round(saved, 1),
                           speedup_vs_hf_eager=round(hf / ms, 3) if hf else None)
                collect(results, [rec], on_result)
                mem = ("" if peak is None else f" {peak:9.1f} MiB") + (
                    "" if saved is None else f" (saved {saved:.1f} MiB)")
                log(f"    {name:<44} {ms:9.2f} ms (host {host:8.2f}) {rec['tokens_per_s']:>10} "
                    f"tok/s{mem}  x{rec['speedup_vs_hf_eager']}")
    return results


def _compiled(model):
    return hasattr(model, "_orig_mod")  # what torch.compile(module) returns


# The order implementations are timed in, across every case: each compile costs about a minute
# on a fresh machine, and a run cut short by a time limit keeps what came first.
_PHASES = ("eager", "compiled", "compiled, padded")


def _phase(name, impl):
    model, layout = impl
    if not _compiled(model):
        return "eager"
    # fusedlm's model compiled on the padded batch comes last: the targets compare Hugging
    # Face compiled with fusedlm's packed, compiled step.
    return "compiled, padded" if layout == "padded" and not name.startswith("hf") else "compiled"
