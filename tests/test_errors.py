"""Errors every op shares: second derivatives refused by name, meta tensors, empty feature
dimensions, interpreter threads. Each op's own bad-input tests sit in its tests/test_<op>.py."""
import pytest
import torch

import fusedlm
from conftest import kernel_backends


def _second_derivative_cases(backend):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(3, 16, generator=g).requires_grad_()
    yield "layer_norm", x, lambda: fusedlm.layer_norm(x, torch.ones(16), torch.zeros(16), backend=backend)
    h = torch.randn(5, 8, generator=g).requires_grad_()
    w, labels = torch.randn(11, 8, generator=g), torch.randint(0, 11, (5,), generator=g)
    yield "lm_loss", h, lambda: fusedlm.lm_loss(h, w, labels, backend=backend)
    if fusedlm.ops.dispatch.why_not("mlp", backend, ("cpu", torch.float32)) is None:  # no cuda
        x2 = torch.randn(4, 8, generator=g).requires_grad_()
        w1, w2 = torch.randn(16, 8, generator=g), torch.randn(8, 16, generator=g)
        yield "mlp", x2, lambda: fusedlm.ops.mlp(x2, w1, None, w2, backend=backend)
    if backend != "torch":  # the torch backend's attention is plain autograd: twice is fine
        q = torch.randn(1, 6, 2, 32, generator=g).half().requires_grad_()  # a head dim every kernel has
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
    # The MLP on meta tensors: torch's GEMMs and activation give shapes, forward and backward.
    x = torch.randn(4, 8, device="meta", requires_grad=True)
    w1, w2 = torch.randn(16, 8, device="meta"), torch.randn(8, 16, device="meta")
    fusedlm.ops.mlp(x, w1, None, w2).sum().backward()
    assert x.grad.shape == x.shape and x.grad.device.type == "meta"


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
