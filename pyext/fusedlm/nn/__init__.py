"""Drop-in modules built on fusedlm's ops."""
from .attention import SelfAttention
from .layers import Conv1D, DecoderLayer, EncoderLayer
from .multihead import MultiheadAttention, replace_attention
from .lm_head import LMHead, MaskedLMHead, PredictionHeadTransform
from .layer_norm import LayerNorm, RMSNorm, replace_norms

__all__ = ["SelfAttention", "EncoderLayer", "DecoderLayer", "Conv1D", "MultiheadAttention", "replace_attention", "LayerNorm", "RMSNorm", "replace_norms", "MaskedLMHead", "LMHead",
           "PredictionHeadTransform"]
