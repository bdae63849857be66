"""Plain-PyTorch references: the definition of "correct" for every fused op."""
from .layer_norm import norm_forward, norm_backward, layer_norm, rms_norm, rounded_sum
from .attention import allowed_mask, attention, attention_varlen
from .lm_loss import lm_loss, ce_rows, shift_labels

__all__ = ["allowed_mask", "attention", "attention_varlen", "norm_forward", "norm_backward", "layer_norm", "rms_norm", "rounded_sum",
           "lm_loss", "ce_rows", "shift_labels"]
