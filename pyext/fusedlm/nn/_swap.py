"""In-place module swaps that keep the same Parameter objects (optimizers, tied weights and
checkpoints keep working)."""
from typing import Callable, Dict, List, Tuple

import torch


def rebind(child: torch.nn.Module, cls, **attrs):
    """An instance of `cls` (a subclass of type(child)) sharing child's state: parameters,
    buffers, submodules, hooks and training flag, plus `attrs`."""
    new = cls.__new__(cls)
    new.__dict__ = child.__dict__.copy()
    for name in ("_parameters", "_buffers", "_modules"):
        setattr(new, name, getattr(child, name).copy())
    for k, v in attrs.items():
        setattr(new, k, v)
    return new


def swap_modules(model: torch.nn.Module,
                 make: Dict[type, Callable[[torch.nn.Module], torch.nn.Module]]
                 ) -> List[Tuple[str, torch.nn.Module]]:
    """Replace every module whose exact type is a key of `make` by make[type](module). Exact
    types only: other libraries' subclasses may have another forward. A module reached by two
    names is replaced once and listed under each. Returns (qualified name, new module)."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    done, swapped = {}, []
    for parent_name, parent in list(model.named_modules()):
        # _modules, not named_children(): the latter hides a second name of the same module.
        for child_name, child in list(parent._modules.items()):
            if id(child) not in done:
                if type(child) not in make:
                    continue
                done[id(child)] = make[type(child)](child)
            setattr(parent, child_name, done[id(child)])
            swapped.append((f"{parent_name}.{child_name}" if parent_name else child_name, done[id(child)]))
    return swapped
