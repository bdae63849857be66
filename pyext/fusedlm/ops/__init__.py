"""The functional API: one entry point per op, backend dispatch, custom ops and autograd.

One module per op, named as the op (`layer_norm`, `lm_loss`, `attention`, `mlp`), beside `padding`
(unpad/pad), `attention_kernels` (which CUDA C++ attention kernels run) and `dispatch`. The
functions re-exported here shadow their modules' names as attributes of this package (so
`fusedlm.ops.layer_norm` is the function); `from fusedlm.ops.layer_norm import ...` or
`importlib.import_module("fusedlm.ops.layer_norm")` reach the module.
"""
from .attention import attention, attention_varlen, split_qkv
from .dispatch import explain
from .layer_norm import layer_norm, rms_norm
from .lm_loss import LMLossOutput, lm_loss
from .mlp import mlp
from .padding import pad, unpad, unpad_static

__all__ = ["attention", "attention_varlen", "split_qkv", "pad", "unpad", "unpad_static", "explain", "layer_norm", "rms_norm", "lm_loss", "LMLossOutput", "mlp"]
