"""Deprecated name of fusedlm.ops.layer_norm."""
from .._deprecated import moved

moved(__name__, "fusedlm.ops.layer_norm")
