"""Backend choice: per call (strict), per process (preference with fallback), automatic."""
import pytest
import torch

import fusedlm
from conftest import DEVICE, HAS_GPU, kernel_backends


def test_auto_on_cpu_is_reference_and_says_why_not_the_others():
    x = torch.randn(3, 8)
    fusedlm.layer_norm(x)
    d = fusedlm.explain("layer_norm")
    assert (d.backend, d.source) == ("torch", "auto")
    skipped = dict(d.skipped)
    assert set(skipped) == {"triton", "cuda"} and all(skipped.values())
    assert "ran on 'torch'" in str(d)


@pytest.mark.skipif("triton" not in kernel_backends(), reason="triton cannot run here")
def test_per_call_backend_is_used_and_recorded():
    fusedlm.layer_norm(torch.randn(3, 8, device=DEVICE), backend="triton")
    d = fusedlm.explain("layer_norm")
    assert (d.backend, d.source) == ("triton", "argument")


def test_per_call_backend_that_cannot_serve_raises_naming_backend():
    x = torch.randn(3, 8)  # CPU: the CUDA C++ kernel cannot serve it
    with pytest.raises(ValueError, match=r"backend='cuda'"):
        fusedlm.layer_norm(x, backend="cuda")


def test_unknown_backend_name_raises():
    with pytest.raises(ValueError, match="backend must be one of"):
        fusedlm.layer_norm(torch.randn(2, 4), backend="apex")


def test_env_preference_falls_back_and_records_why(monkeypatch):
    monkeypatch.setenv("FUSEDLM_BACKEND", "cuda")
    y = fusedlm.layer_norm(torch.randn(3, 8))
    d = fusedlm.explain("layer_norm")
    assert d.backend == "torch" and d.source == "auto"
    assert d.skipped[0][0] == "cuda" and "CUDA" in d.skipped[0][1]
    assert y.shape == (3, 8)


def test_env_preference_is_used_when_it_can_serve(monkeypatch):
    monkeypatch.setenv("FUSEDLM_BACKEND", "torch")
    fusedlm.rms_norm(torch.randn(3, 8, device=DEVICE))
    assert fusedlm.explain("rms_norm").source == "FUSEDLM_BACKEND"


def test_bad_env_value_raises(monkeypatch):
    monkeypatch.setenv("FUSEDLM_BACKEND", "fast")
    with pytest.raises(ValueError, match="FUSEDLM_BACKEND must be one of"):
        fusedlm.layer_norm(torch.randn(2, 4))


def test_explain_lists_every_op_and_rejects_unknown_names():
    fusedlm.layer_norm(torch.randn(2, 4))
    assert "layer_norm" in fusedlm.explain()
    with pytest.raises(ValueError, match="op_name"):
        fusedlm.explain("softmax")


@pytest.mark.skipif("triton" not in kernel_backends(), reason="triton cannot run here")
def test_forced_triton_past_its_width_raises_with_reason():
    with pytest.raises(ValueError, match="exceeds"):
        fusedlm.layer_norm(torch.randn(1, 70000, device=DEVICE), backend="triton")


@pytest.mark.skipif("triton" not in kernel_backends() or HAS_GPU, reason="interpreter only")
def test_bf16_under_interpreter_is_refused_not_wrong():
    with pytest.raises(ValueError, match="bfloat16"):
        fusedlm.layer_norm(torch.randn(2, 8, dtype=torch.bfloat16), backend="triton")


def test_each_op_records_its_own_typed_case():
    fusedlm.layer_norm(torch.randn(3, 8), torch.ones(8))
    case = fusedlm.explain("layer_norm").case
    assert case == ("cpu", torch.float32, 8, torch.float32) and case.columns == 8
    q = torch.randn(1, 4, 2, 16)
    fusedlm.attention(q, q, q, dropout_p=0.1)
    case = fusedlm.explain("attention").case
    assert case == ("cpu", torch.float32, 16, False, False, False) and case.head_dim == 16
    # (dropout is no limit of any backend: not in the case)
    fusedlm.attention(q, q, q, window_size=(2, 0), softcap=5.0)
    assert fusedlm.explain("attention").case[3:] == (True, True, False)
    fusedlm.attention(q, q, q, alibi_slopes=torch.ones(2))
    assert fusedlm.explain("attention").case.alibi
    fusedlm.lm_loss(torch.randn(4, 8), torch.randn(11, 8), torch.tensor([1, -100, 3, 4]))
    assert fusedlm.explain("lm_loss").case._fields == ("device_type", "dtype")


def test_registering_an_op_without_the_reference_last_is_refused():
    from fusedlm.ops import dispatch
    with pytest.raises(ValueError, match="end with 'torch'"):
        dispatch.register(dispatch.OpBackends("toy", tuple, {"torch": lambda case: None},
                                              cuda_order=("triton",), gpu_verified=("torch",)))
    assert "toy" not in dispatch._OPS


@pytest.mark.parametrize("old, new", [
    ("fusedlm.ops.normalization", "fusedlm.ops.layer_norm"),
    ("fusedlm.ops.loss", "fusedlm.ops.lm_loss"),
    ("fusedlm.ops.fused_attention", "fusedlm.ops.attention"),
    ("fusedlm.nn.normalization", "fusedlm.nn.layer_norm"),
])
def test_renamed_modules_keep_their_old_names_for_a_release(monkeypatch, old, new):
    import importlib
    import sys
    monkeypatch.delitem(sys.modules, old, raising=False)
    with pytest.warns(DeprecationWarning, match=new.replace(".", r"\.")):
        alias = importlib.import_module(old)
    module = importlib.import_module(new)
    public = [n for n in vars(module) if not n.startswith("__")]
    assert public and all(getattr(alias, n) is getattr(module, n) for n in public)
    with pytest.raises(AttributeError, match="no attribute"):
        alias.not_there
