"""fusedlm: fused attention, layer-norm and LM-loss kernels for BERT- and GPT-style training."""
__version__ = "0.1.0"

from . import reference
from .ops import (LMLossOutput, attention, attention_varlen, explain, layer_norm, lm_loss,
                  pad, rms_norm, unpad)
from . import models, nn
from ._core import cuda_unavailable_reason


def patch(model, **kwargs):
    """Make a Hugging Face transformers model run on fusedlm's kernels, in place; returns a
    report. See fusedlm.integrations.hf."""
    from .integrations.hf import patch as _patch
    return _patch(model, **kwargs)


def unpatch(model):
    """Undo fusedlm.patch exactly."""
    from .integrations.hf import unpatch as _unpatch
    return _unpatch(model)


def _register_with_transformers():
    """`attn_implementation="fusedlm"` in transformers after `import fusedlm`, without importing
    transformers here (seconds): registered now if its modeling code is loaded, else right after
    it loads."""
    from ._after_import import call_after_import

    def register():
        from .integrations.hf import register as _register
        _register()
    call_after_import("transformers.modeling_utils", register)


_register_with_transformers()


def build_info():
    """How the compiled core was built (CUDA, the CPU emulator or neither; architectures, nvcc
    version) and which GPUs it sees."""
    from . import _core
    if _core._C is None:
        return {"compiled_core": False, "error": _core.IMPORT_ERROR}
    return dict(_core._C.build_info(), compiled_core=True)


__all__ = ["attention", "attention_varlen", "pad", "unpad", "layer_norm", "rms_norm", "lm_loss", "LMLossOutput",
           "explain", "models", "nn", "patch", "unpatch", "reference", "build_info",
           "cuda_unavailable_reason", "__version__"]
