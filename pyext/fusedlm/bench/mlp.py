"""MLP benchmark: fusedlm.ops.mlp against torch's composition (F.linear, the activation,
F.linear), eager and under torch.compile, in the same process.

One row per (case, implementation): the median ms of a forward + backward, the speed-up over
torch eager, and `saved_mib`, the activation memory the forward keeps for its backward (every
distinct tensor autograd saves, the parameters not counted: the same count on a CPU as on a
GPU). The cases are the MLPs of the models `fusedlm bench model` trains, at one batch's rows,
and a Llama-3 8B layer's gated MLP (SwiGLU).
"""
import torch

from ..ops import dispatch
from ..ops.mlp import mlp
from ..reference.mlp import mlp as reference_mlp
from .harness import SavedBytes, chosen, collect, time_ms

# name -> (rows, hidden, intermediate, activation, gated)
CASES = {
    "bert-base": (16384, 768, 3072, "gelu", False),       # 32 x 512 tokens
    "bert-large": (16384, 1024, 4096, "gelu", False),
    "gpt2-small": (8192, 768, 3072, "gelu_tanh", False),  # 8 x 1024 tokens
    "llama-style": (8192, 2048, 5632, "silu", True),      # bench model's, 4 x 2048 tokens
    "llama-8b": (8192, 4096, 14336, "silu", True),
    "tiny": (256, 64, 256, "gelu", False),                # a CPU's
    "tiny-gated": (256, 64, 256, "silu", True),
}


def _impls(device, activation):
    """name -> fn(x, w1, b1, w2, b2, gate_weight, gate_bias) for every implementation that can
    run here (the gate's two None when not gated)."""
    def ours(be):
        return lambda x, w1, b1, w2, b2, wg, bg: mlp(x, w1, b1, w2, b2, activation, gate_weight=wg,
                                                     gate_bias=bg, backend=be)

    def theirs(x, w1, b1, w2, b2, wg, bg):
        return reference_mlp(x, w1, b1, w2, b2, activation, wg, bg)
    impls = {"torch": theirs, "torch.compile": torch.compile(theirs, dynamic=False)}
    for be in ("torch", "triton"):
        if dispatch.why_not("mlp", be, (device, torch.float32)) is None:
            impls[f"fusedlm[{be}]"] = ours(be)
    # Compiled, the op is the composition with its activation recomputed (ops/mlp.py).
    impls["fusedlm, compiled"] = torch.compile(ours(None), dynamic=False)
    return impls


def run(cases=("bert-base", "gpt2-small"), dtype=torch.bfloat16, device=None, peers=None,
        log=print, on_result=None):
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for case in cases:
        rows, hidden, inter, activation, gated = CASES[case]
        g = torch.Generator().manual_seed(0)
        rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device, dtype)  # noqa: E731
        # Biases as the models have them: BERT's and GPT-2's, none in Llama's.
        bias = (lambda n: None) if gated else (lambda n: rnd(n, scale=0.1))  # noqa: E731
        args = [rnd(rows, hidden), rnd(inter, hidden, scale=hidden ** -0.5), bias(inter),
                rnd(hidden, inter, scale=inter ** -0.5), bias(hidden),
                rnd(inter, hidden, scale=hidden ** -0.5) if gated else None, None]
        args = [None if t is None else t.requires_grad_() for t in args]
        leaves = [t for t in args if t is not None]
        dy = rnd(rows, hidden)
        impls = _impls(device, activation)
        if peers is not None:
            impls = chosen(impls, peers, base="torch")
        base = None
        for name, fn in impls.items():
            try:
                step = lambda fn=fn: torch.autograd.grad(fn(*args), leaves, dy)  # noqa: E731
                ms = time_ms(step, device)
                with SavedBytes(leaves) as saved:
                    fn(*args)
            except Exception as e:  # an implementation that fails a case is reported, not fatal
                log(f"  {case} {name}: failed ({type(e).__name__}: {e})")
                continue
            base = ms if name == "torch" else base
            rec = dict(op="mlp", case=case, dtype=str(dtype).split(".")[-1], rows=rows,
                       hidden=hidden, intermediate=inter, activation=activation, gated=gated,
                       impl=name, ms=round(ms, 4), saved_mib=round(saved.bytes / 2 ** 20, 2),
                       speedup_vs_torch=round(base / ms, 3) if base else None)
            collect(results, [rec], on_result)
            log(f"  {case:<11} {rec['dtype']:>8} {name:<16} {ms:9.3f} ms  x{rec['speedup_vs_torch']}"
                f"  saved {rec['saved_mib']:8.1f} MiB")
    return results
