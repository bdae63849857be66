"""Activations by their Hugging Face config names (`hidden_act`)."""
import torch.nn.functional as F

ACTIVATIONS = {
    "gelu": F.gelu,  # BERT's exact erf GELU
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "relu": F.relu,
}


# The same activations by the name fusedlm.ops.mlp knows them (its backward recomputes them).
MLP_ACTIVATIONS = {"gelu": "gelu", "gelu_new": "gelu_tanh", "gelu_pytorch_tanh": "gelu_tanh",
                   "relu": "relu"}


def activation(name):
    if name not in ACTIVATIONS:
        raise ValueError(f"hidden_act must be one of {', '.join(ACTIVATIONS)}, got {name!r}")
    return ACTIVATIONS[name]
