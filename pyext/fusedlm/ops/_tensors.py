"""Small tensor helpers shared by the ops."""
import contextlib
import functools

import torch


def unit_stride(t):
    """t itself when its last dimension is contiguous (what the kernels need), else a copy."""
    return t if t is None or t.stride(-1) == 1 else t.contiguous()


def dtype_differs(t, like):
    """Does t's dtype differ from like's in a way autocast cannot explain? A floating-point
    mismatch is allowed under autocast, which casts or promotes (asked only on a mismatch, so
    matching dtypes cost no autocast query)."""
    return t.dtype != like.dtype and not (
        t.is_floating_point() and torch.amp.is_autocast_available(like.device.type)
        and torch.is_autocast_enabled(like.device.type))


def autocast_off(device_type):
    """A context with autocast off for `device_type`: torch.autocast(enabled=False) when autocast
    is on, else a no-op (entering torch.autocast costs several microseconds a call)."""
    if torch.amp.is_autocast_available(device_type) and torch.is_autocast_enabled(device_type):
        return torch.autocast(device_type, enabled=False)
    return contextlib.nullcontext()


def autocast_inputs(*tensors):
    """Under autocast, the tensors in the autocast dtype (as a matmul's inputs would be);
    otherwise unchanged. None stays None."""
    live = [t for t in tensors if t is not None]
    device_type = live[0].device.type
    # Some device types (meta) have no autocast, and asking about them raises.
    if not torch.amp.is_autocast_available(device_type) or not torch.is_autocast_enabled(device_type):
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


class _NoSecondDerivative(torch.autograd.Function):
    """The identity on a gradient, whose own derivative is an error naming the op."""

    @staticmethod
    def forward(ctx, op, grad, *anchors):
        ctx.op = op
        # A copy, not a view: autograd may accumulate into it in place (create_graph only).
        return grad.clone()

    @staticmethod
    def backward(ctx, *_):
        raise RuntimeError(f"fusedlm.{ctx.op} has no second derivative: its backward is a fused "
                           "kernel, which is not differentiable in turn")


def first_derivative_only(op):
    """Decorates an autograd.Function's backward whose math is not differentiable itself (a
    kernel, or statistics saved as constants). It runs without recording a graph; when a graph
    of the gradients is asked for (create_graph=True), each gradient goes through a node that
    refuses to be differentiated, tied to the saved tensors that require grad (the forward's
    inputs), so that a derivative toward them meets that node: without it the gradients are
    constants, and autograd would only say that they do not require grad."""
    def wrap(backward):
        @functools.wraps(backward)
        def wrapper(ctx, *grad_outputs):
            with torch.no_grad():
                grads = backward(ctx, *grad_outputs)
            if not torch.is_grad_enabled():
                return grads
            anchors = [t for t in ctx.saved_tensors if t is not None and t.requires_grad]
            return tuple(g if g is None else _NoSecondDerivative.apply(op, g, *anchors)
                         for g in grads)
        return wrapper
    return wrap


def check_dropout(dropout_p, seed):
    """The dropout arguments every op takes: a probability in [0, 1), and a seed or None."""
    if not isinstance(dropout_p, (int, float)) or isinstance(dropout_p, bool) or not 0.0 <= dropout_p < 1.0:
        raise ValueError(f"dropout_p must be a float in [0, 1), got {dropout_p!r}")
    if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)
                             or not 0 <= seed < 2 ** 31):
        raise ValueError(f"seed must be an int in [0, 2**31) or None, got {seed!r}")


def seeded_keep(shape, dropout_p, seed, device):
    """A keep-mask (each element kept with probability 1 - dropout_p) drawn from an int seed by
    a generator of its own: the torch backends' masks, drawn again alike by their backward."""
    g = torch.Generator(device=device).manual_seed(seed)
    return torch.rand(shape, generator=g, device=device) >= dropout_p


def dropout_seed(dropout_p, seed, n_streams=1, device=None):
    """The dropout seed, an int. Under torch.compile one is drawn as a one-element int64 tensor
    on `device` instead (an int would break the graph): the Triton kernels read it on the device,
    so a compiled step holds no host value and a CUDA graph replays a new draw each step; the
    CUDA C++ kernels, which take it by value, read it on the host; attention's torch backend,
    traced, draws its mask from torch's generator instead."""
    if dropout_p == 0:
        return 0
    if seed is None:  # from torch's generator: torch.manual_seed reproduces a run
        if torch.compiler.is_compiling():
            return torch.randint(0, 2 ** 31 - 1 - n_streams, (), device=device)
        return int(torch.randint(0, 2 ** 31 - 1 - n_streams, ()))
    return min(seed, 2 ** 31 - 1 - n_streams)
