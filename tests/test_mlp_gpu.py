"""fusedlm.ops.mlp GPU suite: the Triton backward at model sizes in every dtype, bf16 included,
against float64 and within twice torch's own error (the evidence its dispatch needs before a
GPU call may choose it: see ops/mlp.py)."""
import pytest
import torch

import fusedlm
from fusedlm import reference
from fusedlm.reference.mlp import ACTIVATIONS
from conftest import HAS_GPU
from test_mlp import check, make

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("shape", [(4096, 768, 3072), (1000, 1024, 4097), (3, 64, 256)],
                         ids=lambda s: "x".join(map(str, s)))
def test_mlp_gpu(dtype, activation, shape):
    check("triton", dtype, *shape, activation)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_mlp_bias_gradient_is_deterministic():
    inputs, dy = make(4096, 768, 3072, torch.bfloat16)
    grads = [torch.autograd.grad(fusedlm.ops.mlp(*inputs, backend="triton"), inputs[2], dy)[0]
             for _ in range(2)]
    assert torch.equal(*grads)
