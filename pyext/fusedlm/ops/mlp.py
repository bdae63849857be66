"""A transformer MLP, y = act(x @ W1^T + b1) @ W2^T + b2, that keeps the activation's input and
not its output for the backward: one (rows, intermediate) tensor a layer instead of two (at
BERT-base's 16384 tokens, 100 MB of bf16 a layer; 1.2 GB a step). Gated (Llama's SwiGLU,
GeGLU), y = (act(x @ Wg^T + bg) * (x @ W1^T + b1)) @ W2^T + b2 keeps the gate's pre-activation
and the up projection, not act's output or the product: two tensors a layer instead of four.

The backward needs A = act(pre) again for W2's gradient (dy^T A). Its Triton backend writes A,
dpre = dA * act'(pre) and b1's gradient in one pass over pre and dA (kernels/mlp.py), where the
unfused backward reads dA and pre for act' and dpre again for the bias sum: no pass more than
an MLP that stores A. The torch backend recomputes A with torch's activation (one pass more).
The two GEMMs a way are torch's (cuBLAS) in every backend.

Flow of a call: validate -> dispatch.select -> with gradients in eager mode, _MLPFunction;
without gradients, the plain composition; while torch.compile traces, the plain composition
with the activation and the second GEMM checkpointed. Left to itself the compiler's partitioner
keeps a GELU's input and its output (it does not recompute erf or tanh); checkpointed, it keeps
the input and Inductor recomputes the activation inside the backward's own fused kernel.
"""
import math
from typing import NamedTuple, Optional

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from .. import _core
from ..reference.mlp import ACTIVATIONS, activation_backward, mlp as reference_mlp
from ..reference.mlp import activation as act
from . import _triton, dispatch
from ._tensors import autocast_inputs, dtype_differs, first_derivative_only

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


class MLPCase(NamedTuple):
    """The dispatch case of mlp."""
    device_type: str
    dtype: torch.dtype


def _triton_why_not(case):
    why = _triton.device_problem("mlp", case.device_type)
    if why is not None:
        return why
    if case.device_type == "cpu" and case.dtype == torch.bfloat16:
        return "bfloat16 is not supported by the Triton interpreter (numpy has no bfloat16)"
    if case.dtype not in _FLOATS:
        return f"the Triton kernel takes float32, float16 or bfloat16, got {case.dtype}"
    return None


# The Triton kernel has not run on a GPU yet: until the GPU suite passes for it (tests/
# test_mlp_gpu.py), a GPU call takes the torch backend.
dispatch.register(dispatch.OpBackends(
    "mlp", MLPCase, {"torch": lambda case: None, "triton": _triton_why_not},
    cuda_order=("triton", "torch"), gpu_verified=("torch",)))


def _num_partials(rows, n, device):
    sms = _core.sm_count(device) if device.type == "cuda" else 1
    return _triton.kernels("mlp").partial_rows(rows, n, sms)


def _activation_backward(backend, pre, da, activation, need_a, need_db, up=None, need_dbu=False):
    """-> (A or None, dpre, db or None, dup, dbu or None) for pre, da (rows, F): A = act(pre),
    times up when gated (dup and dbu are then up's gradients, else None). dpre is written over
    da by the Triton kernel."""
    if backend == "torch":
        a, dpre, dup = activation_backward(pre, da, activation, up)
        db = dpre.sum(0) if need_db else None
        dbu = dup.sum(0) if need_dbu else None
        return (a if need_a else None), dpre, db, dup, dbu
    rows, n = pre.shape
    empty_n = lambda need: torch.empty(n, dtype=pre.dtype, device=pre.device) if need else None  # noqa: E731
    programs = _num_partials(rows, n, pre.device) if need_db or need_dbu else 0
    part = lambda need: (torch.empty((programs, n), dtype=torch.float32, device=pre.device)  # noqa: E731
                         if need else None)
    a = torch.empty_like(pre) if need_a else None
    dup = torch.empty_like(pre) if up is not None else None
    db, dbu = empty_n(need_db), empty_n(need_dbu)
    _triton.run("mlp", "activation_backward", pre, da, a, da, part(need_db), db, activation,
                up, dup, part(need_dbu), dbu)
    return a, da, db, dup, dbu


def _weight_grad(grad_out, inp, weight):
    """grad_out^T @ inp, W's gradient, in W's own layout: a transposed weight (GPT-2's Conv1D
    passes its (in, out) parameter transposed) gets the transposed product's transpose, so
    that its parameter's gradient comes out contiguous, not copied into shape by autograd."""
    if weight.stride(0) == 1 and weight.stride(1) != 1:
        return torch.mm(inp.t(), grad_out).t()
    return torch.mm(grad_out.t(), inp)


def _hidden(x, weight1, bias1, gate_weight, gate_bias):
    """(pre, up): the activation's input, and the gated MLP's linear branch (None ungated)."""
    if gate_weight is None:
        return F.linear(x, weight1, bias1), None
    return F.linear(x, gate_weight, gate_bias), F.linear(x, weight1, bias1)


class _MLPFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight1, bias1, weight2, bias2, gate_weight, gate_bias, settings):
        activation, backend = settings
        pre, up = _hidden(x, weight1, bias1, gate_weight, gate_bias)
        y = _down(pre, up, weight2, bias2, activation)
        ctx.save_for_backward(x, weight1, weight2, gate_weight, pre, up)
        ctx.meta = (activation, backend, bias1 is not None, bias2 is not None,
                    gate_bias is not None)
        return y

    @staticmethod
    @first_derivative_only("mlp")
    def backward(ctx, dy):
        x, weight1, weight2, gate_weight, pre, up = ctx.saved_tensors
        activation, backend, has_b1, has_b2, has_bg = ctx.meta
        need_x, need_w1, need_b1, need_w2, need_b2, need_wg, need_bg, _ = ctx.needs_input_grad
        gated = gate_weight is not None
        rows = math.prod(pre.shape[:-1])  # (an intermediate width of 0 is allowed)
        dy = dy.reshape(rows, dy.shape[-1])
        pre = pre.view(rows, pre.shape[-1])
        up = up.view(rows, up.shape[-1]) if gated else None
        x2 = x.reshape(rows, x.shape[-1])
        # The activation's input comes from the gate's projection when gated, else from W1's.
        pre_w, need_pre_w, need_pre_b = ((gate_weight, need_wg, has_bg and need_bg) if gated
                                         else (weight1, need_w1, has_b1 and need_b1))
        dx = dw1 = db1 = dw2 = db2 = dwg = dbg = None
        if need_x or need_w1 or need_b1 or need_wg or need_bg:
            a, dpre, dpre_b, dup, db1_gated = _activation_backward(
                backend, pre, torch.mm(dy, weight2), activation, need_w2, need_pre_b, up,
                gated and has_b1 and need_b1)
            dpre_w = _weight_grad(dpre, x2, pre_w) if need_pre_w else None
            if need_x:
                dx = torch.mm(dpre, pre_w)
                if gated:
                    dx = dx.addmm_(dup, weight1)  # the up branch's share, in the same GEMM
                dx = dx.view(x.shape)
            if gated:
                dwg, dbg = dpre_w, dpre_b
                db1 = db1_gated
                dw1 = _weight_grad(dup, x2, weight1) if need_w1 else None
            else:
                dw1, db1 = dpre_w, dpre_b
        else:
            a = _activated(pre, up, activation) if need_w2 else None
        if need_w2:
            dw2 = _weight_grad(dy, a, weight2)
        if has_b2 and need_b2:
            db2 = dy.sum(0)
        return dx, dw1, db1, dw2, db2, dwg, dbg, None


def _activated(pre, up, activation):
    """The second GEMM's input: act(pre), times up when gated."""
    a = act(pre, activation)
    return a if up is None else a * up


def _down(pre, up, weight2, bias2, activation):
    """The activation, then the second GEMM: what the compiled path checkpoints."""
    return F.linear(_activated(pre, up, activation), weight2, bias2)


def _validate(x, weight1, bias1, weight2, bias2, activation, gate_weight, gate_bias):
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point() or x.dim() == 0:
        raise TypeError(f"x must be a floating-point tensor with a feature dimension, got "
                        f"dtype {x.dtype} and shape {tuple(x.shape)}")
    if activation not in ACTIVATIONS:
        raise ValueError(f"activation must be one of {', '.join(ACTIVATIONS)}, "
                         f"got {activation!r}")
    for name, w in (("weight1", weight1), ("weight2", weight2), ("gate_weight", gate_weight)):
        if (w is not None or name != "gate_weight") and (not isinstance(w, Tensor) or w.dim() != 2):
            raise ValueError(f"{name} must be a 2-D tensor (out_features, in_features), got "
                             f"{tuple(w.shape) if isinstance(w, Tensor) else type(w).__name__}")
    hidden, inter = x.shape[-1], weight1.shape[0]
    if weight1.shape[1] != hidden:
        raise ValueError(f"weight1 must have shape (intermediate, {hidden}) to match x's last "
                         f"dimension, got {tuple(weight1.shape)}")
    if gate_weight is not None and gate_weight.shape != weight1.shape:
        raise ValueError(f"gate_weight must have weight1's shape {tuple(weight1.shape)}, got "
                         f"{tuple(gate_weight.shape)}")
    if gate_bias is not None and gate_weight is None:
        raise ValueError("gate_bias needs gate_weight (a gated MLP's gate projection)")
    if weight2.shape[1] != inter:
        raise ValueError(f"weight2 must have shape (out_features, {inter}) to take weight1's "
                         f"{inter} outputs, got {tuple(weight2.shape)}")
    for name, b, n in (("bias1", bias1, inter), ("bias2", bias2, weight2.shape[0]),
                       ("gate_bias", gate_bias, inter)):
        if b is not None and (not isinstance(b, Tensor) or b.shape != (n,)):
            raise ValueError(f"{name} must be None or a tensor of shape ({n},), got "
                             f"{tuple(b.shape) if isinstance(b, Tensor) else type(b).__name__}")
    for name, t in (("weight1", weight1), ("bias1", bias1), ("weight2", weight2), ("bias2", bias2),
                    ("gate_weight", gate_weight), ("gate_bias", gate_bias)):
        if t is None:
            continue
        if t.device != x.device:
            raise ValueError(f"{name} is on {t.device} but x is on {x.device}")
        if dtype_differs(t, x):
            raise TypeError(f"{name} must have x's dtype {x.dtype}, got {t.dtype} (mixed dtypes "
                            "are cast under autocast only)")


def mlp(x: Tensor, weight1: Tensor, bias1: Optional[Tensor], weight2: Tensor,
        bias2: Optional[Tensor] = None, activation: str = "gelu", *,
        gate_weight: Optional[Tensor] = None, gate_bias: Optional[Tensor] = None,
        backend: Optional[str] = None) -> Tensor:
    """act(x @ weight1^T + bias1) @ weight2^T + bias2: a transformer MLP whose backward recomputes
    the activation instead of storing its output. With `gate_weight` (and `gate_bias`), gated:
    (act(x @ gate_weight^T + gate_bias) * (x @ weight1^T + bias1)) @ weight2^T + bias2, Llama's
    SwiGLU with activation="silu" (gate_proj, up_proj, down_proj = gate_weight, weight1,
    weight2), GeGLU with "gelu"; its backward recomputes act and the product.

    Weights as in torch.nn.Linear, (out_features, in_features); a transposed view is fine (GPT-2's
    Conv1D weights, `.t()`). `activation`: "gelu" (exact, BERT's), "gelu_tanh" (GPT-2's
    gelu_new), "relu" or "silu". Under autocast the GEMMs run in its dtype, as nn.Linear's
    would. `backend` forces 'torch' or 'triton' for the backward's activation step (raising if
    it cannot serve the call); None lets dispatch choose (see `fusedlm.explain`).
    """
    _validate(x, weight1, bias1, weight2, bias2, activation, gate_weight, gate_bias)
    x, weight1, bias1, weight2, bias2, gate_weight, gate_bias = autocast_inputs(
        x, weight1, bias1, weight2, bias2, gate_weight, gate_bias)
    chosen = dispatch.select("mlp", (x.device.type, x.dtype), backend)
    tensors = (x, weight1, bias1, weight2, bias2, gate_weight, gate_bias)
    needs_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in tensors)
    if not needs_grad:
        return reference_mlp(x, weight1, bias1, weight2, bias2, activation, gate_weight, gate_bias)
    if torch.compiler.is_compiling():
        pre, up = _hidden(x, weight1, bias1, gate_weight, gate_bias)
        return checkpoint(_down, pre, up, weight2, bias2, activation, use_reentrant=False)
    return _MLPFunction.apply(x, weight1, bias1, weight2, bias2, gate_weight, gate_bias,
                              (activation, chosen))
