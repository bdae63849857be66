"""Deprecated name of fusedlm.nn.layer_norm."""
from .._deprecated import moved

moved(__name__, "fusedlm.nn.layer_norm")
