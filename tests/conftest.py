import os

import pytest
import torch

HAS_GPU = torch.cuda.is_available()
# Without a GPU the Triton kernels run under the interpreter on CPU tensors. The variable must
# be set before triton decorates fusedlm's kernels, i.e. before fusedlm is imported.
if not HAS_GPU:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fusedlm  # noqa: E402
from fusedlm.ops import dispatch  # noqa: E402

DEVICE = "cuda" if HAS_GPU else "cpu"


def kernel_backends():
    """Fused backends that can run in this process (the reference is always there)."""
    out = []
    if dispatch.why_not("layer_norm", "triton", (DEVICE, torch.float32, 64, None)) is None:
        out.append("triton")
    if dispatch.why_not("layer_norm", "cuda", (DEVICE, torch.float32, 64, None)) is None:
        out.append("cuda")
    return out


def pytest_collection_modifyitems(config, items):
    if HAS_GPU:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _fresh_dispatch(monkeypatch):
    monkeypatch.delenv("FUSEDLM_BACKEND", raising=False)
    dispatch.clear_cache()
    yield


def rel_err(out, ref):
    """||out - ref|| / ||ref|| in float64; NaN anywhere in out never passes."""
    out64, ref64 = out.detach().double(), ref.detach().double()
    assert not torch.isnan(out64).any(), "NaN in output"
    denom = ref64.norm().item()
    diff = (out64 - ref64).norm().item()
    return diff / denom if denom > 0 else diff


# Relative norm error against a float64 reference: the table `fusedlm check` uses too.
TOL = fusedlm.reference.TOLERANCE


def tma_launches(monkeypatch):
    """Turns the Triton attention kernels' opt-in TMA path on (FUSEDLM_TRITON_TMA) for a test;
    returns the list that collects (kernel, took the path) for each launch of the three kernels."""
    from fusedlm.ops import _triton
    kern = _triton.kernels("attention")
    monkeypatch.setattr(kern, "TMA", True)
    seen, launch = [], kern._launch

    def spy(name, kernel, rows, grid_y, pinned, head_dim, bucket, args, flags, *rest, **kw):
        seen.append((name, flags["TMA"]))
        return launch(name, kernel, rows, grid_y, pinned, head_dim, bucket, args, flags, *rest, **kw)
    monkeypatch.setattr(kern, "_launch", spy)
    return seen
