"""Fused layer norm and RMSNorm over the last dimension, with an optional fused residual add
and dropout: y = norm(dropout(x) + residual), BERT's "dropout, add & norm" in one kernel
each way (the keep-mask is redrawn from the seed by the backward, never stored).

Flow of a call: validate -> dispatch.select (backend) -> either the eager path (an
autograd.Function calling the launchers directly: no torch.library dispatch cost) or, while
torch.compile traces, the custom ops `fusedlm::norm_fwd` / `fusedlm::norm_bwd` (fake kernels
and autograd registered), which call the very same `_forward` / `_backward`.
"""
from typing import NamedTuple, Optional, Tuple

import torch
from torch import Tensor

from .. import _core, reference
from . import _triton, dispatch
from ._tensors import (check_dropout, dropout_seed, dtype_differs, first_derivative_only,
                       seeded_keep, unit_stride)

_FLOATS = (torch.float32, torch.float16, torch.bfloat16)

# ---------------------------------------------------------------------------------------------
# What each backend serves.

class NormCase(NamedTuple):
    """The dispatch case of layer_norm and rms_norm."""
    device_type: str
    dtype: torch.dtype
    columns: int  # the normalized (last) dimension
    param_dtype: Optional[torch.dtype]  # weight's (or bias's) dtype, None without parameters
    dropout: bool = False  # x dropped out before the add (dropout_p > 0)


def _kernel_dtype_problem(case, what):
    dtype, wdtype = case.dtype, case.param_dtype
    if dtype not in _FLOATS:
        return f"{what} takes float32, float16 or bfloat16 input, got {dtype}"
    if wdtype is not None and wdtype not in (dtype, torch.float32):
        return f"{what} takes weight/bias in the input's dtype or float32, got {wdtype}"
    return None


def _triton_why_not(case):
    device, dtype, n = case.device_type, case.dtype, case.columns
    why = _triton.device_problem("layer_norm", device)
    if why is not None:
        return why
    kernels = _triton.kernels("layer_norm")
    if device == "cpu" and dtype == torch.bfloat16:
        return "bfloat16 is not supported by the Triton interpreter (numpy has no bfloat16)"
    if n > kernels.MAX_COLUMNS:
        return f"hidden size {n} exceeds the Triton kernel's {kernels.MAX_COLUMNS}"
    return _kernel_dtype_problem(case, "the Triton kernel")


def _cuda_why_not(case):
    why = _core.device_problem(case.device_type)
    if why is not None:
        return why
    n = case.columns
    limit = _core._C.norm_max_columns()
    if n > limit:
        return f"hidden size {n} exceeds the CUDA C++ kernel's {limit}"
    if case.dropout and case.dtype == torch.float32 and n > limit // 2 and n % 4:
        return (f"the CUDA C++ kernel's dropout takes float32 rows of more than {limit // 2} "
                f"columns only as 16-byte vectors (a multiple of 4 columns), got {n}")
    return _kernel_dtype_problem(case, "the CUDA C++ kernel")


_SUPPORTS = {"torch": lambda case: None, "triton": _triton_why_not, "cuda": _cuda_why_not}
# Both kernels passed the GPU suite (benchmarks/results/2026-11-23-h100). Triton comes first: it
# was the faster at 65536 rows; at 16384 rows its host launch cost loses to the CUDA C++ kernel's,
# which a measured per-size table (the graph-step issue) is to decide. The CUDA C++ kernel's
# dropout is newer than that run: until tests/test_layer_norm_gpu.py has passed it on a GPU,
# dispatch does not pick it for a dropout call.
for _name in ("layer_norm", "rms_norm"):
    dispatch.register(dispatch.OpBackends(
        _name, NormCase, _SUPPORTS, cuda_order=("triton", "cuda", "torch"),
        gpu_verified=("torch", "triton", "cuda"),
        unverified_cases={"cuda": lambda case: "the CUDA C++ kernel's dropout" if case.dropout else None}))


# ---------------------------------------------------------------------------------------------
# Backend implementations on (rows, N) views; shared by the eager path and the custom ops.

def _stat_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def _num_partials(rows, device):
    """Programs of the backward kernel: one partial dweight/dbias row each (deterministic)."""
    target = 2 * _core.sm_count(device) if device.type == "cuda" else 4
    g = min(rows, target)
    return -(-rows // -(-rows // g))  # no program without rows


def _aten_serves(x_dtype, device_type, param_dtype, is_rms):
    """The `torch` backend runs aten's own layer norm (one kernel, not the reference's chain of
    ops) where its statistics are fp32/fp64 (always on CUDA; on CPU it keeps half inputs'
    statistics in half) and the parameters share x's dtype. Otherwise: the reference math."""
    return (not is_rms and param_dtype in (None, x_dtype)
            and (device_type == "cuda" or x_dtype in (torch.float32, torch.float64)))


def _torch_dropout(t, dropout_p, seed):
    """t dropped out as the torch backend does it, forward (x) and backward (dz) alike: its own
    keep-mask drawn from `seed`, not the Triton kernels' (as attention's torch backend). A tensor
    seed (torch.compile's) is read on the host: the Triton kernels read it on the device."""
    keep = seeded_keep(t.shape, dropout_p, int(seed), t.device)
    return torch.where(keep, t * (1.0 / (1.0 - dropout_p)), 0.0).to(t.dtype)


def _forward(backend, x, residual, weight, bias, eps, is_rms, store_z, dropout_p=0.0, seed=0):
    if backend == "torch" and dropout_p > 0:
        x = _torch_dropout(x, dropout_p, seed)
    if backend == "torch":
        pdtype = weight.dtype if weight is not None else (bias.dtype if bias is not None else None)
        if not _aten_serves(x.dtype, x.device.type, pdtype, is_rms):
            return reference.norm_forward(x, residual, weight, bias, eps, is_rms, store_z)
        z = x if residual is None else x + residual
        y, mean, rstd = torch.native_layer_norm(z, [x.shape[1]], weight, bias, eps)
        return y, (z if store_z else None), mean.view(-1), rstd.view(-1)
    rows, n = x.shape
    y = torch.empty((rows, n), dtype=x.dtype, device=x.device)
    z = torch.empty((rows, n), dtype=x.dtype, device=x.device) if store_z else None
    mean = None if is_rms else torch.empty(rows, dtype=torch.float32, device=x.device)
    rstd = torch.empty(rows, dtype=torch.float32, device=x.device)
    if backend == "triton":
        _triton.run("layer_norm", "forward", x, residual, weight, bias, y, z, mean, rstd, eps,
                    is_rms, dropout_p, seed)
    elif rows > 0:
        d = _core.dl
        _core._C.norm_fwd(d(x), d(residual), d(weight), d(bias), d(y), d(z), d(mean), d(rstd),
                          float(eps), is_rms, _core.stream_of(x), *_cuda_seed(dropout_p, seed))
    return y, z, mean, rstd


def _cuda_seed(dropout_p, seed):
    """(dropout_p, seed, seed_tensor) as the CUDA C++ kernels take them: an int seed by value, a
    tensor one (torch.compile's, on the device) by pointer."""
    if isinstance(seed, Tensor):
        return dropout_p, 0, _core.dl(seed)
    return dropout_p, seed, None


def _backward(backend, dy, z, weight, mean, rstd, dz_extra, is_rms, need_dw, need_db, param_dtype,
              dropout_p=0.0, seed=0, need_dz=True):
    """-> (dz, dx, dweight, dbias): dz is the gradient of the normalized sum (the residual's), dx
    x's (dz dropped out as x was; dz itself without dropout). need_dz=False (dropout with no
    residual): only dx is computed, dz comes back None."""
    if backend == "torch":
        dz, dw, db = _torch_backward(dy, z, weight, mean, rstd, dz_extra, is_rms, need_dw,
                                     need_db, param_dtype)
        if dropout_p == 0:
            return dz, dz, dw, db
        return dz, _torch_dropout(dz, dropout_p, seed), dw, db
    rows, n = dy.shape
    dropout = dropout_p > 0
    dz = torch.empty((rows, n), dtype=dy.dtype, device=dy.device) if need_dz or not dropout else None
    dx = torch.empty((rows, n), dtype=dy.dtype, device=dy.device) if dropout else dz
    dw = torch.empty(n, dtype=param_dtype, device=dy.device) if need_dw else None
    db = torch.empty(n, dtype=param_dtype, device=dy.device) if need_db else None
    if rows == 0:
        return dz, dx, None if dw is None else dw.zero_(), None if db is None else db.zero_()
    g = _num_partials(rows, dy.device)
    part = lambda need: torch.empty((g, n), dtype=torch.float32, device=dy.device) if need else None
    dw_part, db_part = part(need_dw), part(need_db)
    if backend == "triton":
        _triton.run("layer_norm", "backward", dy, z, weight, mean, rstd, dz_extra, dz, dw_part,
                    db_part, dw, db, is_rms, dx if dropout else None, dropout_p, seed)
    else:
        d = _core.dl
        _core._C.norm_bwd(d(dy), d(z), d(weight), d(mean), d(rstd), d(dz_extra), d(dz),
                          d(dw_part), d(db_part), d(dw), d(db), is_rms, _core.stream_of(dy),
                          d(dx) if dropout else None, *_cuda_seed(dropout_p, seed))
    return dz, dx, dw, db


def _torch_backward(dy, z, weight, mean, rstd, dz_extra, is_rms, need_dw, need_db, param_dtype):
    # The same test as the forward's, so both halves take the same path.
    if _aten_serves(dy.dtype, dy.device.type, param_dtype, is_rms):
        dz, dw, _ = torch.ops.aten.native_layer_norm_backward(
            dy, z, [dy.shape[1]], mean.view(-1, 1), rstd.view(-1, 1), weight, None,
            [True, need_dw, False])
        if dz_extra is not None:
            dz = dz + dz_extra
        db = dy.sum(0, dtype=torch.float32).to(param_dtype) if need_db else None
        return dz, dw, db
    dz, dw, db = reference.norm_backward(dy, z, weight, mean, rstd, dz_extra, is_rms,
                                         need_dw, need_db)
    return dz, None if dw is None else dw.to(param_dtype), None if db is None else db.to(param_dtype)


# ---------------------------------------------------------------------------------------------
# Eager path: autograd.Function straight to the launchers.

def _save_for_backward(ctx, x, residual, weight, bias, is_rms, backend, z, mean, rstd,
                       dropout_p, seed):
    """What both autograd paths keep: the normalized input (the sum, with a residual; x dropped
    out, with dropout), and the seed that redraws the keep-mask."""
    ctx.save_for_backward(z if residual is not None or dropout_p > 0 else x, weight, mean, rstd)
    ctx.meta = (is_rms, bias is not None, bias.dtype if bias is not None else None, backend,
                dropout_p, seed)


def _grad_plan(ctx, dy):
    """Saved tensors plus which gradients are wanted, shared by both backwards."""
    z, weight, mean, rstd = ctx.saved_tensors
    is_rms, has_bias, bias_dtype, backend, dropout_p, seed = ctx.meta
    need = ctx.needs_input_grad
    need_dw, need_db = weight is not None and need[2], has_bias and need[3]
    # With dropout, the sum's own gradient is the residual's alone (x's is dropped out).
    need_dz = dropout_p == 0 or need[1]
    param_dtype = weight.dtype if weight is not None else (bias_dtype or dy.dtype)
    return (z, weight, mean, rstd, is_rms, backend, need, need_dw, need_db, param_dtype,
            dropout_p, seed, need_dz)


def _input_grads(need, dz, dx, dw, db, settings_grads):
    """x's gradient dx (dz itself without dropout) and the residual's dz (their sum was
    normalized); then None for each non-tensor input (`settings_grads` of them)."""
    return (dx if need[0] else None), (dz if need[1] else None), dw, db, *(None,) * settings_grads


class _NormFunction(torch.autograd.Function):
    # (eps, is_rms, store_z, backend, dropout_p, seed) come as one tuple: apply costs about
    # 0.2 us per argument.
    @staticmethod
    def forward(ctx, x, residual, weight, bias, settings):
        eps, is_rms, store_z, backend, dropout_p, seed = settings
        y, z, mean, rstd = _forward(backend, x, residual, weight, bias, eps, is_rms, store_z,
                                    dropout_p, seed)
        _save_for_backward(ctx, x, residual, weight, bias, is_rms, backend, z, mean, rstd,
                           dropout_p, seed)
        # An output nobody used gets gradient None, not a zero-filled tensor to read.
        ctx.set_materialize_grads(False)
        return y, z

    @staticmethod
    @first_derivative_only("layer_norm")
    def backward(ctx, dy, dz_out):
        if dy is None:
            dy = torch.zeros_like(ctx.saved_tensors[0])
        (z, weight, mean, rstd, is_rms, backend, need, need_dw, need_db, param_dtype, dropout_p,
         seed, need_dz) = _grad_plan(ctx, dy)
        dz, dx, dw, db = _backward(backend, unit_stride(dy), z, weight, mean, rstd,
                                   None if dz_out is None else unit_stride(dz_out), is_rms,
                                   need_dw, need_db, param_dtype, dropout_p, seed, need_dz)
        return _input_grads(need, dz, dx, dw, db, 1)


# ---------------------------------------------------------------------------------------------
# torch.compile path: custom ops with fake kernels and autograd. The dropout seed is a one-element
# tensor on the data's device there (see dropout_seed), which the Triton kernels read themselves.

@torch.library.custom_op("fusedlm::norm_fwd", mutates_args=())
def norm_fwd_op(x: Tensor, residual: Optional[Tensor], weight: Optional[Tensor],
                bias: Optional[Tensor], eps: float, is_rms: bool, store_z: bool,
                backend: str, dropout_p: float, seed: Tensor) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    y, z, mean, rstd = _forward(backend, x, residual, weight, bias, eps, is_rms, store_z,
                                dropout_p, seed)
    empty = rstd.new_empty(0)
    return y, (z if z is not None else x.new_empty(0)), (mean if mean is not None else empty), rstd


@norm_fwd_op.register_fake
def _(x, residual, weight, bias, eps, is_rms, store_z, backend, dropout_p, seed):
    rows, n = x.shape
    stat = _stat_dtype(x.dtype)
    return (x.new_empty((rows, n)), x.new_empty((rows, n) if store_z else (0,)),
            x.new_empty((0,) if is_rms else (rows,), dtype=stat), x.new_empty((rows,), dtype=stat))


@torch.library.custom_op("fusedlm::norm_bwd", mutates_args=())
def norm_bwd_op(dy: Tensor, z: Tensor, weight: Optional[Tensor], mean: Tensor, rstd: Tensor,
                dz_extra: Optional[Tensor], is_rms: bool, need_dw: bool, need_db: bool,
                param_dtype: torch.dtype, backend: str, dropout_p: float, seed: Tensor,
                need_dz: bool) -> Tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> (dz, dx, dw, db), a (0,) tensor for each not computed (dx: without dropout, where it
    is dz; an op's outputs may not alias)."""
    dz, dx, dw, db = _backward(backend, dy, z, weight, None if is_rms else mean, rstd, dz_extra,
                               is_rms, need_dw, need_db, param_dtype, dropout_p, seed,
                               need_dz)
    empty = lambda dtype: dy.new_empty(0, dtype=dtype)  # noqa: E731 (one each: no aliases)
    return (dz if dz is not None else empty(dy.dtype), dx if dropout_p > 0 else empty(dy.dtype),
            dw if dw is not None else empty(param_dtype), db if db is not None else empty(param_dtype))


@norm_bwd_op.register_fake
def _(dy, z, weight, mean, rstd, dz_extra, is_rms, need_dw, need_db, param_dtype, backend,
      dropout_p, seed, need_dz):
    n = dy.shape[1]
    return (dy.new_empty(dy.shape if need_dz else (0,)),
            dy.new_empty(dy.shape if dropout_p > 0 else (0,)),
            dy.new_empty((n,) if need_dw else (0,), dtype=param_dtype),
            dy.new_empty((n,) if need_db else (0,), dtype=param_dtype))


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, eps, is_rms, store_z, backend, dropout_p, seed = inputs
    _, z, mean, rstd = output
    _save_for_backward(ctx, x, residual, weight, bias, is_rms, backend, z, mean, rstd,
                       dropout_p, seed)


def _op_backward(ctx, dy, dz_out, _dmean, _drstd):
    (z, weight, mean, rstd, is_rms, backend, need, need_dw, need_db, param_dtype, dropout_p,
     seed, need_dz) = _grad_plan(ctx, dy)
    if dz_out is not None and dz_out.numel() == 0:
        dz_out = None
    dz, dx, dw, db = torch.ops.fusedlm.norm_bwd(dy.contiguous(), z, weight, mean, rstd,
                                               None if dz_out is None else dz_out.contiguous(),
                                               is_rms, need_dw, need_db, param_dtype, backend,
                                               dropout_p, seed, need_dz)
    return _input_grads(need, dz, dx if dropout_p > 0 else dz, dw if need_dw else None,
                        db if need_db else None, 6)


norm_fwd_op.register_autograd(_op_backward, setup_context=_setup_context)


# ---------------------------------------------------------------------------------------------
# Public functional API.

def _validate(x, weight, bias, residual, eps):
    if not isinstance(x, Tensor):
        raise TypeError(f"x must be a torch.Tensor, got {type(x).__name__}")
    if not x.is_floating_point():
        raise TypeError(f"x must be a floating-point tensor, got dtype {x.dtype}")
    if x.dim() == 0 or x.shape[-1] == 0:
        raise ValueError(f"x must have a non-empty last dimension to normalize, got shape {tuple(x.shape)}")
    n = x.shape[-1]
    for name, p in (("weight", weight), ("bias", bias)):
        if p is None:
            continue
        if not isinstance(p, Tensor):
            raise TypeError(f"{name} must be a torch.Tensor or None, got {type(p).__name__}")
        if p.shape != (n,):
            raise ValueError(f"{name} must have shape ({n},) to match x's last dimension, got {tuple(p.shape)}")
        if not p.is_floating_point():
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {p.dtype}")
        if p.device != x.device:
            raise ValueError(f"{name} is on {p.device} but x is on {x.device}")
    if weight is not None and bias is not None and weight.dtype != bias.dtype:
        raise TypeError(f"bias must have weight's dtype {weight.dtype}, got {bias.dtype}")
    if residual is not None:
        if not isinstance(residual, Tensor):
            raise TypeError(f"residual must be a torch.Tensor or None, got {type(residual).__name__}")
        if residual.shape != x.shape:
            raise ValueError(f"residual must have x's shape {tuple(x.shape)}, got {tuple(residual.shape)}")
        # Under autocast a sublayer's output (autocast dtype) meets a wider residual stream, as
        # in Hugging Face's BERT; _norm promotes both, as x + residual would.
        if dtype_differs(residual, x):
            raise TypeError(f"residual must have x's dtype {x.dtype}, got {residual.dtype} (mixed "
                            "dtypes are promoted under autocast only)")
        if residual.device != x.device:
            raise ValueError(f"residual is on {residual.device} but x is on {x.device}")
    if not isinstance(eps, (float, int)) or isinstance(eps, bool) or not eps >= 0:
        raise ValueError(f"eps must be a non-negative float, got {eps!r}")


def _norm(op_name, x, weight, bias, eps, residual, return_residual, backend, is_rms, dropout_p,
          seed):
    _validate(x, weight, bias, residual, eps)
    check_dropout(dropout_p, seed)
    if residual is not None and residual.dtype != x.dtype:  # under autocast (validated)
        wide = torch.promote_types(x.dtype, residual.dtype)
        x, residual = x.to(wide), residual.to(wide)
    n = x.shape[-1]
    pdtype = weight.dtype if weight is not None else (bias.dtype if bias is not None else None)
    dropout_p = float(dropout_p)
    chosen = dispatch.select(op_name, (x.device.type, x.dtype, n, pdtype, dropout_p > 0), backend)
    x2 = unit_stride(x.reshape(-1, n))
    r2 = None if residual is None else unit_stride(residual.reshape(-1, n))
    needs_grad = torch.is_grad_enabled() and any(
        t is not None and t.requires_grad for t in (x, weight, bias, residual))
    # The backward reads what was normalized: with a residual or dropout, that is not x, so it
    # is stored whenever a gradient may come.
    store_z = (residual is not None or dropout_p > 0) and (return_residual or needs_grad)
    seed = dropout_seed(dropout_p, seed, device=x.device)
    if torch.compiler.is_compiling():
        seed_t = seed if isinstance(seed, Tensor) else torch.tensor(seed, device=x.device)
        y, z, _, _ = torch.ops.fusedlm.norm_fwd(x2, r2, weight, bias, float(eps), is_rms, store_z,
                                                chosen, dropout_p, seed_t)
    elif not needs_grad:  # inference: the kernels alone (autograd's apply costs ~35 us a call)
        y, z, _, _ = _forward(chosen, x2, r2, weight, bias, float(eps), is_rms, store_z, dropout_p,
                              seed)
    else:
        y, z = _NormFunction.apply(x2, r2, weight, bias,
                                   (float(eps), is_rms, store_z, chosen, dropout_p, seed))
    # Reshape only when needed: a 2-D input gets the kernel's own tensors back, not views of
    # them (FSDP2 warns about view outputs of wrapped modules, as fusedlm's packed layers are).
    shaped = (lambda t: t) if x.dim() == 2 else (lambda t: t.view(x.shape))
    y = shaped(y)
    if not return_residual:
        return y
    return y, (x if z is None else shaped(z))


def layer_norm(x: Tensor, weight: Optional[Tensor] = None, bias: Optional[Tensor] = None,
               eps: float = 1e-5, *, residual: Optional[Tensor] = None, dropout_p: float = 0.0,
               seed: Optional[int] = None, return_residual: bool = False,
               backend: Optional[str] = None):
    """Layer norm of `dropout(x) + residual` over the last dimension, statistics in float32.

    Returns y, or (y, dropout(x) + residual) when `return_residual` (the new residual stream of
    a pre-LN block). `dropout_p` > 0 drops out x before the add (each kept element scaled by
    1 / (1 - p)), as BERT's "dropout, add & norm" does with a sublayer's output, in the same
    kernel; the backward redraws the keep-mask from the seed, so none is stored. Pass 0 when
    not training, as F.dropout's `training`. `seed` (an int) fixes the mask; None draws one from
    torch's default generator (torch.manual_seed reproduces a run). `backend` forces 'torch',
    'triton' or 'cuda' (raising if it cannot serve the call: the CUDA C++ kernel has no
    dropout); None lets dispatch choose (see `fusedlm.explain`). y has x's dtype.
    """
    return _norm("layer_norm", x, weight, bias, eps, residual, return_residual, backend, False,
                 dropout_p, seed)


def rms_norm(x: Tensor, weight: Optional[Tensor] = None, eps: Optional[float] = None, *,
             residual: Optional[Tensor] = None, dropout_p: float = 0.0,
             seed: Optional[int] = None, return_residual: bool = False,
             backend: Optional[str] = None):
    """RMSNorm of `dropout(x) + residual` over the last dimension; eps=None means
    torch.finfo(x.dtype).eps as in torch.nn.RMSNorm. Returns like `layer_norm`."""
    if eps is None:
        eps = torch.finfo(x.dtype).eps if isinstance(x, Tensor) and x.is_floating_point() else 1e-6
    return _norm("rms_norm", x, weight, None, eps, residual, return_residual, backend, True,
                 dropout_p, seed)
