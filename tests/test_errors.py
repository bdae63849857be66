"""Bad input raises an error naming the argument, from Python and from the compiled core."""
import pytest
import torch

import fusedlm
from fusedlm import _core


@pytest.mark.parametrize("fn", [fusedlm.layer_norm, fusedlm.rms_norm])
def test_integer_input(fn):
    with pytest.raises(TypeError, match="x must be a floating-point tensor"):
        fn(torch.ones(2, 4, dtype=torch.int64))


def test_not_a_tensor():
    with pytest.raises(TypeError, match="x must be a torch.Tensor"):
        fusedlm.layer_norm([[1.0, 2.0]])


def test_weight_shape_mismatch():
    with pytest.raises(ValueError, match=r"weight must have shape \(8,\)"):
        fusedlm.layer_norm(torch.randn(2, 8), torch.randn(7))


def test_bias_shape_mismatch():
    with pytest.raises(ValueError, match=r"bias must have shape \(8,\)"):
        fusedlm.layer_norm(torch.randn(2, 8), torch.randn(8), torch.randn(2, 8))


def test_weight_bias_dtypes_differ():
    with pytest.raises(TypeError, match="bias must have weight's dtype"):
        fusedlm.layer_norm(torch.randn(2, 8), torch.randn(8), torch.randn(8, dtype=torch.float64))


def test_tensors_on_different_devices():
    with pytest.raises(ValueError, match="weight is on meta"):
        fusedlm.layer_norm(torch.randn(2, 8), torch.randn(8, device="meta"))
    with pytest.raises(ValueError, match="residual is on meta"):
        fusedlm.layer_norm(torch.randn(2, 8), residual=torch.randn(2, 8, device="meta"))


def test_residual_mismatch():
    with pytest.raises(ValueError, match="residual must have x's shape"):
        fusedlm.layer_norm(torch.randn(2, 8), residual=torch.randn(8))
    with pytest.raises(TypeError, match="residual must have x's dtype"):
        fusedlm.layer_norm(torch.randn(2, 8), residual=torch.randn(2, 8).half())


@pytest.mark.parametrize("eps", [-1.0, float("nan"), "1e-5"])
def test_bad_eps(eps):
    with pytest.raises(ValueError, match="eps must be a non-negative float"):
        fusedlm.layer_norm(torch.randn(2, 8), eps=eps)


def test_empty_last_dimension():
    with pytest.raises(ValueError, match="non-empty last dimension"):
        fusedlm.layer_norm(torch.randn(2, 0))


# The compiled core validates again, naming its argument, before touching any device memory.
needs_core = pytest.mark.skipif(_core._C is None, reason="fusedlm._C is not built")


def _fwd_args(**override):
    x = torch.randn(4, 16)
    args = dict(x=x, residual=None, weight=torch.randn(16), bias=torch.randn(16),
                y=torch.empty(4, 16), z=None, mean=torch.empty(4), rstd=torch.empty(4))
    args.update(override)
    return {k: _core.dl(v) if isinstance(v, torch.Tensor) else v for k, v in args.items()}


@needs_core
@pytest.mark.parametrize("override, error, match", [
    (dict(weight=torch.randn(16, dtype=torch.float64)), TypeError, "weight must be float32"),
    (dict(weight=torch.randn(15)), ValueError, r"weight must have shape \(16,\)"),
    (dict(y=torch.empty(4, 16, dtype=torch.float16)), TypeError, "y must be float32"),
    (dict(rstd=torch.empty(3)), ValueError, r"rstd must have shape \(4,\)"),
    (dict(x=torch.ones(4, 16, dtype=torch.int32)), TypeError, "x must be float32, float16 or bfloat16"),
    (dict(x=torch.randn(16, 4).t()), ValueError, "x must have unit stride"),
    (dict(mean=None), ValueError, "mean is required"),
    ({}, ValueError, "x must be a CUDA tensor"),
])
def test_core_forward_validation(override, error, match):
    with pytest.raises(error, match=match):
        _core._C.norm_fwd(**_fwd_args(**override), eps=1e-5, rms=False, stream=0)


@needs_core
def test_core_rejects_a_non_capsule():
    args = _fwd_args()
    args["x"] = torch.randn(4, 16)
    with pytest.raises(TypeError, match="x must be an unconsumed DLPack capsule"):
        _core._C.norm_fwd(**args, eps=1e-5, rms=False, stream=0)
