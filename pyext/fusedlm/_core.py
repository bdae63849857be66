"""Loads the compiled core `fusedlm._C` and turns tensors into what it takes (DLPack + stream).

The core never links libtorch: tensors cross as DLPack capsules and the CUDA stream as an
integer handle. Importing it never touches a GPU, so it works on machines without one.
"""
import torch
from torch.utils.dlpack import to_dlpack

try:
    from . import _C
    IMPORT_ERROR = None
except ImportError as e:  # a source tree that was never built, or a broken build
    _C = None
    IMPORT_ERROR = str(e)


# The CPU emulator's build (FUSEDLM_CUDA=EMU: csrc/emu): the CUDA C++ kernels run on CPU tensors,
# to test their logic where there is no GPU; never chosen automatically (dispatch runs the
# reference off a CUDA device).
EMULATED = bool(getattr(_C, "EMULATED", False))


def cuda_unavailable_reason():
    """None if the CUDA C++ kernels can run here, else why not."""
    if _C is None:
        return f"the compiled core fusedlm._C did not import ({IMPORT_ERROR})"
    if EMULATED:
        return None
    if not _C.build_info()["cuda"]:
        return "fusedlm._C was built without CUDA (no nvcc at build time, or FUSEDLM_CUDA=OFF)"
    return None


def device_problem(device_type):
    """None if the CUDA C++ kernels can serve tensors on `device_type`, else why not (the
    device first: a CPU tensor is the more telling reason on any build)."""
    if EMULATED:
        if device_type != "cpu":
            return (f"this fusedlm._C emulates its CUDA C++ kernels on the CPU (FUSEDLM_CUDA=EMU): "
                    f"it takes CPU tensors, got device type {device_type}")
        return None
    if device_type != "cuda":
        return f"the CUDA C++ kernel needs CUDA tensors, got device type {device_type}"
    return cuda_unavailable_reason()


def dl(t):
    """A DLPack capsule borrowing `t` (None stays None). Detached only when it requires grad
    (a detach costs about as much as the export itself, on every tensor of every launch)."""
    return None if t is None else to_dlpack(t.detach() if t.requires_grad else t)


# The current stream's raw handle by device index, as Triton's own launcher reads it: no
# torch.cuda.Stream object made per launch. Absent from CPU-only torch builds.
_raw_stream = getattr(torch._C, "_cuda_getCurrentRawStream", None)


def stream_of(t):
    """The current CUDA stream of t's device, as the integer handle the core launches on (0
    for the emulator's CPU tensors)."""
    if EMULATED:
        return 0
    if _raw_stream is not None:
        return _raw_stream(t.get_device())
    return torch.cuda.current_stream(t.device).cuda_stream


_SM_COUNT = {}


def sm_count(device):
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx not in _SM_COUNT:
        _SM_COUNT[idx] = torch.cuda.get_device_properties(idx).multi_processor_count
    return _SM_COUNT[idx]
