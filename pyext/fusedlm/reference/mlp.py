"""Reference transformer MLP: act(x @ W1^T + b1) @ W2^T + b2.

`mlp` is the oracle (plain differentiable math, run in float64 by the tests); `activation` and
`activation_backward` are the activation's two halves with torch's own kernels, which serve as
the `torch` backend of fusedlm.ops.mlp's backward (the activation recomputed from its input).
"""
import torch
import torch.nn.functional as F

ACTIVATIONS = ("gelu", "gelu_tanh", "relu")  # fusedlm.ops.mlp's names


def activation(pre, name):
    if name == "relu":
        return F.relu(pre)
    return F.gelu(pre, approximate="tanh" if name == "gelu_tanh" else "none")


def activation_backward(pre, da, name):
    """(act(pre), da * act'(pre)), rounded to pre's dtype as torch's kernels round them."""
    a = activation(pre, name)
    if name == "relu":
        return a, torch.ops.aten.threshold_backward(da, pre, 0)
    return a, torch.ops.aten.gelu_backward(da, pre, approximate="tanh" if name == "gelu_tanh" else "none")


def mlp(x, weight1, bias1, weight2, bias2=None, activation_name="gelu"):
    return F.linear(activation(F.linear(x, weight1, bias1), activation_name), weight2, bias2)
