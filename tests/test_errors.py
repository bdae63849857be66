"""Bad input raises an error naming the argument, from Python and from the compiled core."""
import pytest
import torch

import fusedlm
from fusedlm import _core
from conftest import kernel_backends


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


# Unclear errors, made clear. -------------------------------------------------------------------

def _second_derivative_cases(backend):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, generator=g).requires_grad_()
    yield "layer_norm", x, lambda: fusedlm.layer_norm(x, torch.ones(16), torch.zeros(16), backend=backend)
    h = torch.randn(5, 8, generator=g).requires_grad_()
    w, labels = torch.randn(11, 8, generator=g), torch.randint(0, 11, (5,), generator=g)
    yield "lm_loss", h, lambda: fusedlm.lm_loss(h, w, labels, backend=backend)
    if backend != "torch":  # the torch backend's attention is plain autograd: twice is fine
        q = torch.randn(1, 6, 2, 16, generator=g).half().requires_grad_()
        yield "attention", q, lambda: fusedlm.attention(q, q, q, backend=backend).float()


@pytest.mark.parametrize("backend", ["torch"] + kernel_backends())
def test_second_derivatives_are_refused_by_name(backend):
    """The fused backwards are not differentiable themselves: a second derivative through them
    would miss terms (mean and rstd are saved as constants), so it is an error saying so."""
    for name, x, call in _second_derivative_cases(backend):
        (g,) = torch.autograd.grad(call().sum(), x, create_graph=True)
        with pytest.raises(RuntimeError, match=f"fusedlm.{name} has no second derivative"):
            torch.autograd.grad(g.float().sum(), x)


def test_meta_tensors():
    q = torch.randn(1, 4, 2, 16, device="meta", dtype=torch.float16)
    assert fusedlm.attention(q, q, q).shape == q.shape  # shapes only: the reference runs on meta
    h, w = torch.randn(4, 8, device="meta"), torch.randn(10, 8, device="meta")
    with pytest.raises(ValueError, match="hidden is a meta tensor"):
        fusedlm.lm_loss(h, w, torch.zeros(4, dtype=torch.long, device="meta"))


def test_empty_feature_dimensions_name_the_argument():
    q = torch.randn(1, 4, 2, 0)
    with pytest.raises(ValueError, match="head_dim > 0"):
        fusedlm.attention(q, q, q)
    with pytest.raises(ValueError, match=r"hidden must have shape .* with H > 0"):
        fusedlm.lm_loss(torch.randn(4, 0), torch.randn(10, 0), torch.zeros(4, dtype=torch.long))


def test_chunk_size_must_be_a_true_int():
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        fusedlm.lm_loss(torch.randn(4, 8), torch.randn(10, 8), torch.zeros(4, dtype=torch.long),
                        chunk_size=True)


@pytest.mark.skipif("triton" not in kernel_backends() or torch.cuda.is_available(),
                    reason="the Triton interpreter runs where there is no GPU")
def test_threads_calling_the_interpreter_at_once():
    import threading
    errors = []

    def work(seed):
        try:
            x = torch.randn(16, 64, generator=torch.Generator().manual_seed(seed))
            for _ in range(3):
                y = fusedlm.layer_norm(x, backend="triton")
                assert (y - torch.nn.functional.layer_norm(x, (64,))).abs().max() < 1e-4
        except Exception as e:  # noqa: BLE001 (reported below, from the main thread)
            errors.append(repr(e))

    threads = [threading.Thread(target=work, args=(i,)) for i in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
