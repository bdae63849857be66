"""LayerNorm and RMSNorm modules, and the in-place swap of an existing model's norms.

The modules subclass torch's own, so parameters, state_dict keys, constructor arguments,
`isinstance` checks (Hugging Face's weight init uses them) and checkpoints are unchanged;
only `forward` runs the fused op.
"""
import math
from dataclasses import dataclass
from typing import List, Optional

import torch

from ..ops import layer_norm, rms_norm
from ._swap import rebind, swap_modules


def _fused_forward(module, x, residual, op, *params, dropout_p=0.0):
    """Flatten a multi-dim normalized_shape into one last dim, run `op`, restore the shape."""
    k = len(module.normalized_shape)
    if tuple(x.shape[-k:]) != tuple(module.normalized_shape):
        raise ValueError(f"x's trailing shape {tuple(x.shape[-k:])} does not match "
                         f"normalized_shape {tuple(module.normalized_shape)}")
    n = math.prod(module.normalized_shape)

    def flat(t):
        return t if t is None or k == 1 else t.reshape(*t.shape[:t.dim() - k], n)

    out = op(flat(x), *map(flat, params), module.eps, residual=flat(residual),
             dropout_p=dropout_p, return_residual=residual is not None, backend=module.backend)
    if k == 1:  # op kept x's shape (and returns no views, which FSDP2 would warn about)
        return out
    if residual is None:
        return out.view(x.shape)
    return out[0].view(x.shape), out[1].view(x.shape)


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm with a fused forward and backward.

    `forward(x, residual=None, dropout_p=0.0)`: with `residual`, normalizes `x + residual` in
    one kernel and returns (y, x + residual), the pre-LN block's new residual stream;
    `dropout_p` > 0 drops x out first, in the same kernel (`fusedlm.layer_norm`: pass 0 when
    not training). `backend` pins a backend for this module (None: dispatch decides per call).
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, bias=True,
                 device=None, dtype=None, backend: Optional[str] = None):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.backend = backend

    def forward(self, x, residual=None, dropout_p=0.0):
        return _fused_forward(self, x, residual, layer_norm, self.weight, self.bias,
                              dropout_p=dropout_p)


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm with a fused forward and backward (same arguments; see LayerNorm)."""

    def __init__(self, normalized_shape, eps=None, elementwise_affine=True, device=None,
                 dtype=None, backend: Optional[str] = None):
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self.backend = backend

    def forward(self, x, residual=None, dropout_p=0.0):
        return _fused_forward(self, x, residual, rms_norm, self.weight, dropout_p=dropout_p)


@dataclass
class Swapped:
    name: str          # qualified name in the model
    kind: str          # "LayerNorm" or "RMSNorm"
    normalized_shape: tuple


def replace_norms(model: torch.nn.Module, backend: Optional[str] = None,
                  rms: bool = True) -> List[Swapped]:
    """Swap every torch.nn.LayerNorm (and torch.nn.RMSNorm when `rms`) in `model`, in place,
    for fusedlm's, sharing the same Parameter objects (optimizers and tied weights keep
    working). Returns what was swapped; a module reached by two names is swapped once and
    listed under each name. Subclasses of torch's norms (other libraries' variants) are left
    alone, since their forward may differ."""
    targets = {torch.nn.LayerNorm: (LayerNorm, "LayerNorm")}
    if rms:
        targets[torch.nn.RMSNorm] = (RMSNorm, "RMSNorm")
    make = {t: (lambda child, cls=cls: rebind(child, cls, backend=backend))
            for t, (cls, _) in targets.items()}
    kinds = {cls: kind for cls, kind in targets.values()}
    return [Swapped(name, kinds[type(new)], tuple(new.normalized_shape))
            for name, new in swap_modules(model, make)]
