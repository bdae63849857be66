"""fusedlm: fused attention, layer-norm and LM-loss kernels for BERT- and GPT-style training."""
__version__ = "0.1.0"

from . import reference
from .ops import (LMLossOutput, attention, attention_varlen, explain, layer_norm, lm_loss,
                  pad, rms_norm, unpad)
from . import models, nn
from ._core import cuda_unavailable_reason


def build_info():
    """How the compiled core was built (CUDA or not, architectures, nvcc version)."""
    from . import _core
    if _core._C is None:
        return {"compiled_core": False, "error": _core.IMPORT_ERROR}
    return dict(_core._C.build_info(), compiled_core=True)


__all__ = ["attention", "attention_varlen", "pad", "unpad", "layer_norm", "rms_norm", "lm_loss", "LMLossOutput",
           "explain", "models", "nn", "reference", "build_info",
           "cuda_unavailable_reason", "__version__"]
