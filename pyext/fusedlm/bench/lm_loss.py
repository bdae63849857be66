"""LM-loss benchmark: fusedlm's backends against their peers in the same process.

Each case is one loss step, forward + backward (d_hidden, d_weight, and d_bias where the model's
decoder has a bias: BERT's MLM head does, GPT-2's and Llama's lm_head do not), on `tokens` rows
of which a fraction carries a label (MLM: 15%; causal LM: all). Reported per implementation:
median time, TFLOP/s of the projection (6 * labelled * H * V flops: the forward matmul and the
two backward ones, on the labelled rows: the work a masked-LM head must do), peak memory
beyond the inputs, and the speed-up over Hugging Face's full-logits path.

Peers: "hf full logits" (what BertForMaskedLM / GPT2LMHeadModel do: project every token, fp32
logits, F.cross_entropy with ignore_index), "torch.compile(ref)" (the same, compiled, on the
labelled rows only), torch's own fused `F.linear_cross_entropy` where the installed torch has
it, Liger-Kernel's fused linear cross-entropy and Cut Cross-Entropy on the labelled rows when
importable. fusedlm is given every token and compacts them itself, so its
time includes finding the labelled rows: exactly (one host sync), and, as
"fusedlm[...], capacity", up to a fixed capacity with no host sync (a compiled step's path).
"fusedlm[...], fp32 accum" sums the weight's gradient over the chunks in fp32
(`accum_dtype=torch.float32`, what an fp32 master weight under autocast gets).
"fusedlm[...], chunk N" (`chunk_rows`) projects N labelled rows at a time instead of the default
(a logits buffer of about 256 MiB): chunks whose logits fit the GPU's L2 cache keep the row
kernel's passes and the backward GEMMs' reads of them out of DRAM, at the cost of smaller GEMMs
and more launches; the sweep measures which wins.
"""
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ..nn.lm_head import capacity_rows
from ..ops import dispatch, lm_loss
from . import tune
from .harness import chosen, collect, time_ms
from .tune import fusedlm_backend

class Case(NamedTuple):
    tokens: int
    hidden: int
    vocab: int
    labelled: float  # the fraction of tokens with a label
    bias: bool       # whether the decoder has a bias (and so a d_bias to compute)


CASES = {
    "bert-mlm": Case(32 * 512, 768, 30522, 0.15, True),
    "gpt2": Case(16384, 768, 50257, 1.0, False),
    "bert-large-mlm": Case(32 * 512, 1024, 30522, 0.15, True),
    "large-vocab": Case(16384, 4096, 128256, 1.0, False),
    "llama-8k": Case(8192, 4096, 128256, 1.0, False),  # a Llama-3-style step: H 4096, V 128256

    "tiny": Case(512, 64, 1000, 0.15, True),  # for CPUs and tests
}


# fusedlm's static selection's capacity for a masked LM, as a fraction of the tokens: about 7
# standard deviations above 15% at 16k tokens.
CAPACITY = 0.2


def _capacity(tokens, labelled):
    """A causal LM labels every token: its capacity is the token count (known from shapes)."""
    return tokens if labelled == tokens else capacity_rows(CAPACITY, tokens)


def _hf_full_logits(h, w, b, y, idx):
    logits = h @ w.t()
    if b is not None:
        logits = logits + b
    return F.cross_entropy(logits.float(), y)


def _labelled_ref(h, w, b, y):
    logits = (h @ w.t() + b) if b is not None else h @ w.t()
    return F.cross_entropy(logits.float(), y)


def _peers(device_type, vocab, dtype):
    """name -> fn(h, w, b, labels, idx) returning the mean loss over labelled rows (fusedlm's
    backends: those dispatch allows for this case). In the order they are timed: the base, then
    what the targets compare (fusedlm's kernels, the peers), then fusedlm's variants and its
    reference backend, so that a run cut short by a time limit keeps what matters most."""
    peers = {"hf full logits": _hf_full_logits}
    kernels = ("triton", "cuda") if device_type == "cuda" else ()  # interpreted Triton has no speed to show
    for be in kernels:
        if dispatch.why_not("lm_loss", be, (device_type, dtype, vocab)) is None:
            peers[f"fusedlm[{be}]"] = lambda h, w, b, y, idx, be=be: lm_loss(h, w, y, b, backend=be)
    compiled = torch.compile(_labelled_ref, dynamic=False)
    peers["torch.compile(ref)"] = lambda h, w, b, y, idx: compiled(h[idx], w, b, y[idx])
    if hasattr(F, "linear_cross_entropy"):  # torch's own fused linear cross-entropy
        peers["torch linear_cross_entropy"] = lambda h, w, b, y, idx: F.linear_cross_entropy(
            h[idx], w, y[idx], linear_bias=b)
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss
        liger = LigerFusedLinearCrossEntropyLoss()
        peers["liger"] = lambda h, w, b, y, idx: liger(w, h[idx], y[idx], b)
    except ImportError:
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy

        def cce(h, w, b, y, idx):
            h = h[idx]
            if b is not None:  # CCE takes no bias: a column of ones in h meets b in w (+ zeros to
                # keep the width a multiple of 16); the copies are timed with it
                pad = 16 - h.shape[1] % 16
                h = torch.cat([h, h.new_ones(h.shape[0], 1), h.new_zeros(h.shape[0], pad - 1)], 1)
                w = torch.cat([w, b[:, None], w.new_zeros(w.shape[0], pad - 1)], 1)
            return linear_cross_entropy(h, w, y[idx])
        peers["cut-cross-entropy"] = cce
    except ImportError:
        pass
    # The selection with no host sync (what a compiled step or a CUDA graph runs), on the
    # backend dispatch picks.
    be = dispatch.select("lm_loss", (device_type, dtype, vocab))
    peers[f"fusedlm[{be}], capacity"] = lambda h, w, b, y, idx, be=be: lm_loss(
        h, w, y, b, backend=be, capacity=_capacity(y.numel(), idx.numel()))
    # The weight's gradient summed over the chunks in fp32 (what an fp32 master weight under
    # autocast gets): its cost beside the default's.
    peers[f"fusedlm[{be}], fp32 accum"] = lambda h, w, b, y, idx, be=be: lm_loss(
        h, w, y, b, backend=be, accum_dtype=torch.float32)
    if dispatch.why_not("lm_loss", "torch", (device_type, dtype, vocab)) is None:
        peers["fusedlm[torch]"] = lambda h, w, b, y, idx: lm_loss(h, w, y, b, backend="torch")
    return peers


def _inputs(tokens, hidden, vocab, labelled, dtype, device, bias=True):
    g = torch.Generator(device=device).manual_seed(0)
    h = torch.randn(tokens, hidden, device=device, generator=g).to(dtype)
    w = (torch.randn(vocab, hidden, device=device, generator=g) / hidden ** 0.5).to(dtype)
    b = torch.zeros(vocab, device=device, dtype=dtype) if bias else None
    y = torch.randint(0, vocab, (tokens,), device=device, generator=g)
    y[torch.rand(tokens, device=device, generator=g) >= labelled] = -100
    return h, w, b, y


def _step(fn, h, w, b, y, idx):
    leaves = [None if t is None else t.detach().requires_grad_() for t in (h, w, b)]

    def run():
        loss = fn(*leaves, y, idx)
        return torch.autograd.grad(loss, [t for t in leaves if t is not None])
    return run


def _peak_extra_bytes(run, device):
    if device != "cuda":
        return None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    run()
    torch.cuda.synchronize()
    return torch.cuda.max_memory_allocated() - base


def run(cases=("bert-mlm", "gpt2", "large-vocab"), dtype=torch.bfloat16, device=None,
        peers=None, extra=None, chunk_rows=(), log=print, on_result=None):
    """extra: more implementations, name -> fn(hidden, weight, bias, labels) -> the mean loss
    over labelled rows, timed beside the peers. chunk_rows: also time the backend dispatch picks
    at these chunk sizes (rows per chunk), whatever `peers` names."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for case in cases:
        tokens, hidden, vocab, labelled, bias = CASES[case]
        impls = _peers(device, vocab, dtype)  # per case: dispatch's choice may depend on V
        if peers is not None:
            impls = chosen(impls, peers, base="hf full logits")
        impls.update({k: (lambda h, w, b, y, idx, fn=fn: fn(h, w, b, y)) for k, fn in (extra or {}).items()})
        be = dispatch.select("lm_loss", (device, dtype, vocab))
        for c in chunk_rows:
            impls[f"fusedlm[{be}], chunk {c}"] = lambda h, w, b, y, idx, be=be, c=c: lm_loss(
                h, w, y, b, backend=be, chunk_size=c)
        h, w, b, y = _inputs(tokens, hidden, vocab, labelled, dtype, device, bias)
        idx = (y != -100).nonzero().squeeze(1)
        n = idx.numel()
        flops = 6 * n * hidden * vocab
        base = None
        log(f"  {case}: {tokens} tokens ({n} labelled) x H={hidden} x V={vocab}"
            f"{' + bias' if bias else ''}, {str(dtype).split('.')[-1]}")
        for name, fn in impls.items():
            step = _step(fn, h, w, b, y, idx)
            try:
                ms = time_ms(step, device, warmup=5, rep=50)
                peak = _peak_extra_bytes(step, device)
            except Exception as e:  # a peer that fails a case (e.g. out of memory) is reported
                log(f"    {name:<28} failed ({type(e).__name__}: {str(e).splitlines()[0][:120]})")
                if device == "cuda":
                    torch.cuda.empty_cache()
                continue
            if name == "hf full logits":
                base = ms
            rec = dict(op="lm_loss", case=case, dtype=str(dtype).split(".")[-1], tokens=tokens,
                       labelled=n, hidden=hidden, vocab=vocab, bias=bias, impl=name, ms=round(ms, 4),
                       tflops=round(flops / ms / 1e9, 3),
                       peak_extra_mib=None if peak is None else round(peak / 2 ** 20, 1),
                       speedup_vs_hf=round(base / ms, 3) if base else None)
            collect(results, [rec], on_result)
            mem = "" if peak is None else f" {rec['peak_extra_mib']:9.1f} MiB"
            log(f"    {name:<28} {ms:9.3f} ms {rec['tflops']:8.3f} TFLOP/s{mem}  x{rec['speedup_vs_hf']}")
        del h, w, b, y
        if device == "cuda":
            torch.cuda.empty_cache()
    return results


def tune_entries(results, arch, source):
    """Measured-dispatch entries (see `tune`) from this benchmark's results: per dtype and
    measured vocabulary, fusedlm's backends in order of their forward + backward time summed
    over the cases of that vocabulary (a backend missing from one of them is left out)."""
    timings, cases = {}, {}  # (group, vocab) -> backend -> ms; (group, vocab) -> cases
    for r in results:
        backend = fusedlm_backend(r.get("impl", ""))
        if r.get("op") != "lm_loss" or backend is None or "ms" not in r:
            continue
        key = ((("dtype", r["dtype"]),), r["vocab"])
        cases.setdefault(key, set()).add(r["case"])
        timings.setdefault(key, {}).setdefault(backend, {})[r["case"]] = r["ms"]
    summed = {key: {b: sum(ms.values()) for b, ms in per.items() if set(ms) == cases[key]}
              for key, per in timings.items()}
    return tune.entries("lm_loss", "vocab", summed, arch, source)
