"""Weight initialization of a model trained from scratch, as BERT and GPT-2 were (and as
Hugging Face initializes them): linear and embedding weights N(0, initializer_range), biases
zero, norms 1 and 0, an embedding's padding row zero. Loading a checkpoint overwrites all of it.
"""
import math

import torch


def init_weights(model: torch.nn.Module, std: float, residual_projections=(), n_layer=1):
    """Initialize every submodule of `model` in place. Weights of parameters named in
    `residual_projections` (e.g. GPT-2's "c_proj.weight") get std / sqrt(2 * n_layer), GPT-2's
    scaling of the projections that feed the residual stream."""
    embeddings = []
    for m in model.modules():
        if isinstance(m, torch.nn.Embedding):
            embeddings.append(m)
        elif isinstance(m, torch.nn.LayerNorm):
            if m.weight is not None:
                torch.nn.init.ones_(m.weight)
            if m.bias is not None:
                torch.nn.init.zeros_(m.bias)
        elif hasattr(m, "weight") and isinstance(m.weight, torch.nn.Parameter):  # Linear, Conv1D
            torch.nn.init.normal_(m.weight, std=std)
            if getattr(m, "bias", None) is not None:
                torch.nn.init.zeros_(m.bias)
    # Embeddings last: a decoder tied to the word embeddings must not undo the zero padding row.
    for m in embeddings:
        torch.nn.init.normal_(m.weight, std=std)
        if m.padding_idx is not None:
            with torch.no_grad():
                m.weight[m.padding_idx].zero_()
    scaled = std / math.sqrt(2 * n_layer)
    for name, p in model.named_parameters():
        if any(name.endswith(r) for r in residual_projections):
            torch.nn.init.normal_(p, std=scaled)
