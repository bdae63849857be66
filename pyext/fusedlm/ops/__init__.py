"""The functional API: one entry point per op, backend dispatch, custom ops and autograd."""
from .fused_attention import attention, attention_varlen, pad, unpad
from .dispatch import explain
from .loss import LMLossOutput, lm_loss
from .normalization import layer_norm, rms_norm

__all__ = ["attention", "attention_varlen", "pad", "unpad", "explain", "layer_norm", "rms_norm", "lm_loss", "LMLossOutput"]
