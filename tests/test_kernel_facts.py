"""benchmarks/kernel_facts.py reads compiler output right (the compiles themselves run in CI's
kernel-facts step, not here)."""
import importlib.util
from pathlib import Path

import pytest

pytest.importorskip("triton")
_spec = importlib.util.spec_from_file_location(
    "kernel_facts", Path(__file__).resolve().parents[1] / "benchmarks" / "kernel_facts.py")
kf = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(kf)

PTXAS = """\
ptxas info    : Compiling entry function '_Z1aPf' for 'sm_90a'
ptxas info    : Function properties for _Z1aPf
    464 bytes stack frame, 1104 bytes spill stores, 756 bytes spill loads
ptxas info    : Used 128 registers, used 1 barriers, 464 bytes cumulative stack size, 256 bytes smem
ptxas info    : Compiling entry function '_Z1bPf' for 'sm_90a'
ptxas info    : Function properties for _Z1bPf
    0 bytes stack frame, 0 bytes spill stores, 0 bytes spill loads
ptxas info    : Used 168 registers, used 1 barriers
"""


def test_ptxas_report_per_kernel():
    assert kf._parse_ptxas(PTXAS) == {"_Z1aPf": (128, 1860, 256), "_Z1bPf": (168, 0, 0)}


def test_serialized_wgmma_is_read_per_kernel():
    """ptxas's note that it serialized a kernel's wgmma (the overlap a Hopper kernel is written
    for is gone) names the kernel; other notes about wgmma do not count."""
    text = PTXAS + (
        "ptxas info    : (C7514) Potential Performance Loss: wgmma.mma_async instructions are "
        "serialized due to non wgmma instructions reading accumulator registers of  a wgmma between "
        "start and end of the pipeline stage in the function '_Z1bPf'\n"
        "ptxas info    : (C7517) warpgroup.wait is injected in around line 24299 by compiler to "
        "allow use of registers defined by GMMA in function '_Z1aPf'\n"
        "ptxas info    : (C7512) Potential Performance Loss: wgmma.mma_async instructions are "
        "serialized due to insufficient register resources for the function '_Z1cPf'\n")
    assert kf.serialized_wgmma(text) == {"_Z1bPf", "_Z1cPf"}
    assert kf.serialized_wgmma(PTXAS) == set()


SASS = """\
        /*0040*/                   LDG.E.128 R4, desc[UR6][R2.64] ;
        /*0050*/              @!P0 LDG.E.U16 R8, desc[UR6][R2.64+0x2] ;
        /*0060*/                   LDG.E R9, desc[UR6][R2.64] ;
        /*0070*/                   LDG.E.64.CONSTANT R10, desc[UR6][R2.64] ;
        /*0080*/                   HGMMA.64x128x16.F32.BF16 R24, gdesc[UR8], R24 ;
        /*0090*/                   UTMALDG.2D [UR8], [UR4] ;
        /*00a0*/                   LDGSTS.E.BYPASS.128 [R3], desc[UR6][R4.64] ;
        /*00b0*/                   USETMAXREG.DEALLOC.CTAPOOL 0x28 ;
        /*00c0*/                   LDG.E.U8 R12, desc[UR6][R2.64] ;
        /*00d0*/                   STG.E.128 desc[UR6][R2.64], R4 ;
        /*1a4f0*/              @P1 UTMALDG.4D [UR8], [UR4] ;
        /*1a500*/                   HMMA.16816.F32.BF16 R40, R4, R8, R40 ;
        /*1a510*/                   LDSM.16.MT88.4 R8, [R3+UR4] ;
        /*1a520*/                   LDSM.16.M88.4 R12, [R3] ;
"""


def test_sass_instruction_counts():
    assert kf._counts(SASS) == dict(HGMMA=1, HMMA=1, LDSM=2, UTMALDG=2, LDG128=1, LDG64=1, LDG32=1,
                                    LDG16=1, LDGSTS=1, SETMAXNREG=1)


def test_integer_arguments_get_tritons_divisibility_only_where_it_would():
    """A vocabulary of 50257 must not be compiled as if divisible by 16: that decides whether
    the loads are 16 bytes wide, the very fact the script is for."""
    from triton.runtime.jit import JITFunction
    from fusedlm.kernels import lm_loss
    fn = JITFunction(lm_loss._ce_rows_kernel.fn)  # compiled, not interpreted as in this suite
    values = dict(LOGITS="*bf16", LABELS="*i64", LOSS="*fp32", LSE="*fp32", HIT="*fp32",
                  ROW_SCALE="*fp32", stride_vecs=6288, V=50257, smoothing=0.0, z_loss=0.0,
                  grad_scale=1.0, COMPUTE_GRAD=True, HAS_ROW_SCALE=False, SMOOTH=False,
                  BLOCK_V=4096, VEC=8)
    sig, const, attrs = kf._signature(fn, values)
    index = {p.name: i for i, p in enumerate(fn.params)}
    assert sig["V"] == "i32" and sig["smoothing"] == "fp32" and sig["LOGITS"] == "*bf16"
    assert (index["V"],) not in attrs and (index["stride_vecs"],) in attrs
    assert (index["LOGITS"],) in attrs and const["BLOCK_V"] == 4096 and const["VEC"] == 8


def test_lm_loss_row_kernel_loads_16_bytes_at_gpt2s_vocabulary(tmp_path):
    """Compiled for sm_90a (no GPU needed; in a process of its own, since this suite runs the
    Triton interpreter), with the row pitch the driver gives its buffer on a GPU: every tile,
    the last partial one included, loads 16 bytes at a time at V = 50257 and 30522; the one
    2-byte load left is the label's logit. (At GPT-2's padded pitch, 50264, not a multiple of 16
    elements, the rows once compiled to 2-byte loads throughout.)"""
    import json
    import subprocess
    import sys
    out = tmp_path / "facts.json"
    run = subprocess.run([sys.executable, kf.__file__, "--only", "triton", "--match",
                          "lm_loss ce_rows bf16 V=", "--json", str(out)],
                         capture_output=True, text=True, timeout=600)
    assert run.returncode == 0, run.stderr[-3000:]
    facts = {r["config"]: r for r in json.loads(out.read_text())["triton"]}
    for vocab in (30522, 50257):
        row = facts[f"bf16 V={vocab}"]
        assert row["LDG128"] >= 8 and row["LDG16"] <= 1 and row["spill"] == 0, row


def test_spill_baseline_lets_spills_go_never_come():
    allowed = {"Triton attention dkdv d64": 540, "CUDA C++ sm_90a norm_bwd_kernel<float, 4, 8>": 20}
    assert kf.spills_over({"Triton attention dkdv d64": 540, "CUDA C++ sm_80 x": 0}, allowed) == []
    assert kf.spills_over({"Triton attention dkdv d64": 100}, allowed) == []  # fewer: fine
    assert kf.spills_over({"Triton attention dkdv d64": 541, "CUDA C++ sm_80 y": 8}, allowed) == [
        "Triton attention dkdv d64: 541 bytes (allowed 540)", "CUDA C++ sm_80 y: 8 bytes (allowed 0)"]



_FLAG_PROBE = """
import importlib.util, json, sys
spec = importlib.util.spec_from_file_location("kernel_facts", sys.argv[1])
kf = importlib.util.module_from_spec(spec)
spec.loader.exec_module(kf)
firsts, out = {}, []
for kernel, label, fn, values, *_ in kf.triton_cases():
    firsts.setdefault((kernel, label.split()[0]), values)
for kernel, label, fn, values, *_ in kf.flag_cases():
    base = firsts[(kernel, label.split()[0])]
    out.append([kernel, label, sorted(k for k in values if values[k] != base[k]),
                {k: str(v) for k, v in values.items() if isinstance(v, bool)}])
print(json.dumps(out))
"""


def test_every_flag_flips_each_boolean_constexpr_alone():
    """--every-flag: per kernel and class, each boolean constexpr flipped once, nothing else
    changed but the scalars that give the flag work; every attention kernel's flags included.
    (Listed in a process of its own: the kernels must be Triton's compiled JIT functions, and this
    suite runs the interpreter.)"""
    import json
    import os
    import subprocess
    import sys
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-c", _FLAG_PROBE, kf.__file__], env=env,
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    cases = json.loads(run.stdout)
    labels = {(kernel, label) for kernel, label, *_ in cases}
    assert len(labels) == len(cases)
    assert ("attention dkdv", "d64 M32 N128 w8 s3 DROPOUT=True") in labels
    for kernel, label, changed, flags in cases:
        flag, on = label.rsplit(" ", 1)[1].split("=")
        assert flag in changed and flags[flag] == on, (kernel, label)
        assert set(changed) - {flag} <= set(kf._FLAG_SCALARS.get(flag, {})), (kernel, label)
    dkdv = {label.rsplit(" ", 1)[1] for kernel, label, *_ in cases
            if kernel == "attention dkdv" and label.startswith("d64")}
    assert dkdv == {f"{f}=True" for f in ("IS_VARLEN", "HAS_KMASK", "DROPOUT", "WINDOW", "SOFTCAP",
                                          "HAS_ALIBI", "GROUPED", "TMA", "ATOMIC_DQ",
                                          "SEED_PTR")} | {"CAUSAL=False"}


def test_a_compile_error_is_reported_by_its_innermost_cause():
    try:
        try:
            raise ValueError("inner")
        except ValueError as e:
            raise RuntimeError('at 1:0:\ndef f():\n^\nTypeError("Return type mismatch")') from e
    except RuntimeError as outer:
        assert kf._first_error_line(outer) == "ValueError: inner"
    quoted = RuntimeError('at 1:0:\ndef f():\n^\nTypeError("Return type mismatch")')
    assert kf._first_error_line(quoted) == 'TypeError("Return type mismatch")'
