"""Small tensor helpers shared by the ops."""
import torch


def unit_stride(t):
    """t itself when its last dimension is contiguous (what the kernels need), else a copy."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def dtype_differs(t, like):
    """Does t's dtype differ from like's in a way autocast cannot explain? A floating-point
    mismatch is allowed under autocast, which casts or promotes (asked only on a mismatch, so
    matching dtypes cost no autocast query)."""
    return t.dtype != like.dtype and not (
        t.is_floating_point() and torch.is_autocast_enabled(like.device.type))


def autocast_inputs(*tensors):
    """Under autocast, the tensors in the autocast dtype (as a matmul's inputs would be);
    otherwise unchanged. None stays None."""
    live = [t for t in tensors if t is not None]
    device_type = live[0].device.type
    if not torch.is_autocast_enabled(device_type):
        return tensors
    dtype = torch.get_autocast_dtype(device_type)
    return tuple(None if t is None else t.to(dtype) for t in tensors)


def require(ok, message, error=ValueError):
    """Raise `error(message)` unless the 0-d bool tensor `ok` is true. A CPU tensor is read here
    (free). Reading a GPU one would make the host wait for the GPU, and a compiled graph cannot
    read one at all, so there the test runs on the device (torch._assert_async): a failure stops
    the stream, with this message, before any kernel queued after it runs."""
    if ok.device.type == "cpu" and not torch.compiler.is_compiling():
        if not bool(ok):
            raise error(message)
        return
    torch._assert_async(ok, message)
