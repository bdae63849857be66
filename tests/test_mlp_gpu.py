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


# bf16 (what the models train in) with every activation; fp16 and fp32 with BERT's: each
# (dtype, activation) is a compile, and the scoreboard's GPU suite has two minutes in all.
@pytest.mark.parametrize("dtype,activation", [(torch.bfloat16, a) for a in ACTIVATIONS]
                         + [(torch.float16, "gelu"), (torch.float32, "gelu")],
                         ids=lambda v: str(v).replace("torch.", ""))
@pytest.mark.parametrize("shape", [(4096, 768, 3072), (1000, 1024, 4097), (3, 64, 256)],
                         ids=lambda s: "x".join(map(str, s)))
def test_mlp_gpu(dtype, activation, shape):
    check("triton", dtype, *shape, activation)


@pytest.mark.parametrize("activation,bias", [("silu", False), ("gelu_tanh", True)],
                         ids=["swiglu", "geglu-bias"])
def test_gated_mlp_gpu(activation, bias):
    """Llama's SwiGLU (no biases) and a GeGLU with biases, bf16, a Llama-style layer's widths at
    4096 rows."""
    check("triton", torch.bfloat16, 4096, 1024, 2816, activation, gated=True, bias1=bias,
          bias2=bias, gate_bias=bias)


@pytest.mark.skipif(not HAS_GPU, reason="needs a CUDA GPU")
def test_mlp_bias_gradient_is_deterministic():
    inputs, dy = make(4096, 768, 3072, torch.bfloat16)
    grads = [torch.autograd.grad(fusedlm.ops.mlp(*inputs, backend="triton"), inputs[2], dy)[0]
             for _ in range(2)]
    assert torch.equal(*grads)
