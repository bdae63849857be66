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
    if info.get("cuda_mode") in ("OFF", "EMU"):
        pytest.skip(f"built with FUSEDLM_CUDA={info['cuda_mode']}")
    assert info["cuda"], "nvcc is on PATH but fusedlm._C was built without CUDA"
    archs = info["cuda_archs"].split(",")
    if info.get("cuda_mode") == "AUTO":  # a default build (FUSEDLM_CUDA_ARCHS may narrow others)
        assert "80" in archs and "90a" in archs, archs
    if torch.cuda.is_available():  # machine code that runs on the GPU this process sees
        major, minor = torch.cuda.get_device_capability()
        built = [int(a.rstrip("a")) for a in archs]
        assert any(a // 10 == major and a % 10 <= minor for a in built), (archs, major, minor)
    assert fusedlm.cuda_unavailable_reason() is None


def test_no_driver_is_said_plainly():
    """A CUDA build on a machine with no NVIDIA driver (as CI) says so, not the runtime's
    "driver version is insufficient", which sends a user hunting for a driver upgrade."""
    info = fusedlm.build_info()
    if not info["cuda"] or HAS_GPU:
        pytest.skip("needs a CUDA build on a machine without a GPU")
    assert info["gpu_status"] in ("no GPU available: no NVIDIA driver found",
                                  "no GPU available: no CUDA GPU found"), info["gpu_status"]


def test_cuda_reason_is_stated_when_unavailable():
    why = fusedlm.cuda_unavailable_reason()
    info = fusedlm.build_info()
    if info["cuda"] or info.get("emulated"):  # the emulated kernels run (on CPU tensors)
        assert why is None
    else:  # a core built without CUDA says so, naming the build option
        assert "fusedlm._C was built without CUDA" in why and "FUSEDLM_CUDA" in why, why


def test_dlpack_capsule_borrows_without_copy():
    """The capsule points at the tensor's own memory (with its shape and strides): the core
    writes through it into the tensor."""
    import ctypes
    t = torch.arange(12, dtype=torch.float32).view(3, 4)[:, 1:]  # a strided view
    capsule = _core.dl(t)  # alive while its struct is read
    managed = _ManagedTensor.from_address(_capsule_pointer(capsule))
    dl = managed.dl_tensor
    assert dl.data + dl.byte_offset == t.data_ptr()
    assert [dl.shape[i] for i in range(dl.ndim)] == [3, 3]
    assert [dl.strides[i] for i in range(dl.ndim)] == [4, 1]
    ctypes.c_float.from_address(t.data_ptr()).value = -1.0  # the same memory, no copy
    assert float(t[0, 0]) == -1.0
    assert _core.dl(None) is None


# Forged DLPack capsules: what a buggy producer could hand the core. -----------------------------
import ctypes  # noqa: E402


class _Device(ctypes.Structure):
    _fields_ = [("device_type", ctypes.c_int32), ("device_id", ctypes.c_int32)]


class _DataType(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint8), ("bits", ctypes.c_uint8), ("lanes", ctypes.c_uint16)]


class _Tensor(ctypes.Structure):
    _fields_ = [("data", ctypes.c_void_p), ("device", _Device), ("ndim", ctypes.c_int32),
                ("dtype", _DataType), ("shape", ctypes.POINTER(ctypes.c_int64)),
                ("strides", ctypes.POINTER(ctypes.c_int64)), ("byte_offset", ctypes.c_uint64)]


class _ManagedTensor(ctypes.Structure):
    _fields_ = [("dl_tensor", _Tensor), ("manager_ctx", ctypes.c_void_p),
                ("deleter", ctypes.c_void_p)]


def _capsule_pointer(capsule):
    get = ctypes.pythonapi.PyCapsule_GetPointer
    get.restype, get.argtypes = ctypes.c_void_p, [ctypes.py_object, ctypes.c_char_p]
    return get(capsule, b"dltensor")


def _forged(buffer, shape, strides, device_type=2):
    """A "dltensor" capsule over `buffer` (a CPU tensor kept alive by the caller) claiming
    `shape` and `strides` (None: a NULL pointer) on `device_type` (2 = CUDA)."""
    keep = []
    arr = lambda xs: None if xs is None else keep.append((ctypes.c_int64 * len(xs))(*xs)) or keep[-1]
    m = _ManagedTensor()
    m.dl_tensor.data = buffer.data_ptr()
    m.dl_tensor.device = _Device(device_type, 0)
    m.dl_tensor.ndim = 2
    m.dl_tensor.dtype = _DataType(2, 32, 1)  # float32
    m.dl_tensor.shape = ctypes.cast(arr(shape), ctypes.POINTER(ctypes.c_int64))
    m.dl_tensor.strides = ctypes.cast(arr(strides), ctypes.POINTER(ctypes.c_int64))
    keep.append(m)
    new = ctypes.pythonapi.PyCapsule_New
    new.restype, new.argtypes = ctypes.py_object, [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
    return new(ctypes.addressof(m), b"dltensor", None), keep


_MALFORMED = {
    "no shape": (None, None, "x is a malformed DLPack tensor: 2 dimensions but no shape"),
    "negative extent": ([-4, 16], None, "x has a negative extent -4"),
    "negative stride": ([4, 16], [-16, 1], "x has a negative stride -16"),
    "huge row stride": ([4, 16], [2 ** 62, 1], "x spans more than 2\\^48"),
    "overflowing span": ([2 ** 40, 2 ** 40], None, "x spans more than 2\\^48"),
}


@pytest.mark.skipif(_core._C is None, reason="fusedlm._C is not built")
@pytest.mark.parametrize("case", list(_MALFORMED))
@pytest.mark.parametrize("op", ["norm_fwd", "attn_fwd", "lm_ce_rows"])
def test_core_rejects_malformed_views_before_any_launch(case, op):
    """Every op's core entry refuses a view it could not index safely, naming the argument,
    before its device checks (the capsule claims a CUDA tensor; nothing may run)."""
    shape, strides, match = _MALFORMED[case]
    match = {"norm_fwd": "x", "attn_fwd": "q", "lm_ce_rows": "logits"}[op] + match[1:]
    buffer = torch.zeros(64)
    x, keep = _forged(buffer, shape, strides)
    d = _core.dl
    with pytest.raises(ValueError, match=match):
        if op == "norm_fwd":
            _core._C.norm_fwd(x, None, None, None, d(torch.empty(4, 16)), None, d(torch.empty(4)),
                              d(torch.empty(4)), 1e-5, False, 0)
        elif op == "attn_fwd":
            _core._C.attn_fwd(x, x, x, None, None, None, 4, 4, False, 1.0, 0.0, 0,
                              d(torch.empty(4, 16)), d(torch.empty(4)), 0, False)
        else:
            _core._C.lm_ce_rows(x, d(torch.zeros(4, dtype=torch.int64)), *(d(torch.empty(4)) for _ in range(3)),
                                None, 1.0, 0.0, 0.0, False, 0)


def test_import_loads_neither_triton_nor_dynamo():
    """A program may choose TRITON_INTERPRET after `import fusedlm` (the `fusedlm` command does):
    triton must not be loaded before that, directly or through torch._dynamo. Nor transformers
    (seconds to import): fusedlm registers its attention there only once it is imported."""
    import subprocess
    import sys
    code = ("import sys, fusedlm; print(sorted(m for m in ('triton', 'torch._dynamo', "
            "'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.strip() == "[]", (out.stdout, out.stderr[-2000:])


@pytest.mark.gpu
def test_stream_of_is_the_current_stream_of_the_tensors_device():
    """The core launches on the handle stream_of gives: it must be torch's current stream on the
    tensor's device, a side stream included (a wrong one races with torch's own kernels)."""
    x = torch.empty(1, device="cuda")
    assert _core.stream_of(x) == torch.cuda.current_stream(x.device).cuda_stream
    side = torch.cuda.Stream(x.device)
    with torch.cuda.stream(side):
        assert _core.stream_of(x) == side.cuda_stream != torch.cuda.default_stream(x.device).cuda_stream
