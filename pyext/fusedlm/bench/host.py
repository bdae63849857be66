"""Host cost per call: what Python spends around each fused op, with its kernel launches
stubbed out, beside the torch op it replaces (whose time on the small inputs used is mostly its
own dispatch). A step is host-bound when these, summed over the step's calls, reach the GPU's
time for it; the graph-step issue's target is a few microseconds of the torch op per call.

`fusedlm bench host` prints the table; with launches stubbed it runs the same on a CPU as on a
GPU machine (the outputs are left unwritten: the numbers are of time, not of values).
"""
import contextlib

import torch
import torch.nn.functional as F

from .harness import time_ms


@contextlib.contextmanager
def launches_stubbed():
    """Within the block, the Triton launchers do nothing."""
    from ..ops import _triton
    saved = _triton.run
    _triton.run = lambda name, launcher, *args, **kwargs: None
    try:
        yield
    finally:
        _triton.run = saved


def _cases(device):
    """op -> (inputs maker, fusedlm call, torch call); each call does forward + backward when
    its inputs require grad."""
    import fusedlm
    half = torch.float16

    def ln_inputs():
        x = torch.randn(8, 768, device=device, dtype=half, requires_grad=True)
        return x, torch.ones(768, device=device, dtype=half, requires_grad=True), \
            torch.zeros(768, device=device, dtype=half, requires_grad=True)

    def attn_inputs():
        return [torch.randn(1, 16, 2, 64, device=device, dtype=half, requires_grad=True)
                for _ in range(3)]

    def loss_inputs():
        # Small enough that the (real) GEMMs around the stubbed row kernel cost little on a CPU.
        h = torch.randn(16, 32, device=device, dtype=half, requires_grad=True)
        w = torch.randn(64, 32, device=device, dtype=half, requires_grad=True)
        y = torch.randint(0, 64, (16,), device=device)
        return h, w, y

    return {
        "layer_norm": (ln_inputs,
                       lambda x, w, b, be: fusedlm.layer_norm(x, w, b, backend=be),
                       lambda x, w, b: F.layer_norm(x, (768,), w, b)),
        "attention": (attn_inputs,
                      lambda q, k, v, be: fusedlm.attention(q, k, v, causal=True, backend=be),
                      lambda q, k, v: F.scaled_dot_product_attention(
                          q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True)),
        "lm_loss": (loss_inputs,
                    lambda h, w, y, be: fusedlm.lm_loss(h, w, y, backend=be),
                    lambda h, w, y: F.cross_entropy(h @ w.t(), y)),
    }


def _per_call_us(fn, backward, rep):
    def call():
        out = fn()
        if backward:
            out.float().sum().backward()
    return time_ms(call, "cpu", rep=rep) * 1e3


def run(backends=("triton",), device=None, rep=200, log=print):
    """Host µs per call, forward and forward + backward, for each op: fusedlm on `backends`
    (launches stubbed) and the torch op (run for real)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    from ..ops import dispatch
    results = []
    for op, (inputs, ours, theirs) in _cases(device).items():
        args = inputs()
        case = (device, args[0].dtype, 64) if op == "attention" else (
            (device, args[0].dtype, 768, args[1].dtype) if op == "layer_norm" else (device, args[0].dtype))
        rows = {}
        for backward in (False, True):
            direction = "fwd+bwd" if backward else "fwd"
            for be in backends:
                why = dispatch.why_not(op, be, case)
                if why is not None:
                    log(f"  {op} fusedlm[{be}]: not run ({why})")
                    continue
                # The Triton launchers are stubbed; the CUDA C++ ones are not (a pybind11 call
                # into the core: a few us, part of what that backend costs the host).
                label = "launches stubbed" if be == "triton" else "launches real"
                with launches_stubbed():
                    rows[(f"fusedlm[{be}], {label}", direction)] = _per_call_us(
                        lambda: ours(*args, be), backward, rep)
            rows[("torch", direction)] = _per_call_us(lambda: theirs(*args), backward, rep)
        for (impl, direction), us in rows.items():
            results.append(dict(op=op, direction=direction, impl=impl, host_us=round(us, 2)))
            log(f"  {op:<10} {direction:<8} {impl:<34} {us:9.2f} us/call")
    return results
