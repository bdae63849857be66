"""Drop-in modules built on fusedlm's ops."""
from .normalization import LayerNorm, RMSNorm, replace_norms

__all__ = ["LayerNorm", "RMSNorm", "replace_norms"]
