"""Deprecated name of fusedlm.ops.attention (and of attention_kernels and padding, split from it)."""
from .._deprecated import moved

moved(__name__, "fusedlm.ops.attention", "fusedlm.ops.attention_kernels", "fusedlm.ops.padding")
