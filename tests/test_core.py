"""The compiled core imports without a GPU, reports how it was built, and has CUDA where nvcc was."""
import shutil

import pytest
import torch

import fusedlm
from fusedlm import _core
from conftest import HAS_GPU


def test_core_imports_and_reports_gpus_without_failing():
    info = fusedlm.build_info()
    assert info["compiled_core"], info
    assert isinstance(info["gpus"], int) and isinstance(info["gpu_status"], str)
    if not HAS_GPU:
        assert info["gpus"] == 0 and "no GPU" in info["gpu_status"] or not info["cuda"]


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="no nvcc on this machine")
def test_cuda_sources_were_compiled_where_nvcc_is_present():
    """CI has nvcc: the build must have compiled the CUDA kernels for the default archs."""
    info = fusedlm.build_info()
    if info.get("cuda_mode") == "OFF":
        pytest.skip("built with FUSEDLM_CUDA=OFF")
    assert info["cuda"], "nvcc is on PATH but fusedlm._C was built without CUDA"
    archs = info["cuda_archs"].split(",")
    if info.get("cuda_mode") == "AUTO":  # a default build (FUSEDLM_CUDA_ARCHS may narrow others)
        assert "80" in archs and "90a" in archs, archs
    if torch.cuda.is_available():  # machine code that runs on the GPU this process sees
        major, minor = torch.cuda.get_device_capability()
        built = [int(a.rstrip("a")) for a in archs]
        assert any(a // 10 == major and a % 10 <= minor for a in built), (archs, major, minor)
    assert fusedlm.cuda_unavailable_reason() is None


def test_cuda_reason_is_stated_when_unavailable():
    why = fusedlm.cuda_unavailable_reason()
    assert why is None or "fusedlm._C" in why


def test_dlpack_capsule_borrows_without_copy():
    t = torch.arange(6, dtype=torch.float32)
    cap = _core.dl(t)
    assert type(cap).__name__ == "PyCapsule"
    assert _core.dl(None) is None
