"""Deprecated name of fusedlm.ops.lm_loss."""
from .._deprecated import moved

moved(__name__, "fusedlm.ops.lm_loss")
