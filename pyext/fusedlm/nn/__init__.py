"""Drop-in modules built on fusedlm's ops."""
from .attention import SelfAttention
from .multihead import MultiheadAttention, replace_attention
from .lm_head import LMHead, MaskedLMHead, PredictionHeadTransform
from .normalization import LayerNorm, RMSNorm, replace_norms

__all__ = ["SelfAttention", "MultiheadAttention", "replace_attention", "LayerNorm", "RMSNorm", "replace_norms", "MaskedLMHead", "LMHead",
           "PredictionHeadTransform"]
