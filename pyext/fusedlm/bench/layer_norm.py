"""Layer-norm benchmark: fusedlm's backends against their peers in the same process.

Throughput is GB/s of compulsory traffic (DESIGN.md): forward reads x and writes y
(2·rows·N elements); backward reads dy and x and writes dx (3·rows·N elements); the
parameters and statistics are counted too, though they are small. Each row of the result is
one (direction, dtype, rows, N, implementation) with its median time, GB/s, and speed-up over
torch eager.

With `dropout_p` (`--dropout`), the case is BERT's "dropout, add & norm" instead:
layer_norm(dropout(x) + residual), x's keep-mask drawn in the fused kernels both ways, against
torch's composition (F.dropout, the add, F.layer_norm) eager and compiled; forward reads x and
the residual and writes y and the sum (4 rows x N), backward reads dy and the sum and writes
x's and the residual's gradients (4 rows x N).
"""
import torch

from .. import layer_norm
from ..ops import dispatch
from ..reference import layer_norm as reference_layer_norm
from . import tune
from .harness import chosen, collect, time_ms
from .tune import fusedlm_backend

WIDTHS = (768, 1024, 2048, 4096, 8192)


def _peers(device_type):
    """name -> fn(x, w, b) returning y, for every implementation that can run here."""
    peers = {"torch": lambda x, w, b: torch.nn.functional.layer_norm(x, x.shape[-1:], w, b)}
    compiled = torch.compile(lambda x, w, b: reference_layer_norm(x, w, b)[0], dynamic=False)
    peers["torch.compile(ref)"] = compiled
    if device_type != "cuda":  # off a GPU the Triton kernels run interpreted: no speed to show
        return peers
    for be in ("triton", "cuda"):
        if dispatch.why_not("layer_norm", be, ("cuda", torch.bfloat16, 1024, None)) is None:
            peers[f"fusedlm[{be}]"] = lambda x, w, b, be=be: layer_norm(x, w, b, backend=be)
    try:
        from liger_kernel.ops.layer_norm import LigerLayerNormFunction
        peers["liger"] = lambda x, w, b: LigerLayerNormFunction.apply(x, w, b, 1e-5)
    except ImportError:
        pass
    try:
        from apex.normalization.fused_layer_norm import fused_layer_norm_affine
        peers["apex"] = lambda x, w, b: fused_layer_norm_affine(x, w, b, x.shape[-1:], 1e-5)
    except ImportError:
        pass
    return peers


def _dropout_peers(device_type, p):
    """name -> fn(x, w, b, residual) returning (y, dropout(x) + residual): BERT's dropout, add &
    norm, fused (fusedlm's backends) or composed (torch, eager and compiled)."""
    def composed(x, w, b, r):
        z = torch.nn.functional.dropout(x, p) + r
        return torch.nn.functional.layer_norm(z, z.shape[-1:], w, b), z
    peers = {"torch": composed, "torch.compile(ref)": torch.compile(composed, dynamic=False)}
    if device_type != "cuda":
        return peers
    for be in ("triton", "cuda"):
        if dispatch.why_not("layer_norm", be, ("cuda", torch.bfloat16, 1024, None, True)) is None:
            peers[f"fusedlm[{be}]"] = lambda x, w, b, r, be=be: layer_norm(
                x, w, b, residual=r, dropout_p=p, return_residual=True, backend=be)
    return peers


def run(dtypes=(torch.bfloat16, torch.float32), rows=(16384,), widths=WIDTHS,
        directions=("fwd", "bwd"), device=None, peers=None, extra=None, dropout_p=0.0, log=print,
        on_result=None):
    """extra: more implementations, name -> fn(x, weight, bias) -> y (with dropout_p > 0:
    fn(x, weight, bias, residual) -> (y, the sum)), timed beside the peers."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    impls = _dropout_peers(device, dropout_p) if dropout_p else _peers(device)
    if peers is not None:
        impls = chosen(impls, peers, base="torch")
    impls.update(extra or {})
    results = []
    for dtype in dtypes:
        esize = torch.tensor([], dtype=dtype).element_size()
        for m in rows:
            for n in widths:
                x = torch.randn(m, n, device=device, dtype=dtype)
                w = torch.randn(n, device=device, dtype=dtype)
                b = torch.randn(n, device=device, dtype=dtype)
                r = torch.randn_like(x) if dropout_p else None
                dy = torch.randn_like(x)
                params = 2 * n * esize
                tensors = 4 if dropout_p else None  # row tensors moved each way
                for direction in directions:
                    base = None
                    for name, fn in impls.items():
                        try:
                            ms = _time_one(fn, x, w, b, dy, direction, device, r)
                        except Exception as e:  # a peer that fails a case is reported, not fatal
                            log(f"  {name} {direction} {dtype} {m}x{n}: failed ({type(e).__name__}: {e})")
                            continue
                        moved = tensors or (2 if direction == "fwd" else 3)
                        nbytes = moved * m * n * esize + params * (1 if direction == "fwd" else 2)
                        rec = dict(op="layer_norm", direction=direction, dtype=str(dtype).split(".")[-1],
                                   rows=m, n=n, impl=name, ms=round(ms, 5),
                                   gbps=round(nbytes / ms / 1e6, 1),
                                   **({"dropout_p": dropout_p} if dropout_p else {}))
                        if name == "torch":
                            base = ms
                        rec["speedup_vs_torch"] = round(base / ms, 3) if base else None
                        collect(results, [rec], on_result)
                        log(f"  {direction} {rec['dtype']:>8} {m:>6}x{n:<5} {name:<20} "
                            f"{ms:8.4f} ms {rec['gbps']:8.1f} GB/s  x{rec['speedup_vs_torch']}")
                del x, w, b, r, dy
    return results


def _time_one(fn, x, w, b, dy, direction, device, r=None):
    """Forward, or backward alone (from a kept graph); with a residual r, fn(x, w, b, r) -> (y,
    the sum), both outputs' gradients flowing (the sum's is the next sublayer's input's)."""
    if r is None:
        if direction == "fwd":
            return time_ms(lambda: fn(x, w, b), device)
        xg, wg, bg = (t.detach().requires_grad_() for t in (x, w, b))
        y = fn(xg, wg, bg)
        return time_ms(lambda: torch.autograd.grad(y, (xg, wg, bg), dy, retain_graph=True), device)
    if direction == "fwd":
        with torch.no_grad():  # as the forward of a training step stores: y and the sum
            return time_ms(lambda: fn(x, w, b, r), device)
    xg, wg, bg, rg = (t.detach().requires_grad_() for t in (x, w, b, r))
    y, z = fn(xg, wg, bg, rg)
    return time_ms(lambda: torch.autograd.grad((y, z), (xg, wg, bg, rg), (dy, dy),
                                               retain_graph=True), device)


def dispatch_overhead(device=None, log=print):
    """Per-call host cost on a launch-bound input: the eager direct path against the
    torch.library custom op (what torch.compile sees) and torch's own layer norm."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    x = torch.randn(8, 768, device=device)
    w, b = torch.randn(768, device=device), torch.randn(768, device=device)
    backend = dispatch.select("layer_norm", (device, x.dtype, 768, x.dtype))
    op, seed = torch.ops.fusedlm.norm_fwd, torch.tensor(0)
    calls = {
        "torch F.layer_norm": lambda: torch.nn.functional.layer_norm(x, (768,), w, b),
        f"fusedlm eager path [{backend}]": lambda: layer_norm(x, w, b),
        f"fusedlm custom op [{backend}]": lambda: op(x, None, w, b, 1e-5, False, False, backend, 0.0,
                                                         seed),
    }
    out = []
    for name, fn in calls.items():
        us = time_ms(fn, "cpu", rep=200) * 1e3  # wall time per call, launch included
        out.append(dict(op="layer_norm", what="host time per call (8x768 fp32)", impl=name,
                        us=round(us, 2)))
        log(f"  {name:<36} {us:8.2f} us/call")
    return out


def tune_entries(results, arch, source):
    """Measured-dispatch entries (see `tune`) from this benchmark's results: per dtype, dropout
    or not (a `--dropout` run's cases are the dropout ones) and measured width, fusedlm's
    backends in order of forward + backward time (a backend timed in one direction only is left
    out of that width's order)."""
    times = {}  # ((("dtype", dtype), ("dropout", bool)), n) -> backend -> {direction: ms}
    for r in results:
        backend = fusedlm_backend(r.get("impl", ""))
        if r.get("op") != "layer_norm" or backend is None or "ms" not in r:
            continue
        group = (("dtype", r["dtype"]), ("dropout", bool(r.get("dropout_p"))))
        times.setdefault((group, r["n"]), {}).setdefault(backend, {})[r["direction"]] = r["ms"]
    timings = {key: {b: t["fwd"] + t["bwd"] for b, t in per.items() if {"fwd", "bwd"} <= set(t)}
               for key, per in times.items()}
    return tune.entries("layer_norm", "columns", timings, arch, source)
