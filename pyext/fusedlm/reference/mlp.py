"""Reference transformer MLP: act(x @ W1^T + b1) @ W2^T + b2, or gated (Llama's SwiGLU, GeGLU):
(act(x @ Wg^T + bg) * (x @ W1^T + b1)) @ W2^T + b2.

`mlp` is the oracle (plain differentiable math, run in float64 by the tests); `activation` and
`activation_backward` are the activation step's two halves with torch's own kernels, which serve
as the `torch` backend of fusedlm.ops.mlp's backward (the activation recomputed from its input).
"""
import torch
import torch.nn.functional as F

ACTIVATIONS = ("gelu", "gelu_tanh", "relu", "silu")  # fusedlm.ops.mlp's names


def activation(pre, name):
    if name == "relu":
        return F.relu(pre)
    if name == "silu":
        return F.silu(pre)
    return F.gelu(pre, approximate="tanh" if name == "gelu_tanh" else "none")


def _activation_grad(pre, grad, name):
    """grad * act'(pre), torch's kernel for it."""
    if name == "relu":
        return torch.ops.aten.threshold_backward(grad, pre, 0)
    if name == "silu":
        return torch.ops.aten.silu_backward(grad, pre)
    return torch.ops.aten.gelu_backward(grad, pre, approximate="tanh" if name == "gelu_tanh" else "none")


def activation_backward(pre, da, name, up=None):
    """(A, dpre, dup): A = act(pre) (times up when gated), dpre = da * dA/dpre, dup = da * act(pre)
    (None when not gated), each rounded to pre's dtype as torch's kernels round them."""
    a = activation(pre, name)
    if up is None:
        return a, _activation_grad(pre, da, name), None
    return a * up, _activation_grad(pre, da * up, name), da * a


def mlp(x, weight1, bias1, weight2, bias2=None, activation_name="gelu", gate_weight=None,
        gate_bias=None):
    if gate_weight is None:
        hidden = activation(F.linear(x, weight1, bias1), activation_name)
    else:
        hidden = activation(F.linear(x, gate_weight, gate_bias), activation_name) * F.linear(x, weight1, bias1)
    return F.linear(hidden, weight2, bias2)
