"""Benchmark harness shared by `benchmarks/` and `fusedlm bench`, and usable as a library:
`compare` times your own implementation of an op against fusedlm's backends and the peers
installed here, on the same cases, after checking it against the float64 reference.

    import fusedlm.bench
    def my_layer_norm(x, w, b):
        return torch.nn.functional.layer_norm(x, x.shape[-1:], w, b, 1e-5)
    out = fusedlm.bench.compare("layer_norm", {"mine": my_layer_norm}, widths=(1024, 4096))
    print(fusedlm.bench.table(out["results"]))
"""
import torch

from .correctness import CHECKS
from .harness import environment, time_ms, write_json
from .report import plot, table, write_csv

__all__ = ["compare", "CHECKS", "environment", "time_ms", "write_json", "table", "write_csv", "plot"]

# The signature an implementation of each op must have (also each check's docstring).
SIGNATURES = {
    "layer_norm": "fn(x, weight, bias) -> layer_norm(x) over the last dim, eps=1e-5",
    "lm_loss": "fn(hidden, weight, bias, labels) -> mean cross-entropy over labels != -100",
    "attention": "fn(q, k, v, causal) -> attention on (batch, seq, heads, head_dim), scale 1/sqrt(D)",
}


def compare(op, implementations, *, device=None, dtype=None, peers=None, log=print, **cases):
    """Check each implementation against the reference, then time those that pass beside
    fusedlm's backends and the peers (`peers`: names to keep, None = all) on the op's cases.

    op: "layer_norm" | "lm_loss" | "attention"; implementations: name -> fn in the op's
    signature (SIGNATURES); cases: the op's benchmark options (layer_norm: rows, widths,
    directions; lm_loss: cases; attention: seqlens, head_dims, tokens, causal, directions).
    Returns {"checks": [{impl, passed, max_rel_error}], "results": [rows as `fusedlm bench`]}.
    An implementation that fails its check is reported and not timed.
    """
    from . import attention as attention_bench, layer_norm as ln_bench, lm_loss as loss_bench
    runners = {"layer_norm": ln_bench.run, "lm_loss": loss_bench.run, "attention": attention_bench.run}
    if op not in runners:
        raise ValueError(f"op must be one of {', '.join(runners)}, got {op!r}")
    if not isinstance(implementations, dict) or not all(callable(f) for f in implementations.values()):
        raise TypeError("implementations must be a dict of name -> callable "
                        f"({SIGNATURES[op]})")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    dtype = dtype or (torch.bfloat16 if device == "cuda" else torch.float32)
    checks, passed = [], {}
    for name, fn in implementations.items():
        try:
            ok, err = CHECKS[op](fn, device, dtype)
        except Exception as e:  # a broken implementation is a result, not a crash
            ok, err = False, float("nan")
            log(f"  check {name}: raised {type(e).__name__}: {e}")
        checks.append(dict(op=op, impl=name, dtype=str(dtype).split(".")[-1], passed=ok,
                           max_rel_error=err))
        log(f"  check {name} ({checks[-1]['dtype']}): {'PASS' if ok else 'FAIL'}, "
            f"max relative error {err:.2e} vs the float64 reference")
        if ok:
            passed[name] = fn
    kwargs = dict(cases, device=device, peers=peers, extra=passed, log=log)
    if op == "layer_norm":
        kwargs["dtypes"] = (dtype,)
    else:
        kwargs["dtype"] = dtype
    return {"checks": checks, "results": runners[op](**kwargs)}
