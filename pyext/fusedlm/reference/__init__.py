"""Plain-PyTorch references: the definition of "correct" for every fused op."""
from .layer_norm import norm_forward, norm_backward, layer_norm, rms_norm, rounded_sum

__all__ = ["norm_forward", "norm_backward", "layer_norm", "rms_norm", "rounded_sum"]
