"""Correctness of one implementation of an op against the float64 reference, forward and
backward, on a small awkward case. `fusedlm check` runs these for every backend, and
`fusedlm.bench.compare` for a user's implementation before timing it.

Each check takes fn in the op's benchmark signature and returns (passed, max relative error over
the output and every gradient, scaled to the base tolerance). Tolerances are the test
suite's: reference.TOLERANCE, twice that for a gradient summed over rows.
"""
import torch

from .. import reference
from ..reference import TOLERANCE  # noqa: F401 (the CLI prints it)


def _compare(got, want, dtype, summed=()):
    """Passed if every tensor is within tolerance (2x for the indices in `summed`); the error
    reported is the worst relative error scaled to the base tolerance."""
    worst, passed = 0.0, True
    for i, (a, c) in enumerate(zip(got, want)):
        err = ((a.double() - c).norm() / c.norm().clamp_min(1e-30)).item()
        allowed = TOLERANCE[dtype] * (2 if i in summed else 1)
        passed &= err < allowed
        worst = max(worst, err * TOLERANCE[dtype] / allowed)
    return passed, worst


def _leaves(*tensors):
    return [t.detach().requires_grad_() for t in tensors]


def check_layer_norm(fn, device, dtype, n=1000, rows=37, residual=False):
    """fn(x, weight, bias) -> y = layer_norm(x) over the last dim, eps 1e-5; with residual=True,
    fn(x, weight, bias, residual) -> layer_norm(x + residual)."""
    g = torch.Generator().manual_seed(0)
    x, r, dy = (torch.randn(rows, n, generator=g).to(device, dtype) for _ in range(3))
    w = (1 + torch.randn(n, generator=g)).to(device, dtype)
    b = torch.randn(n, generator=g).to(device, dtype)
    x, w, b = _leaves(x, w, b)
    y = fn(x, w, b, r) if residual else fn(x, w, b)
    got = (y,) + torch.autograd.grad(y, (x, w, b), dy)
    xs, ws, bs = _leaves(*(t.double() for t in (x, w, b)))
    inp = reference.rounded_sum(xs, r.double(), dtype) if residual else xs
    ref = reference.layer_norm(inp, ws, bs, eps=1e-5)[0]
    want = (ref,) + torch.autograd.grad(ref, (xs, ws, bs), dy.double())
    return _compare(got, want, dtype, summed=(2, 3))  # dweight, dbias


def check_lm_loss(fn, device, dtype, vocab=4099, tokens=64, hidden=32):
    """fn(hidden, weight, bias, labels) -> mean cross-entropy of hidden @ weight.T + bias over
    the rows whose label is not -100."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g).to(device, dtype)
    w = (torch.randn(vocab, hidden, generator=g) / 3).to(device, dtype)
    b = torch.randn(vocab, generator=g).to(device, dtype)
    y = torch.randint(0, vocab, (tokens,), generator=g)
    y[torch.rand(tokens, generator=g) > 0.3] = -100
    y = y.to(device)
    h, w, b = _leaves(h, w, b)
    loss = fn(h, w, b, y)
    got = (loss,) + torch.autograd.grad(loss, (h, w, b))
    hs, ws, bs = _leaves(*(t.double() for t in (h, w, b)))
    ref = reference.lm_loss(hs, ws, y, bs)[0]
    want = (ref,) + torch.autograd.grad(ref, (hs, ws, bs))
    return _compare(got, want, dtype, summed=(2, 3))  # dweight, dbias


def check_attention(fn, device, dtype, batch=2, seq=37, heads=4, head_dim=64):
    """fn(q, k, v, causal) -> softmax(q k^T / sqrt(D)) v on (batch, seq, heads, D) tensors,
    causal and not; the worse of the two is reported."""
    g = torch.Generator().manual_seed(0)
    worst, passed = 0.0, True
    for causal in (False, True):
        q, k, v, do = (torch.randn(batch, seq, heads, head_dim, generator=g).to(device, dtype)
                       for _ in range(4))
        q, k, v = _leaves(q, k, v)
        o = fn(q, k, v, causal)
        got = (o,) + torch.autograd.grad(o, (q, k, v), do)
        qs, ks, vs = _leaves(*(t.double() for t in (q, k, v)))
        ref = reference.attention(qs, ks, vs, causal=causal)[0]
        want = (ref,) + torch.autograd.grad(ref, (qs, ks, vs), do.double())
        ok, err = _compare(got, want, dtype, summed=(2, 3))  # dK, dV
        passed, worst = passed and ok, max(worst, err)
    return passed, worst


def check_mlp(fn, device, dtype, rows=37, hidden=48, inter=200):
    """fn(x, weight1, bias1, weight2, bias2) -> gelu(x @ weight1.T + bias1) @ weight2.T + bias2."""
    g = torch.Generator().manual_seed(0)
    rnd = lambda *shape, scale=1.0: (torch.randn(*shape, generator=g) * scale).to(device, dtype)  # noqa: E731
    x, dy = rnd(rows, hidden), rnd(rows, hidden)
    params = _leaves(rnd(inter, hidden, scale=hidden ** -0.5), rnd(inter, scale=0.5),
                     rnd(hidden, inter, scale=inter ** -0.5), rnd(hidden, scale=0.5))
    x = _leaves(x)[0]
    y = fn(x, *params)
    got = (y,) + torch.autograd.grad(y, [x, *params], dy)
    exact = _leaves(*(t.double() for t in (x, *params)))
    ref = reference.mlp(*exact, "gelu")
    want = (ref,) + torch.autograd.grad(ref, exact, dy.double())
    return _compare(got, want, dtype, summed=(2, 3, 4, 5))  # the parameters'


CHECKS = {"layer_norm": check_layer_norm, "lm_loss": check_lm_loss, "attention": check_attention,
          "mlp": check_mlp}
