"""fusedlm.ops.mlp against the float64 reference, forward and backward, plain and gated; what it
keeps for the backward; its errors. Inputs are lists in the op's order: x, weight1, bias1,
weight2, bias2, gate_weight, gate_bias (the last two None when not gated)."""
import pytest
import torch
import torch.nn.functional as F

import fusedlm
from fusedlm import reference
from fusedlm.reference.mlp import ACTIVATIONS
from conftest import DEVICE, HAS_GPU, TOL, rel_err

BACKENDS = ["torch"] + (["triton"] if fusedlm.ops.dispatch.why_not(
    "mlp", "triton", (DEVICE, torch.float32)) is None else [])
DTYPES = [torch.float32, torch.float16] + ([torch.bfloat16] if HAS_GPU else [])
# (rows, hidden, intermediate): one row; rows and columns off every tile size (16 x 256); more
# than one column tile and several row programs.
SHAPES = [(1, 8, 16), (37, 24, 70), (300, 40, 520)]


NAMES = ["x", "weight1", "bias1", "weight2", "bias2", "gate_weight", "gate_bias"]


def make(rows, hidden, inter, dtype, *, bias1=True, bias2=True, gated=False, gate_bias=True,
         seed=0):
    g = torch.Generator().manual_seed(seed)
    rnd = lambda *s, scale=1.0: (torch.randn(*s, generator=g) * scale).to(DEVICE, dtype).requires_grad_()
    x = rnd(rows, hidden)
    w1 = rnd(inter, hidden, scale=max(hidden, 1) ** -0.5)
    w2 = rnd(hidden, inter, scale=max(inter, 1) ** -0.5)
    b1 = rnd(inter, scale=0.5) if bias1 else None
    b2 = rnd(hidden, scale=0.5) if bias2 else None
    wg = rnd(inter, hidden, scale=max(hidden, 1) ** -0.5) if gated else None
    bg = rnd(inter, scale=0.5) if gated and gate_bias else None
    dy = torch.randn(rows, hidden, generator=g).to(DEVICE, dtype)
    return [x, w1, b1, w2, b2, wg, bg], dy


def ours(activation="gelu", backend=None):
    """fusedlm.ops.mlp taking the inputs list's order."""
    return lambda x, w1, b1, w2, b2, wg, bg: fusedlm.ops.mlp(
        x, w1, b1, w2, b2, activation, gate_weight=wg, gate_bias=bg, backend=backend)


def theirs(activation="gelu"):
    """torch's composition (the reference's code), same order."""
    return lambda x, w1, b1, w2, b2, wg, bg: reference.mlp(x, w1, b1, w2, b2, activation, wg, bg)


def outputs_and_grads(fn, inputs, dy):
    y = fn(*inputs)
    live = [t for t in inputs if t is not None and t.requires_grad]
    got = iter(torch.autograd.grad(y, live, dy))
    return [y] + [next(got) if t is not None and t.requires_grad else None for t in inputs]


def f64(t):
    return None if t is None else t.detach().double().requires_grad_(t.requires_grad)


def check(backend, dtype, rows, hidden, inter, activation, **kw):
    """Output and every gradient within twice the error of torch's own composition in `dtype`
    (F.linear, the activation (times the up projection, gated), F.linear), both measured
    against float64."""
    inputs, dy = make(rows, hidden, inter, dtype, **kw)
    got = outputs_and_grads(ours(activation, backend), inputs, dy)
    torchs = outputs_and_grads(theirs(activation), inputs, dy)
    exact = outputs_and_grads(theirs(activation), [f64(t) for t in inputs], dy.double())
    assert got[0].dtype == dtype and got[0].shape == (rows, hidden)
    # One row: a weight's gradient is an outer product of a few values, too few for a ratio of
    # two errors to mean anything; there the library's tolerance is the floor.
    floor = 1e-6 if rows > 1 else TOL[dtype]
    for name, o, t, e in zip(["y"] + NAMES, got, torchs, exact):
        if e is None:
            assert o is None, name
            continue
        err, torch_err = rel_err(o, e), rel_err(t, e)
        assert err <= 2 * torch_err + floor, (name, err, torch_err)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_matches_reference(backend, dtype, activation, shape, gated):
    check(backend, dtype, *shape, activation, gated=gated)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bias1,bias2,gate_bias", [(False, True, True), (True, False, True),
                                                   (False, False, True), (True, True, False),
                                                   (False, False, False)])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_without_biases(backend, bias1, bias2, gate_bias, gated):
    check(backend, torch.float32, 37, 24, 70, "silu" if gated else "gelu", bias1=bias1,
          bias2=bias2, gated=gated, gate_bias=gate_bias)


_WANTED = [(0,), (1,), (2,), (3,), (4,), (0, 3), (1, 2, 4)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("gated,wanted", [(False, w) for w in _WANTED] + [
    (True, w) for w in _WANTED + [(5,), (6,), (1, 5), (0, 6)]],
    ids=lambda v: ("gated" if v else "plain") if isinstance(v, bool) else
    "+".join(("x", "w1", "b1", "w2", "b2", "wg", "bg")[i] for i in v))
def test_some_inputs_need_grad(backend, gated, wanted):
    """Each gradient path alone (a frozen layer, an input without gradient) gives the same
    gradients as all of them, and None where none was asked."""
    inputs, dy = make(37, 24, 70, torch.float32, gated=gated)
    full = outputs_and_grads(ours("silu", backend), inputs, dy)
    some = [None if t is None else t.detach().requires_grad_(i in wanted)
            for i, t in enumerate(inputs)]
    part = outputs_and_grads(ours("silu", backend), some, dy)
    for i in range(7):
        if i in wanted:
            assert torch.allclose(part[1 + i], full[1 + i], rtol=1e-5, atol=1e-6), i
        else:
            assert part[1 + i] is None


def wide_saved(fn, gated=False):
    """How many (rows, intermediate) tensors a forward of fn keeps for its backward (after
    which the backward runs, so that a compiled fn's backward is traced too)."""
    inputs, dy = make(64, 16, 48, torch.float32, gated=gated)
    wide = []

    def pack(t):
        if t.shape == (64, 48):
            wide.append(t.data_ptr())
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        y = fn(*inputs)
    y.backward(dy)
    return len(set(wide))


@pytest.mark.parametrize("backend", BACKENDS)
def test_keeps_the_activation_input_only(backend):
    """The (rows, intermediate) tensors kept for the backward: the activation's input (and the
    up projection, gated), where torch's composition keeps the activation's output too (and the
    product, gated)."""
    assert wide_saved(theirs()) == 2 and wide_saved(ours(backend=backend)) == 1
    assert wide_saved(theirs("silu"), gated=True) == 4
    assert wide_saved(ours("silu", backend), gated=True) == 2


@pytest.mark.parametrize("backend", BACKENDS)
def test_transposed_weights_get_contiguous_gradients(backend):
    """GPT-2's Conv1D stores (in, out) and passes the transpose: the parameters' gradients come
    out in their own layout, equal to the plain composition's."""
    inputs, dy = make(37, 24, 70, torch.float32)
    x, w1, b1, w2, b2 = inputs[:5]
    c_fc, c_proj = (w.detach().t().contiguous().requires_grad_() for w in (w1, w2))
    grads = []
    for fn in (lambda: fusedlm.ops.mlp(x, c_fc.t(), b1, c_proj.t(), b2, "gelu_tanh", backend=backend),
               lambda: reference.mlp(x, c_fc.t(), b1, c_proj.t(), b2, "gelu_tanh")):
        g = torch.autograd.grad(fn(), (c_fc, c_proj), dy)
        assert all(t.is_contiguous() for t in g)
        grads.append(g)
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_batched_and_empty_inputs(backend):
    inputs, dy = make(2 * 5, 24, 70, torch.float32, gated=True)
    x = inputs[0].detach().view(2, 5, 24).requires_grad_()
    y = ours("silu", backend)(x, *inputs[1:])
    assert y.shape == (2, 5, 24)
    (dx,) = torch.autograd.grad(y, x, dy.view(2, 5, 24))
    ref = outputs_and_grads(theirs("silu"), inputs, dy)
    assert torch.allclose(dx.view(10, 24), ref[1], rtol=1e-5, atol=1e-6)
    empty = inputs[0].detach()[:0].requires_grad_()
    y = ours("silu", backend)(empty, *inputs[1:])
    g = torch.autograd.grad(y, [empty] + inputs[1:], y.new_zeros(0, 24))
    assert g[0].shape == (0, 24) and all(bool((t == 0).all()) for t in g[1:])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("rows,hidden,inter", [(5, 0, 16), (5, 8, 0), (0, 8, 0), (0, 0, 0)])
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_empty_widths(backend, rows, hidden, inter, gated):
    """A width of 0 is an empty sum, not an error: torch's composition's results (zeros, and
    the biases passed through)."""
    inputs, _ = make(rows, hidden, inter, torch.float32, gated=gated)
    dy = torch.randn(rows, hidden, device=DEVICE)
    for a, b in zip(outputs_and_grads(ours("silu", backend), inputs, dy),
                    outputs_and_grads(theirs("silu"), inputs, dy)):
        assert (a is None and b is None) or (a.shape == b.shape and torch.allclose(a, b))


def test_autocast_casts_as_linear_does():
    """Under autocast the GEMMs and the activation run in its dtype and the fp32 parameters get
    fp32 gradients, as torch's composition gives."""
    inputs, dy = make(37, 24, 70, torch.float32, gated=True)
    results = []
    for fn in (ours("silu"), theirs("silu")):
        with torch.autocast(DEVICE, dtype=torch.bfloat16):
            y = fn(*inputs)
        results.append([y] + list(torch.autograd.grad(y, inputs, dy.to(torch.bfloat16))))
    for a, b in zip(*results):
        assert a.dtype == b.dtype
        assert rel_err(a, b) < 1e-2


def test_second_derivative_is_refused():
    inputs, dy = make(8, 8, 16, torch.float64)
    y = ours()(*inputs)
    (dx,) = torch.autograd.grad(y, inputs[0], dy, create_graph=True)
    with pytest.raises(RuntimeError, match="fusedlm.mlp has no second derivative"):
        dx.sum().backward()


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("gated", [False, True], ids=["plain", "gated"])
def test_fullgraph_compile_keeps_the_activation_input_only(activation, gated):
    """Compiled, the op is the composition with the activation and the second GEMM
    checkpointed: no graph break, eager's results, and the eager path's tensors kept (the
    partitioner alone keeps a GELU's input and output both)."""
    torch._dynamo.reset()  # one code object (ours' lambda) across the parameters: no limit hit
    inputs, dy = make(37, 24, 70, torch.float32, gated=gated)
    fn = ours(activation)
    eager = outputs_and_grads(fn, inputs, dy)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    for a, b in zip(eager, outputs_and_grads(compiled, inputs, dy)):
        assert (a is None and b is None) or torch.allclose(a, b, rtol=1e-5, atol=1e-6)
    assert wide_saved(torch.compile(fn, fullgraph=True, backend="aot_eager"), gated) == 1 + gated


def test_dispatch_keeps_unverified_triton_off_the_gpu_default():
    inputs, _ = make(8, 8, 16, torch.float32)
    ours()(*inputs)
    decision = fusedlm.explain("mlp")
    assert decision.backend == "torch"
    if DEVICE == "cuda":
        assert any(b == "triton" for b, _ in decision.skipped)


@pytest.mark.parametrize("change,error,match", [
    (dict(activation="swish"), ValueError, "activation must be one of gelu, gelu_tanh, relu, silu"),
    (dict(gate_weight=torch.zeros(16, 7)), ValueError, r"gate_weight must have weight1's shape \(16, 8\)"),
    (dict(gate_bias=torch.zeros(16)), ValueError, "gate_bias needs gate_weight"),
    (dict(gate_weight=torch.zeros(16, 8), gate_bias=torch.zeros(3)), ValueError,
     r"gate_bias must be None or a tensor of shape \(16,\)"),
    (dict(weight1=torch.zeros(16, 9)), ValueError, r"weight1 must have shape \(intermediate, 8\)"),
    (dict(weight1=torch.zeros(16)), ValueError, "weight1 must be a 2-D tensor"),
    (dict(weight2=torch.zeros(8, 15)), ValueError, r"weight2 must have shape \(out_features, 16\)"),
    (dict(bias1=torch.zeros(15)), ValueError, r"bias1 must be None or a tensor of shape \(16,\)"),
    (dict(bias2=torch.zeros(9)), ValueError, r"bias2 must be None or a tensor of shape \(8,\)"),
    (dict(weight2=torch.zeros(8, 16, dtype=torch.float64)), TypeError, "weight2 must have x's dtype"),
    (dict(x=torch.zeros(4, 8, dtype=torch.int64)), TypeError, "x must be a floating-point tensor"),
    (dict(backend="cuda"), ValueError, "backend"),
])
def test_bad_input_names_the_argument(change, error, match):
    args = dict(x=torch.zeros(4, 8), weight1=torch.zeros(16, 8), bias1=torch.zeros(16),
                weight2=torch.zeros(8, 16), bias2=torch.zeros(8), activation="gelu")
    args.update(change)
    with pytest.raises(error, match=match):
        fusedlm.ops.mlp(**args)
