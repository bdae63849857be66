"""Reference layer norm / RMSNorm over the last dimension, with optional residual add.

`layer_norm` / `rms_norm` are the oracle: plain differentiable math, run in float64 by the tests.
`norm_forward` / `norm_backward` are the same math split the way the fused kernels split it
(statistics saved by the forward, gradients written by hand) and serve as the `torch` backend.
"""
import torch


def _compute_dtype(dtype):
    return torch.float64 if dtype == torch.float64 else torch.float32


def rounded_sum(x, residual, dtype):
    """x + residual rounded to `dtype` (as the unfused sum in that dtype is), carried in x's
    wider dtype, with gradient 1 to both summands: the oracle's view of a fused residual add."""
    s = x + residual
    return s + (s.to(dtype).to(s.dtype) - s).detach()


def layer_norm(x, weight=None, bias=None, eps=1e-5, residual=None):
    """LayerNorm(x + residual) over the last dim; returns (y, x + residual)."""
    z = x if residual is None else x + residual
    zc = z.to(_compute_dtype(z.dtype))
    mean = zc.mean(-1, keepdim=True)
    var = ((zc - mean) ** 2).mean(-1, keepdim=True)
    y = (zc - mean) * torch.rsqrt(var + eps)
    if weight is not None:
        y = y * weight.to(zc.dtype)
    if bias is not None:
        y = y + bias.to(zc.dtype)
    return y.to(x.dtype), z


def rms_norm(x, weight=None, eps=1e-6, residual=None):
    """RMSNorm(x + residual) over the last dim; returns (y, x + residual)."""
    z = x if residual is None else x + residual
    zc = z.to(_compute_dtype(z.dtype))
    y = zc * torch.rsqrt((zc * zc).mean(-1, keepdim=True) + eps)
    if weight is not None:
        y = y * weight.to(zc.dtype)
    return y.to(x.dtype), z


def norm_forward(x, residual, weight, bias, eps, is_rms, store_z):
    """x, residual: (rows, N). Returns (y, z or None, mean or None, rstd) like the kernels."""
    z = x if residual is None else x + residual
    zc = z.to(_compute_dtype(z.dtype))
    mean = None if is_rms else zc.mean(-1)
    centered = zc if is_rms else zc - mean[:, None]
    rstd = torch.rsqrt((centered * centered).mean(-1) + eps)
    y = centered * rstd[:, None]
    if weight is not None:
        y = y * weight.to(zc.dtype)
    if bias is not None:
        y = y + bias.to(zc.dtype)
    stat = torch.float64 if zc.dtype == torch.float64 else torch.float32
    return (y.to(x.dtype), z if store_z else None,
            None if mean is None else mean.to(stat), rstd.to(stat))


def norm_backward(dy, z, weight, mean, rstd, dz_extra, is_rms, need_dweight, need_dbias):
    """Gradients of norm_forward. Returns (dz, dweight or None, dbias or None)."""
    ct = _compute_dtype(dy.dtype)
    dyc, zc = dy.to(ct), z.to(ct)
    xhat = zc * rstd.to(ct)[:, None] if is_rms else (zc - mean.to(ct)[:, None]) * rstd.to(ct)[:, None]
    wdy = dyc * weight.to(ct) if weight is not None else dyc
    n = dy.shape[-1]
    c1 = (xhat * wdy).sum(-1, keepdim=True) / n
    if is_rms:
        dz = (wdy - xhat * c1) * rstd.to(ct)[:, None]
    else:
        c2 = wdy.sum(-1, keepdim=True) / n
        dz = (wdy - (xhat * c1 + c2)) * rstd.to(ct)[:, None]
    if dz_extra is not None:
        dz = dz + dz_extra.to(ct)
    # Parameter gradients stay in the compute dtype; the caller casts them to the parameters'.
    dweight = (dyc * xhat).sum(0) if need_dweight else None
    dbias = dyc.sum(0) if need_dbias else None
    return dz.to(dy.dtype), dweight, dbias
