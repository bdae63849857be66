"""MLP benchmark: fusedlm.ops.mlp against torch's composition (F.linear, the activation,
F.linear), eager and under torch.compile, in the same process.

One row per (case, implementation): the median ms of a forward + backward, the speed-up over
torch eager, and `saved_mib`, the activation memory the forward keeps for its backward (every
distinct tensor autograd saves, the parameters not counted: the same count on a CPU as on a
GPU). The cases are the MLPs of the models `fusedlm bench model` trains, at one batch's rows.
"""
import torch

from ..ops import dispatch
from ..ops.mlp import mlp
from ..reference.mlp import mlp as reference_mlp
from .harness import chosen, collect, time_ms

# name -> (rows, hidden, intermediate, activation)
CASES = {
    "bert-base": (16384, 768, 3072, "gelu"),     # 32 x 512 tokens
    "bert-large": (16384, 1024, 4096, "gelu"),
    "gpt2-small": (8192, 768, 3072, "gelu_tanh"),  # 8 x 1024 tokens
    "tiny": (256, 64, 256, "gelu"),              # a CPU's
}


def _impls(device, activation):
    """name -> fn(x, w1, b1, w2, b2) for every implementation that can run here."""
    impls = {
        "torch": lambda *t: reference_mlp(*t, activation),
        "torch.compile": torch.compile(lambda *t: reference_mlp(*t, activation), dynamic=False),
    }
    for be in ("torch", "triton"):
        if dispatch.why_not("mlp", be, (device, torch.float32)) is None:
            impls[f"fusedlm[{be}]"] = lambda *t, be=be: mlp(*t, activation, backend=be)
    # Compiled, the op is the composition with its activation recomputed (ops/mlp.py).
    impls["fusedlm, compiled"] = torch.compile(lambda *t: mlp(*t, activation), dynamic=False)
    return impls


def saved_bytes(fn, leaves):
    """Bytes of the distinct tensors a forward of fn(*leaves) saves for its backward, the leaves
    (parameters and input) not counted."""
    own = {t.untyped_storage().data_ptr() for t in leaves}
    seen = {}

    def pack(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in own:
            seen[ptr] = t.untyped_storage().nbytes()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn(*leaves)
    return sum(seen.values())


def run(cases=("bert-base", "gpt2-small"), dtype=torch.bfloat16, device=None, peers=None,
        log=print, on_result=None):
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    results = []
    for case in cases:
        rows, hidden, inter, activation = CASES[case]
        g = torch.Generator().manual_seed(0)
        rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(device, dtype)  # noqa: E731
        leaves = [t.requires_grad_() for t in (
            rnd(rows, hidden), rnd(inter, hidden, scale=hidden ** -0.5), rnd(inter, scale=0.1),
            rnd(hidden, inter, scale=inter ** -0.5), rnd(hidden, scale=0.1))]
        dy = rnd(rows, hidden)
        impls = _impls(device, activation)
        if peers is not None:
            impls = chosen(impls, peers, base="torch")
        base = None
        for name, fn in impls.items():
            try:
                step = lambda fn=fn: torch.autograd.grad(fn(*leaves), leaves, dy)  # noqa: E731
                ms = time_ms(step, device)
                saved = saved_bytes(fn, leaves)
            except Exception as e:  # an implementation that fails a case is reported, not fatal
                log(f"  {case} {name}: failed ({type(e).__name__}: {e})")
                continue
            base = ms if name == "torch" else base
            rec = dict(op="mlp", case=case, dtype=str(dtype).split(".")[-1], rows=rows,
                       hidden=hidden, intermediate=inter, activation=activation, impl=name,
                       ms=round(ms, 4), saved_mib=round(saved / 2 ** 20, 2),
                       speedup_vs_torch=round(base / ms, 3) if base else None)
            collect(results, [rec], on_result)
            log(f"  {case:<11} {rec['dtype']:>8} {name:<16} {ms:9.3f} ms  x{rec['speedup_vs_torch']}"
                f"  saved {rec['saved_mib']:8.1f} MiB")
    return results
