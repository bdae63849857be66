"""Backend choice: per call (strict), per process (preference with fallback), automatic."""
import pytest
import torch

import fusedlm
from conftest import DEVICE, HAS_GPU, kernel_backends, not_emulated


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


@not_emulated
def test_per_call_backend_that_cannot_serve_raises_naming_backend():
    x = torch.randn(3, 8)  # CPU: the CUDA C++ kernel cannot serve it
    with pytest.raises(ValueError, match=r"backend='cuda'"):
        fusedlm.layer_norm(x, backend="cuda")


def test_unknown_backend_name_raises():
    with pytest.raises(ValueError, match="backend must be one of"):
        fusedlm.layer_norm(torch.randn(2, 4), backend="apex")


@not_emulated
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
    assert case == ("cpu", torch.float32, 8, torch.float32, False) and case.columns == 8
    fusedlm.layer_norm(torch.randn(3, 8), torch.ones(8), dropout_p=0.1)  # a limit of one backend
    assert fusedlm.explain("layer_norm").case.dropout
    q = torch.randn(1, 4, 2, 16)
    fusedlm.attention(q, q, q, dropout_p=0.1)
    case = fusedlm.explain("attention").case
    assert case == ("cpu", torch.float32, 16, False, False, False, False, 4) and case.head_dim == 16
    # (dropout is no limit of any backend: not in the case; causal and the keys are the
    # measured table's bucket)
    fusedlm.attention(q, q, q, window_size=(2, 0), softcap=5.0, causal=True)
    assert fusedlm.explain("attention").case[3:] == (True, True, False, True, 4)
    cu = torch.tensor([0, 3, 4], dtype=torch.int32)
    fusedlm.attention_varlen(q[0], q[0], q[0], cu, cu, 3, 3)
    assert fusedlm.explain("attention").case.seq_k == 3  # max_seqlen_k
    fusedlm.attention(q, q, q, alibi_slopes=torch.ones(2))
    assert fusedlm.explain("attention").case.alibi
    fusedlm.lm_loss(torch.randn(4, 8), torch.randn(11, 8), torch.tensor([1, -100, 3, 4]))
    case = fusedlm.explain("lm_loss").case
    assert case == ("cpu", torch.float32, 11) and case.vocab == 11  # the table's size bucket


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


# ---- the measured table --------------------------------------------------------------------

def _fake_op():
    """An op whose every backend serves every case, so the table alone decides (on any machine)."""
    from typing import NamedTuple

    from fusedlm.ops import dispatch

    class FakeCase(NamedTuple):
        device_type: str
        dtype: torch.dtype
        columns: int
    return dispatch.register(dispatch.OpBackends(
        "fake_norm", FakeCase, {b: (lambda case: None) for b in dispatch.BACKENDS},
        cuda_order=("triton", "cuda", "torch"), gpu_verified=("torch", "triton", "cuda")))


def _table(tmp_path, entries):
    import json
    path = tmp_path / "table.json"
    path.write_text(json.dumps({"entries": entries}))
    return str(path)


def test_measured_table_orders_the_backends_it_covers(tmp_path, monkeypatch):
    from fusedlm.ops import dispatch
    _fake_op()
    entries = [dict(arch="sm_90", op="fake_norm", case=dict(dtype="bfloat16", columns=[1, 2048]),
                    order=["cuda", "triton"], ms={"cuda": 0.19, "triton": 0.44}, source="a run"),
               dict(arch="sm_80", op="fake_norm", case=dict(dtype="bfloat16", columns=[1, 9999]),
                    order=["torch"])]
    monkeypatch.setenv(dispatch.TABLE_ENV_VAR, _table(tmp_path, entries))
    monkeypatch.setattr(dispatch, "_arch", lambda: "sm_90")
    dispatch.clear_cache()
    try:
        assert dispatch.select("fake_norm", ("cuda", torch.bfloat16, 768)) == "cuda"
        d = dispatch.explain("fake_norm")
        assert "sm_90, dtype bfloat16, columns 1-2048: cuda 0.19 ms, triton 0.44 ms (a run)" in str(d)
        # Outside the bucket, another dtype, off a GPU: the fixed order, and no table line.
        for case in (("cuda", torch.bfloat16, 4096), ("cuda", torch.float32, 768)):
            assert dispatch.select("fake_norm", case) == "triton"
            assert dispatch.explain("fake_norm").measured is None
        assert dispatch.select("fake_norm", ("cpu", torch.bfloat16, 768)) == "torch"
        # Another architecture's entry does not apply here.
        monkeypatch.setattr(dispatch, "_arch", lambda: "sm_80")
        dispatch.clear_cache()
        assert dispatch.select("fake_norm", ("cuda", torch.bfloat16, 768)) == "torch"
        # A per-call backend still wins over the table.
        assert dispatch.select("fake_norm", ("cuda", torch.bfloat16, 768), "triton") == "triton"
    finally:
        dispatch._OPS.pop("fake_norm")
        dispatch.clear_cache()


def test_a_feature_not_yet_run_on_a_gpu_is_never_chosen_automatically(tmp_path, monkeypatch):
    """A verified backend's newer feature (the CUDA C++ norm's dropout) is left out of automatic
    dispatch for the cases that use it, even where a measured table puts the backend first;
    other cases, and a caller who names the backend, still get it."""
    from fusedlm.ops import dispatch
    op = _fake_op()
    op.unverified_cases["cuda"] = lambda case: "the fake kernel's wide rows" if case.columns > 1024 else None
    entries = [dict(arch="sm_90", op="fake_norm", case=dict(dtype="bfloat16"), order=["cuda"])]
    monkeypatch.setenv(dispatch.TABLE_ENV_VAR, _table(tmp_path, entries))
    monkeypatch.setattr(dispatch, "_arch", lambda: "sm_90")
    dispatch.clear_cache()
    try:
        assert dispatch.select("fake_norm", ("cuda", torch.bfloat16, 768)) == "cuda"
        assert dispatch.select("fake_norm", ("cuda", torch.bfloat16, 4096)) == "triton"
        assert ("the fake kernel's wide rows has not run on a GPU yet, so it is never chosen "
                "automatically; pass backend='cuda'") in str(dispatch.explain("fake_norm"))
        assert dispatch.select("fake_norm", ("cuda", torch.bfloat16, 4096), "cuda") == "cuda"
    finally:
        dispatch._OPS.pop("fake_norm")
        dispatch.clear_cache()


def test_a_bad_measured_table_is_named(tmp_path, monkeypatch):
    from fusedlm.ops import dispatch
    monkeypatch.setenv(dispatch.TABLE_ENV_VAR, _table(tmp_path, [dict(arch="sm_90", op="layer_norm",
                                                                      case={}, order=["apex"])]))
    dispatch.clear_cache()
    with pytest.raises(ValueError, match="order must name backends"):
        dispatch.table_entries()
    monkeypatch.setenv(dispatch.TABLE_ENV_VAR, str(tmp_path / "missing.json"))
    dispatch.clear_cache()
    with pytest.raises(ValueError, match="FUSEDLM_DISPATCH_TABLE=.*no such file"):
        dispatch.table_entries()
    monkeypatch.delenv(dispatch.TABLE_ENV_VAR)
    dispatch.clear_cache()
    assert dispatch.table_entries() == dispatch.check_table(
        __import__("json").load(open(dispatch.TABLE_PATH)), "shipped")  # the shipped one is valid


def test_tune_entries_from_a_layer_norm_run(tmp_path):
    """`fusedlm bench layer_norm --tune` turns timings into buckets: numbers of the 2026-11-23
    H100 run (fwd, bwd ms)."""
    from fusedlm.bench.layer_norm import tune_entries
    from fusedlm.bench.tune import write_table
    from fusedlm.ops import dispatch
    runs = {768: {"triton": (0.0646, 0.3736), "cuda": (0.0339, 0.1546)},
            4096: {"triton": (0.1024, 0.30), "cuda": (0.1271, 0.35)}}
    results = [dict(op="layer_norm", direction=d, dtype="bfloat16", rows=16384, n=n,
                    impl=f"fusedlm[{b}]", ms=t[i])
               for n, per in runs.items() for b, t in per.items() for i, d in enumerate(("fwd", "bwd"))]
    results.append(dict(op="layer_norm", direction="fwd", dtype="bfloat16", rows=16384, n=8192,
                        impl="fusedlm[cuda]", ms=0.2))  # one direction only: no entry
    results.append(dict(op="layer_norm", direction="fwd", dtype="bfloat16", rows=16384, n=768,
                        impl="torch", ms=0.03))  # not a fusedlm backend: not in the order
    # A --dropout run (BERT's dropout, add & norm) makes entries of its own, for dropout cases.
    results += [dict(op="layer_norm", direction=d, dtype="bfloat16", rows=16384, n=768,
                     impl=f"fusedlm[{b}]", ms=ms, dropout_p=0.1)
                for b, ms in (("triton", 0.2), ("cuda", 0.1)) for d in ("fwd", "bwd")]
    entries = tune_entries(results, "sm_90", "test")
    assert [(e["case"]["dropout"], e["case"]["columns"], e["order"]) for e in entries] == [
        (False, [1, 768], ["cuda", "triton"]), (False, [769, 4096], ["triton", "cuda"]),
        (True, [1, 768], ["cuda", "triton"])]
    path = str(tmp_path / "t.json")
    write_table(path, entries)
    table = write_table(path, entries[:1])  # the same bucket again replaces, not repeats
    assert len(dispatch.check_table(table, path)) == 3


def test_tune_entries_from_an_lm_loss_run(tmp_path, monkeypatch):
    """`fusedlm bench lm_loss --tune`: per dtype and vocabulary, fusedlm's backends ordered by
    their time summed over the cases of that vocabulary (a backend that missed one is left
    out; peers and the capacity variant never enter); the entries join a table holding
    another op's, and dispatch then follows them on that GPU."""
    from fusedlm.bench.lm_loss import tune_entries
    from fusedlm.bench.tune import write_table
    from fusedlm.ops import dispatch
    runs = {("bert-mlm", 30522): {"triton": 1.0, "cuda": 0.8},
            ("bert-large-mlm", 30522): {"triton": 1.2, "cuda": 1.3},  # sums: cuda 2.1 < triton 2.2
            ("gpt2", 50257): {"triton": 6.0, "cuda": 6.5},
            ("large-vocab", 128256): {"triton": 70.0}}  # cuda failed the case: left out
    results = [dict(op="lm_loss", case=c, dtype="bfloat16", vocab=v, impl=f"fusedlm[{b}]", ms=ms)
               for (c, v), per in runs.items() for b, ms in per.items()]
    results += [dict(op="lm_loss", case="gpt2", dtype="bfloat16", vocab=50257, impl=name, ms=0.1)
                for name in ("fusedlm[cuda], capacity", "liger", "torch.compile(ref)")]
    entries = tune_entries(results, "sm_90", "test")
    assert [(e["case"], e["order"]) for e in entries] == [
        ({"dtype": "bfloat16", "vocab": [1, 30522]}, ["cuda", "triton"]),
        ({"dtype": "bfloat16", "vocab": [30523, 50257]}, ["triton", "cuda"]),
        ({"dtype": "bfloat16", "vocab": [50258, 128256]}, ["triton"])]
    assert entries[0]["ms"] == {"cuda": 2.1, "triton": 2.2}
    path = str(tmp_path / "t.json")
    write_table(path, [dict(arch="sm_90", op="layer_norm", case=dict(dtype="bfloat16", columns=[1, 768]),
                            order=["cuda", "triton"])])
    table = write_table(path, entries)
    assert [e["op"] for e in dispatch.check_table(table, path)] == ["layer_norm"] + ["lm_loss"] * 3
    # Dispatch on that GPU follows the lm_loss entries by vocabulary.
    monkeypatch.setenv(dispatch.TABLE_ENV_VAR, path)
    monkeypatch.setattr(dispatch, "_arch", lambda: "sm_90")
    dispatch.clear_cache()
    try:
        assert dispatch._measured_order("lm_loss", _loss_case("cuda", torch.bfloat16, 30522))[0] == ("cuda", "triton")
        assert dispatch._measured_order("lm_loss", _loss_case("cuda", torch.bfloat16, 50257))[0] == ("triton", "cuda")
        assert dispatch._measured_order("lm_loss", _loss_case("cuda", torch.bfloat16, 200000)) == (None, None)
        assert dispatch._measured_order("lm_loss", _loss_case("cuda", torch.float16, 30522)) == (None, None)
    finally:
        monkeypatch.delenv(dispatch.TABLE_ENV_VAR)
        dispatch.clear_cache()


def _loss_case(*values):
    from fusedlm.ops.lm_loss import LossCase
    return LossCase(*values)


def test_tune_entries_from_an_attention_run(tmp_path, monkeypatch):
    """`fusedlm bench attention --tune`: per dtype, head dim, causal and sequence length,
    fusedlm's backends by forward + backward time, "cuda" standing for the faster of its kernel
    families, which the entry names; dispatch then orders by them and kernel_for follows the
    named family, once the wgmma kernels are GPU-verified, unless a family is asked for by name."""
    from fusedlm.bench.attention import tune_entries
    from fusedlm.bench.tune import write_table
    from fusedlm.ops import attention_kernels, dispatch
    from fusedlm.ops.attention import AttentionCase
    runs = {(64, False, 512): {"triton": 0.50, "cuda": 0.40, "cuda-wgmma": 0.45},  # mma fastest
            (64, False, 4096): {"triton": 2.0, "cuda": 2.6, "cuda-wgmma": 1.7},   # wgmma fastest
            (128, True, 4096): {"triton": 3.0, "cuda": 3.5}}                       # no wgmma timed
    results = [dict(op="attention", direction="fwd+bwd", dtype="bfloat16", seq=s, head_dim=d,
                    causal=c, impl=f"fusedlm[{b}]", ms=ms)
               for (d, c, s), per in runs.items() for b, ms in per.items()]
    results += [  # none of these enters the table
        dict(op="attention", direction="fwd", dtype="bfloat16", seq=512, head_dim=64, causal=False,
             impl="fusedlm[triton]", ms=0.01),                               # forward only
        dict(op="attention", direction="fwd+bwd", dtype="bfloat16", seq=512, head_dim=64,
             causal=False, impl="sdpa[cudnn]", ms=0.01),                     # a peer
        dict(op="attention", direction="fwd+bwd", dtype="bfloat16", seq=512, head_dim=64,
             causal=False, impl="fusedlm[triton-tma]", ms=0.01),             # a variant
        dict(op="attention", case="bert-padded", direction="fwd+bwd", dtype="bfloat16", seq=512,
             head_dim=64, causal=False, impl="fusedlm[triton] packed", ms=0.01)]
    entries = tune_entries(results, "sm_90", "test")
    group = lambda d, c: {"dtype": "bfloat16", "head_dim": d, "causal": c}  # noqa: E731
    assert [(e["case"], e["order"], e.get("cuda_kernels")) for e in entries] == [
        ({**group(64, False), "seq_k": [1, 512]}, ["cuda", "triton"], "mma"),
        ({**group(64, False), "seq_k": [513, 4096]}, ["cuda", "triton"], "wgmma"),
        ({**group(128, True), "seq_k": [1, 4096]}, ["triton", "cuda"], "mma")]
    assert entries[1]["ms"] == {"cuda": 1.7, "triton": 2.0}
    path = str(tmp_path / "t.json")
    table = write_table(path, entries)
    assert len(dispatch.check_table(table, path)) == 3

    monkeypatch.setenv(dispatch.TABLE_ENV_VAR, path)
    monkeypatch.setattr(dispatch, "_arch", lambda: "sm_90")
    monkeypatch.setattr(attention_kernels, "cuda_kernels", None)
    dispatch.clear_cache()
    case = lambda d, c, s: ("cuda", torch.bfloat16, d, False, False, False, c, s)  # noqa: E731
    try:
        assert dispatch._measured_order("attention", AttentionCase(*case(64, False, 2048)))[0] == ("cuda", "triton")
        assert "(cuda: the wgmma kernels)" in dispatch._measured_order("attention", AttentionCase(*case(64, False, 2048)))[1]
        assert dispatch._measured_order("attention", AttentionCase(*case(64, True, 2048))) == (None, None)
        assert dispatch._measured_order("attention", AttentionCase(*case(64, False, 0))) == (None, None)  # unknown
        assert dispatch.measured_kernels("attention", case(64, False, 2048), "cuda_kernels") == "wgmma"
        assert dispatch.measured_kernels("attention", case(64, False, 512), "cuda_kernels") == "mma"
        assert dispatch.measured_kernels("attention", ("cpu",) + case(64, False, 2048)[1:],
                                         "cuda_kernels") is None
        # Not yet GPU-verified: the table's wgmma is not taken.
        monkeypatch.setattr(attention_kernels, "WGMMA_GPU_VERIFIED", False)
        assert attention_kernels.kernel_for("cuda", case(64, False, 2048)) == "cuda-mma"
        monkeypatch.setattr(attention_kernels, "WGMMA_GPU_VERIFIED", True)
        assert attention_kernels.kernel_for("cuda", case(64, False, 2048)) == "cuda-wgmma"
        assert attention_kernels.kernel_for("cuda", case(64, False, 512)) == "cuda-mma"
        assert attention_kernels.kernel_for("cuda", case(128, True, 2048)) == "cuda-mma"
        assert attention_kernels.kernel_for("triton", case(64, False, 2048)) == "triton"
        with attention_kernels.using_cuda_kernels("mma"):  # by name: stronger than the table
            assert attention_kernels.kernel_for("cuda", case(64, False, 2048)) == "cuda-mma"
        with attention_kernels.using_cuda_kernels("wgmma"):
            assert attention_kernels.kernel_for("cuda", case(64, False, 512)) == "cuda-wgmma"
    finally:
        monkeypatch.delenv(dispatch.TABLE_ENV_VAR)
        dispatch.clear_cache()


def test_a_measured_table_names_known_cuda_kernels(tmp_path):
    from fusedlm.ops import dispatch
    entry = dict(arch="sm_90", op="attention", case={}, order=["cuda"], cuda_kernels="hopper")
    with pytest.raises(ValueError, match=r"cuda_kernels must be one of \('mma', 'wgmma'\), got 'hopper'"):
        dispatch.check_table({"entries": [entry]}, "t.json")
    entry = dict(arch="sm_90", op="attention", case={}, order=["triton"], triton_kernels="atomic")
    with pytest.raises(ValueError, match=r"triton_kernels must be one of \('dq', 'atomic-dq'\), got 'atomic'"):
        dispatch.check_table({"entries": [entry]}, "t.json")
    with pytest.raises(ValueError, match="field must be one of"):
        dispatch.measured_kernels("attention", ("cuda",), "kernels")


def test_attention_tuning_chooses_the_triton_backward_by_measurement(tmp_path, monkeypatch):
    """With fusedlm[triton-atomic-dq] timed beside fusedlm[triton], the Triton backend's time is
    the faster one's and the entry names it (`triton_kernels`); kernel_for then launches the
    atomic-dQ backward for that case, once it is GPU-verified, and the launcher takes it there
    (on the interpreter here), never with deterministic=True."""
    from fusedlm.bench.attention import tune_entries
    from fusedlm.bench.tune import write_table
    from fusedlm.ops import attention_kernels, dispatch
    runs = {(64, False, 512): {"triton": 0.50, "triton-atomic-dq": 0.40, "cuda": 0.45},
            (64, False, 4096): {"triton": 2.0, "triton-atomic-dq": 2.2},
            (128, True, 4096): {"triton": 3.0}}                # atomic dQ not timed: not named
    results = [dict(op="attention", direction="fwd+bwd", dtype="bfloat16", seq=s, head_dim=d,
                    causal=c, impl=f"fusedlm[{b}]", ms=ms)
               for (d, c, s), per in runs.items() for b, ms in per.items()]
    entries = tune_entries(results, "sm_90", "test")
    assert [(e["order"], e["ms"].get("triton"), e.get("triton_kernels")) for e in entries] == [
        (["triton", "cuda"], 0.4, "atomic-dq"), (["triton"], 2.0, "dq"), (["triton"], 3.0, None)]
    path = str(tmp_path / "t.json")
    write_table(path, entries)
    monkeypatch.setenv(dispatch.TABLE_ENV_VAR, path)
    monkeypatch.setattr(dispatch, "_arch", lambda: "sm_90")
    dispatch.clear_cache()
    case = lambda d, c, s: ("cuda", torch.bfloat16, d, False, False, False, c, s)  # noqa: E731
    try:
        monkeypatch.setattr(attention_kernels, "ATOMIC_DQ_GPU_VERIFIED", False)
        assert attention_kernels.kernel_for("triton", case(64, False, 512)) == "triton"
        monkeypatch.setattr(attention_kernels, "ATOMIC_DQ_GPU_VERIFIED", True)
        assert attention_kernels.kernel_for("triton", case(64, False, 512)) == "triton-atomic-dq"
        assert attention_kernels.kernel_for("triton", case(64, False, 4096)) == "triton"
        assert attention_kernels.kernel_for("triton", case(128, True, 2048)) == "triton"
    finally:
        monkeypatch.delenv(dispatch.TABLE_ENV_VAR)
        dispatch.clear_cache()
