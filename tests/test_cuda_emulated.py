"""The CUDA C++ kernels on the CPU emulator (csrc/emu): their logic against the float64
references, with no GPU. Skipped unless fusedlm._C was built for it:

    FUSEDLM_CUDA=EMU pip install --no-build-isolation -e .   (CI: the last step of .ci/run)

Every test runs in each of the emulator's three modes (MODES below): both scheduling orders
(FUSEDLM_EMU_ORDER), in which a thread that reads what another wrote without a barrier between
them reads too early in one of the two, and copies landing at issue (FUSEDLM_EMU_COPIES), in
which a prefetch with no barrier before it overwrites a tile another warp still reads. (The two
shape matrices run each case in one mode, a third of the cases in each: every kernel path is in
each third, at a third of the time in CI's sanitized run.) The other CPU suites run the emulated kernels as well, wherever they name the 'cuda' backend (layer
norm and the LM-loss row kernel at every shape they test); this file adds what they leave out,
the attention kernels' cases: every head dim, grouped heads, packed sequences, key masks,
dropout; and the Hopper kernels (wgmma, TMA, mbarriers) on an emulated compute capability 9.0
device (the `kernels` fixture). The bounds are the GPU suite's: 2x PyTorch's own error in the same precision.

Aligned operands take the kernels' 16-byte cp.async tile loads, unaligned views the scalar
ones. What the emulator cannot check is
in csrc/emu/emu.h: speed, registers, memory ordering finer than its barriers, a misreading of
PTX's layouts shared by a kernel and the emulator. Accesses outside
a tensor's memory it reports when built with FUSEDLM_EMU_SANITIZE=address (CI's build; the
last test checks that)."""
import math

import pytest
import torch

import fusedlm
from fusedlm import _core, reference
from fusedlm.ops import attention_kernels
from conftest import (EMULATED, TOL, check_cuda_drops_as_triton, check_unaligned_views_match, emulated_cuda_kernels,
                      rel_err, sdpa)

pytestmark = pytest.mark.skipif(not EMULATED, reason="needs fusedlm._C built for the CPU emulator (FUSEDLM_CUDA=EMU)")


# The emulator's modes: the two scheduling orders with copies landing at their waits (a read
# that lacks a barrier or a wait), and copies landing at issue (a prefetch that lacks the
# barrier before it overwrites a tile another warp still reads).
MODES = {"forward": ("forward", "at-wait"), "reverse": ("reverse", "at-wait"), "copies-at-issue": ("forward", "at-issue")}


@pytest.fixture(params=list(MODES), autouse=True)
def order(request, monkeypatch):
    """Every mode, except for a shape matrix's case (marked `one_mode`) and a test's run on the
    Hopper kernels (the `kernels` fixture's "wgmma": 384-thread blocks, the slowest to emulate):
    one, chosen from its parameters so that a third of them runs in each."""
    params = getattr(request.node, "callspec", None)
    wgmma = params is not None and params.params.get("kernels") == "wgmma"
    if request.node.get_closest_marker("one_mode") is not None or wgmma:
        import zlib
        case = request.node.callspec.id.replace(request.param + "-", "", 1)  # the id without the mode
        chosen = list(MODES)[zlib.crc32(case.encode()) % len(MODES)]
        if chosen != request.param:
            pytest.skip(f"this case runs in the {chosen} mode (a third of the matrix runs in each)")
    order, copies = MODES[request.param]
    monkeypatch.setenv("FUSEDLM_EMU_ORDER", order)
    monkeypatch.setenv("FUSEDLM_EMU_COPIES", copies)
    return request.param


@pytest.fixture(params=["mma", "wgmma"])
def kernels(request):
    """The attention kernels a test runs: the mma.sync ones on the emulator's default device
    (compute capability 8.0), or the Hopper ones (wgmma, TMA, mbarriers) on an emulated 9.0
    device. Checks after the test that those kernels ran, forward and backward."""
    with emulated_cuda_kernels(request.param):
        yield request.param


def _qkv(b, s, h, hk, d, dtype, sk=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    mk = lambda *shape: torch.randn(*shape, generator=g).to(dtype).requires_grad_()
    return mk(b, s, h, d), mk(b, sk or s, hk, d), mk(b, sk or s, hk, d)


def _check(out, grads, q, k, v, do, causal, mask=None):
    f64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = reference.attention(*f64, causal=causal, key_mask=mask)
    want = torch.autograd.grad(ref, f64, do.double())
    theirs = sdpa(q, k, v, causal, mask)
    theirs_g = torch.autograd.grad(theirs, (q, k, v), do)
    dtype = q.dtype
    assert rel_err(out, ref) < max(TOL[dtype], 2 * rel_err(theirs, ref))
    for name, a, r, t in zip("qkv", grads, want, theirs_g):
        assert rel_err(a, r) < max(TOL[dtype], 2 * rel_err(t, r)), name


@pytest.mark.one_mode
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("d", [32, 64, 96, 128])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("s,sk,h,hk", [(130, 130, 2, 2), (70, 150, 4, 2)])
def test_attention_emulated(dtype, d, causal, s, sk, h, hk):
    """Forward and backward at every head dim the kernels are built for; blocks cut by the
    sequence ends, queries fewer and more than keys, grouped query heads."""
    q, k, v = _qkv(2, s, h, hk, d, dtype, sk)
    out = fusedlm.attention(q, k, v, causal=causal, backend="cuda")
    do = torch.randn_like(out)
    _check(out, torch.autograd.grad(out, (q, k, v), do), q, k, v, do, causal)


@pytest.mark.parametrize("d,dtype", [(64, torch.bfloat16), (128, torch.float16)], ids=str)
@pytest.mark.parametrize("s,sk,h,hk,causal", [(130, 130, 2, 2, False), (70, 300, 4, 2, False), (70, 300, 4, 2, True),
                                               (300, 70, 2, 1, True)])
@pytest.mark.parametrize("kernels", ["wgmma"], indirect=True)
def test_attention_wgmma_emulated(kernels, d, dtype, s, sk, h, hk, causal):
    """The Hopper kernels (attention_hopper.cu) at both head dims they are built for: blocks cut by
    the sequence ends, more streamed blocks than ring stages in each of the three kernels (300
    keys: 3 forward blocks of 128, 5 dQ blocks of 64; 4 dK/dV steps over grouped heads), queries
    fewer and more than keys (causal rows that see no key). The other two pairs of head dim and
    dtype run in the packed and masked test below."""
    q, k, v = _qkv(2, s, h, hk, d, dtype, sk)
    out = fusedlm.attention(q, k, v, causal=causal, backend="cuda")
    do = torch.randn_like(out)
    _check(out, torch.autograd.grad(out, (q, k, v), do), q, k, v, do, causal)


def test_wgmma_declines_and_says_why_emulated(monkeypatch):
    """Where the Hopper kernels cannot serve a call the mma.sync ones do, and say why: a device
    other than compute capability 9.0, a head dim they are not built for, unaligned operands."""
    from fusedlm.ops import attention_kernels as ak
    q, k, v = _qkv(1, 40, 2, 2, 64, torch.float16)
    with ak.using_cuda_kernels("wgmma"):
        fusedlm.attention(q, k, v, backend="cuda")
        assert ak.last_cuda_forward_kernel == "mma (wgmma declined: needs a compute capability 9.0 GPU (sm_90a), got 8.0)"
        monkeypatch.setenv("FUSEDLM_EMU_ARCH", "90")
        fusedlm.attention(*_qkv(1, 40, 2, 2, 96, torch.float16), backend="cuda")
        assert ak.last_cuda_forward_kernel == "mma (wgmma declined: head dim 96 (the wgmma kernels have 64 and 128))"
        flat = torch.randn(1 * 40 * 2 * 64 + 1).half()[1:].view(1, 40, 2, 64)  # 2-byte aligned
        fusedlm.attention(flat, k, v, backend="cuda")
        assert "16-byte aligned" in ak.last_cuda_forward_kernel
        fusedlm.attention(q, k, v, backend="cuda")
        assert ak.last_cuda_forward_kernel == "wgmma"


@pytest.mark.parametrize("causal", [False, True])
def test_packed_sequences_and_key_masks_emulated(kernels, causal):
    """attention_varlen on three packed sequences (one shorter than a block, one spanning three)
    against each sequence on its own; a padded batch's key mask against the reference."""
    lens = [5, 140, 64]
    q, k, v = _qkv(1, sum(lens), 4, 2, 64, torch.float16)
    q, k, v = (t.detach()[0].requires_grad_() for t in (q, k, v))
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    out = fusedlm.attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal=causal, backend="cuda")
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    for i, n in enumerate(lens):
        rows = slice(int(cu[i]), int(cu[i + 1]))
        one = [t.detach()[rows][None].requires_grad_() for t in (q, k, v)]
        _check(out[rows][None], [g[rows][None] for g in grads], *one, do[rows][None], causal)

    q, k, v = _qkv(3, 100, 2, 2, 128, torch.bfloat16, seed=1)
    mask = torch.ones(3, 100, dtype=torch.bool)  # padding at the end, as a tokenizer pads
    mask[1, 37:] = False
    mask[2, 90:] = False
    out = fusedlm.attention(q, k, v, attention_mask=mask, causal=causal, backend="cuda")
    do = torch.randn_like(out)
    _check(out, torch.autograd.grad(out, (q, k, v), do), q, k, v, do, causal, mask)


def test_rows_past_a_pack_are_never_read_emulated(kernels):
    """Key rows past the last sequence of a pack hold NaN: no result may see them (the wgmma
    kernels load whole blocks there and must zero what lies past a sequence's end), and their
    gradients are zero."""
    lens, spare, d = [5, 140, 64], 7, 64
    cu = torch.tensor([0] + lens).cumsum(0).to(torch.int32)
    total = sum(lens)
    g = torch.Generator().manual_seed(11)
    nan_tail = lambda n: torch.cat([torch.randn(total, n, d, generator=g), torch.full((spare, n, d), float("nan"))])
    q = torch.randn(total, 4, d, generator=g).half().requires_grad_()
    k, v = (nan_tail(2).half().requires_grad_() for _ in range(2))
    out = fusedlm.attention_varlen(q, k, v, cu, cu, max(lens), max(lens), causal=True, backend="cuda")
    do = torch.randn_like(out)
    dq, dk, dv = torch.autograd.grad(out, (q, k, v), do)
    assert not dk[total:].any() and not dv[total:].any()
    real = [t.detach()[:total].double().requires_grad_() for t in (q, k, v)]
    ref, _ = reference.attention_varlen(*real, cu, cu, causal=True)
    want = torch.autograd.grad(ref, real, do.double())
    for got, r in zip((out, dq, dk, dv), (ref, *want)):
        assert torch.isfinite(got[:total]).all() and rel_err(got[:total], r) < 2 * TOL[torch.float16]


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_unaligned_views_emulated(dtype):
    """The scalar tile loads (unaligned rows) against the cp.async ones (contiguous copies)."""
    check_unaligned_views_match("cuda", "cpu", dtype, seq=100)


def test_empty_rows_and_determinism_emulated(kernels):
    """A sequence whose keys are all masked gives zeros and finite gradients; two backward passes
    are bitwise equal (no atomics)."""
    q, k, v = _qkv(2, 80, 2, 2, 64, torch.float16)
    mask = torch.ones(2, 80, dtype=torch.bool)
    mask[1] = False
    out = fusedlm.attention(q, k, v, attention_mask=mask, backend="cuda")
    assert torch.all(out[1] == 0)
    do = torch.randn_like(out)
    first = torch.autograd.grad(out, (q, k, v), do, retain_graph=True)
    second = torch.autograd.grad(out, (q, k, v), do)
    assert all(torch.isfinite(g).all() and torch.equal(a, g) for a, g in zip(first, second))


@pytest.mark.parametrize("kernels,hk", [("mma", 4), ("mma", 2), ("wgmma", 2)], indirect=["kernels"])
def test_dropout_matches_triton_emulated(kernels, hk):
    """The CUDA kernels draw Triton's dropout stream: with the same seed both backends drop the
    same probabilities, forward and backward (Triton under its interpreter)."""
    if fusedlm.ops.dispatch.why_not("attention", "triton", ("cpu", torch.float16, 64)) is not None:
        pytest.skip("needs the Triton interpreter")
    check_cuda_drops_as_triton(*_qkv(2, 100, 4, hk, 64, torch.float16))


def test_wgmma_triage_script_runs_on_the_emulator(order):
    """The GPU session's triage of the Hopper kernels (benchmarks/attention_wgmma_smoke.py),
    rehearsed on the emulator's sm_90 device: its workers run the wgmma kernels and its checks
    pass them, the one-hot case included, whose dQ is ill-conditioned (bounded by twice SDPA's
    own error there, not by the fixed 2e-2 it failed on the emulator)."""
    import pathlib
    import subprocess
    import sys
    if order != "forward":
        pytest.skip("one mode is enough: the kernels' cases run in every mode above")
    script = pathlib.Path(__file__).resolve().parents[1] / "benchmarks" / "attention_wgmma_smoke.py"
    run = subprocess.run([sys.executable, str(script), "--emulated", "--match", "d64 s128 k=q", "--case-timeout", "300"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "cases: 1 of 1 passed" in run.stdout and "wgmma/wgmma" in run.stdout and "(bounds" in run.stdout
    # Its first cases, the primitives' probe, in their workers too.
    run = subprocess.run([sys.executable, str(script), "--emulated", "--match", "probe"],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "cases: 4 of 4 passed" in run.stdout and run.stdout.count("TMA swizzle exact") == 4


def test_emulator_refuses_cuda_tensors_and_says_so():
    assert _core._C.build_info()["emulated"] and not _core._C.build_info()["cuda"]
    why = fusedlm.ops.dispatch.why_not("attention", "cuda", ("cuda", torch.float16, 64))
    assert "emulates" in why and "CPU tensors" in why
    # Automatic dispatch never picks the emulator: off a CUDA device it runs the reference.
    q, k, v = _qkv(1, 8, 1, 1, 64, torch.float16)
    fusedlm.attention(q, k, v)
    assert fusedlm.explain("attention").backend == "torch"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("head_dim", [64, 128])
def test_wgmma_probe_emulated(head_dim, dtype, monkeypatch, order):
    """The Hopper primitives' probe (what a GPU's first run checks against the hardware) holds on
    the emulator: the swizzle placement its Python side derives from PTX's documentation, and
    every wgmma form the kernels use against float64."""
    monkeypatch.setenv("FUSEDLM_EMU_ARCH", "90")
    errors = attention_kernels.probe_wgmma(head_dim, dtype)
    assert errors.pop("tma_swizzle") == 0.0 and set(errors) == {"wgmma_ss", "wgmma_ss_n128", "wgmma_rs"}
    assert max(errors.values()) < 1e-5, errors


def test_wgmma_probe_refusals(monkeypatch):
    with pytest.raises(ValueError, match="head_dim must be 64 or 128 .*got 96"):
        attention_kernels.probe_wgmma(96)
    with pytest.raises(TypeError, match="dtype must be torch.float16 or torch.bfloat16, got torch.float32"):
        attention_kernels.probe_wgmma(64, torch.float32)
    q, k = torch.zeros(64, 1, 64, dtype=torch.bfloat16), torch.zeros(128, 1, 64, dtype=torch.bfloat16)
    s, sw, o = torch.empty(64, 64), torch.empty(64, 128), torch.empty(64, 64)
    d = _core.dl
    with pytest.raises(ValueError, match=r"needs a compute capability 9.0 GPU \(sm_90a\), got 8.0"):
        _core._C.attention_wgmma_probe(d(q), d(k), d(q), d(q.clone()), d(s), d(sw), d(o), 0)  # the default device
    monkeypatch.setenv("FUSEDLM_EMU_ARCH", "90")
    w = torch.zeros(64, 1, 96, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match=r"q must be a contiguous \(64, 1, D\) tensor with D 64 or 128, got \(64, 1, 96\)"):
        _core._C.attention_wgmma_probe(d(w), d(w), d(w), d(w.clone()), d(s), d(sw), d(torch.empty(64, 96)), 0)
    with pytest.raises(ValueError, match=r"k must be a contiguous \(128, 1, 64\) tensor of q's dtype, got \(64, 1, 64\)"):
        _core._C.attention_wgmma_probe(d(q), d(q.clone()), d(q), d(q.clone()), d(s), d(sw), d(o), 0)
    with pytest.raises(ValueError, match=r"o must be a contiguous \(64, 64\) float32 tensor, got \(64, 128\)"):
        _core._C.attention_wgmma_probe(d(q), d(k), d(q), d(q.clone()), d(s), d(sw), d(torch.empty(64, 128)), 0)
    with pytest.raises(ValueError, match="v must have q's shape .* and dtype bfloat16, got .* float16"):
        _core._C.attention_wgmma_probe(d(q), d(k), d(q.half()), d(q.clone()), d(s), d(sw), d(o), 0)


# The emulator itself, on kernels that are wrong on purpose (csrc/emu/selftest.cu): what it
# says it finds, it finds, in every mode.

def test_emulator_finds_a_missing_block_barrier():
    values = [float(i) for i in range(70)]  # three warps, the last one partial
    assert _core._C.emu_selftest_reverse(values, True) == values[::-1]
    raced = torch.tensor(_core._C.emu_selftest_reverse(values, False))
    assert torch.isnan(raced).any()  # read before written: the NaNs shared memory starts with


def test_emulator_fills_static_shared_memory_before_each_block():
    """A static __shared__ array read before any write in its block reads NaNs, as dynamic shared
    memory does: never the zeros it starts the process with, nor what an earlier block or launch
    left (each block writes into it after reading)."""
    assert all(math.isnan(x) for x in _core._C.emu_selftest_static_shared(3, True))
    assert all(math.isnan(x) for x in _core._C.emu_selftest_static_shared(2, False))


@pytest.mark.parametrize("bf16", [False, True])
@pytest.mark.parametrize("trans", [False, True], ids=["b-rows", "b-transposed"])
def test_emulator_mma_sync_multiplies_matrices(bf16, trans):
    """ldmatrix (both ways) and mma.sync, each lane holding what PTX's fragment layouts say, give
    the matrix product: integers, exact in both dtypes and in fp32 accumulation."""
    g = torch.Generator().manual_seed(3)
    a, b = (torch.randint(-8, 9, (16, 16), generator=g).float() for _ in range(2))
    d = torch.tensor(_core._C.emu_selftest_mma(a.flatten().tolist(), b.flatten().tolist(), bf16, trans, True))
    assert d.view(16, 16).equal(a @ b)


def test_emulator_finds_a_lane_reading_another_lanes_row_early():
    a = [float(i % 7) for i in range(256)]
    d = torch.tensor(_core._C.emu_selftest_mma(a, a, True, False, False))
    assert torch.isnan(d).any()  # an ldmatrix read rows before the lanes that write them did


def test_emulator_reports_a_matrix_instruction_without_its_whole_warp():
    with pytest.raises(RuntimeError, match=r"warp-collective matrix instruction at line \d+ ran with 31 of 32 lanes"):
        _core._C.emu_selftest_partial_warp()
    assert _core._C.emu_selftest_reverse([1.0, 2.0], True) == [2.0, 1.0]  # the process goes on


def test_emulator_reports_barriers_that_never_open():
    with pytest.raises(RuntimeError, match=r"deadlock in block \(0, 0, 0\): 32 thread\(s\) wait at "
                                           r"__syncthreads at line \d+; 32 thread\(s\) wait at a warp barrier"):
        _core._C.emu_selftest_divergent()
    # The process goes on: the next launch runs.
    assert _core._C.emu_selftest_reverse([1.0, 2.0], True) == [2.0, 1.0]


def test_emulator_refuses_too_much_shared_memory():
    """A kernel asking for more dynamic shared memory than its limit (48 KB unless raised) fails
    its launch as on a GPU, naming the launch."""
    with pytest.raises(RuntimeError, match="selftest reverse launch: invalid argument"):
        _core._C.emu_selftest_reverse([0.0] * 32, True, extra_smem=48 * 1024)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_emulated_half_conversions_match_torch(dtype):
    """The stand-in fp16/bf16 types convert as torch (and the GPU) do: every bit pattern to
    float exactly, and floats to the nearest, ties to even, at subnormals, halfway points,
    overflow, infinities and NaN."""
    bf16 = dtype == torch.bfloat16
    bits = torch.arange(65536, dtype=torch.int32).to(torch.int16).view(dtype)
    got = torch.tensor(_core._C.emu_selftest_from_half(list(range(65536)), bf16))
    want = bits.float()
    assert torch.equal(torch.isnan(got), torch.isnan(want))
    assert torch.equal(got[~torch.isnan(want)], want[~torch.isnan(want)])
    # Floats: every half value and the midpoints between neighbours (ties), nudged both ways,
    # plus random ones over the whole range.
    finite = want[torch.isfinite(want)].unique()
    mids = (finite[:-1].double() + finite[1:].double()) / 2
    nudged = torch.cat([mids, mids * (1 + 2 ** -20), mids * (1 - 2 ** -20)]).float()
    g = torch.Generator().manual_seed(0)
    rand = torch.randn(20000, generator=g) * torch.exp2(torch.randint(-30, 30, (20000,), generator=g).float())
    special = torch.tensor([0.0, -0.0, float("inf"), float("-inf"), 65504.0, 65519.9, 65520.0, 1e30, -1e-30,
                            2.0 ** -24, 2.0 ** -25, 3 * 2.0 ** -26])
    values = torch.cat([finite, nudged, rand, special])
    got = torch.tensor(_core._C.emu_selftest_to_half(values.tolist(), bf16), dtype=torch.int32).to(torch.int16)
    assert torch.equal(got, values.to(dtype).view(torch.int16))
    nan = _core._C.emu_selftest_to_half([float("nan")], bf16)
    assert torch.isnan(torch.tensor(nan, dtype=torch.int32).to(torch.int16).view(dtype)).all()


@pytest.mark.one_mode
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16], ids=str)
@pytest.mark.parametrize("n", [4097, 6001, 8192])
@pytest.mark.parametrize("aligned", [True, False], ids=["aligned", "unaligned"])
@pytest.mark.parametrize("rms", [False, True], ids=["layer", "rms"])
def test_wide_norm_rows_emulated(dtype, n, aligned, rms):
    """Rows past 4096 columns, up to the CUDA kernel's 8192: the backward re-reads dy, z and w in
    a second pass past 8 values a thread, which the CPU suites' widths never reach (only the GPU
    suite ran it). Unaligned storage takes one-value loads, 16 values a thread at 8192."""
    g = torch.Generator().manual_seed(n)
    rows, off = 3, 0 if aligned else 1
    x = (torch.randn(rows * n + off, generator=g) * 2 + 0.5).to(dtype)[off:].view(rows, n).requires_grad_()
    w = (1 + 0.5 * torch.randn(n, generator=g)).to(dtype).requires_grad_()
    b = None if rms else (0.5 * torch.randn(n, generator=g)).to(dtype).requires_grad_()
    dy = torch.randn(rows, n, generator=g).to(dtype)
    assert (x.data_ptr() % 16 == 0) == aligned
    y = fusedlm.rms_norm(x, w, 1e-6, backend="cuda") if rms else fusedlm.layer_norm(x, w, b, 1e-5, backend="cuda")
    leaves = [t for t in (x, w, b) if t is not None]
    f64 = [t.detach().double().requires_grad_() for t in leaves]
    ref = reference.rms_norm(*f64, 1e-6)[0] if rms else reference.layer_norm(*f64, 1e-5)[0]
    assert rel_err(y, ref) < TOL[dtype]
    got = torch.autograd.grad(y, leaves, dy)
    want = torch.autograd.grad(ref, f64, dy.double())
    for name, a, r in zip("xwb", got, want):
        assert rel_err(a, r) < TOL[dtype] * (1 if name == "x" else 2), name


def test_sanitized_emulator_reports_a_read_past_a_buffer():
    """In an address-sanitized emulated core (FUSEDLM_EMU_SANITIZE=address, CI's) a kernel's read
    outside its memory ends the process with the sanitizer's report naming the kernel's line."""
    import subprocess
    import sys
    if fusedlm.build_info().get("emu_sanitize") != "address":
        pytest.skip("fusedlm._C was built without FUSEDLM_EMU_SANITIZE=address")
    code = "from fusedlm import _core; _core._C.emu_selftest_read_past_end([1.0] * 40)"
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert run.returncode != 0
    assert "heap-buffer-overflow" in run.stderr and "selftest.cu" in run.stderr, run.stderr[-2000:]


def test_empty_packed_batch_emulated():
    """A pack with no query rows (every sequence empty) gives an empty output and zero key
    gradients; the log-sum-exp's strides of an empty tensor are not an error (they were)."""
    q = torch.zeros(0, 2, 32, dtype=torch.float16, requires_grad=True)
    k, v = (torch.randn(5, 1, 32).half().requires_grad_() for _ in range(2))
    cu_q, cu_k = torch.tensor([0, 0, 0], dtype=torch.int32), torch.tensor([0, 2, 5], dtype=torch.int32)
    out = fusedlm.attention_varlen(q, k, v, cu_q, cu_k, 0, 3, backend="cuda")
    assert out.shape == q.shape
    dq, dk, dv = torch.autograd.grad(out.float().sum(), (q, k, v), allow_unused=True)
    assert dk is not None and not dk.any() and not dv.any()
