"""Plain-PyTorch references: the definition of "correct" for every fused op."""
import torch

from .layer_norm import norm_forward, norm_backward, layer_norm, rms_norm, rounded_sum
from .attention import allowed_mask, attention, attention_probabilities, attention_varlen
from .lm_loss import lm_loss, ce_rows, shift_labels
from .mlp import mlp

# How far an implementation may be from these references run in float64, by the relative norm
# error ||out - ref|| / ||ref|| of an output or gradient, per dtype: a small multiple of its
# rounding error. A gradient that sums over rows (a parameter's, or dK and dV over queries) may
# be twice as far. The test suite and `fusedlm check` both judge by this one table.
TOLERANCE = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}

__all__ = ["TOLERANCE", "allowed_mask", "attention", "attention_probabilities", "attention_varlen", "norm_forward", "norm_backward", "layer_norm", "rms_norm", "rounded_sum",
           "lm_loss", "ce_rows", "shift_labels", "mlp"]
