"""What the GPU code compiles to, on a machine with no GPU: per kernel and configuration, the
registers, spill bytes, shared memory and the instructions that decide speed on Hopper.

    python benchmarks/kernel_facts.py                     # Triton (sm_90a) and CUDA C++ (the
                                                          # build's architectures: sm_80, sm_90a)
    python benchmarks/kernel_facts.py --only triton --json facts.json
    python benchmarks/kernel_facts.py --fail-on-spills    # exit 1 if a kernel listed spills
    python benchmarks/kernel_facts.py --only triton --every-flag
                                                          # each kernel's boolean flags flipped
                                                          # one at a time: exit 1 if one fails
                                                          # to compile
    python benchmarks/kernel_facts.py --fail-on-serialized-wgmma
                                                          # exit 1 if ptxas serialized a
                                                          # kernel's wgmma (no overlap left)
    python benchmarks/kernel_facts.py --spill-baseline known.json
                                                          # exit 1 on a spill known.json (from
                                                          # --write-spill-baseline) lacks

Triton kernels are compiled ahead of time for a `GPUTarget("cuda", 90, 32)` (Triton ships
ptxas, cuobjdump and nvdisasm), at every autotuning candidate of the attention kernels at head
dims 64, 128 and 256 (with the pinned configuration of reproducible runs, and at the first
candidate the window + softcap + ALiBi and grouped-query variants; the three kernels' opt-in
TMA path at every one, and the classes the models train in at every candidate they keep:
causal with dropout, packed with and without dropout, a padding mask with dropout; dK/dV with
dQ's atomic shares, ATOMIC_DQ, as a fourth kernel) and at the configurations fusedlm's launchers pick for the shapes of
BERT-base and GPT-2 (the launchers' own block-size rules are called, not copied). An integer
argument gets Triton's divisible-by-16 specialization exactly when its value here is a multiple
of 16, as at run time, so a vocabulary of 50257 shows the loads it really gets. The CUDA C++ sources are compiled with
nvcc (-Xptxas -v) with the build's own flags.

Columns: regs (per thread), spill (bytes stored + loaded to local memory per thread), smem
(bytes per CTA), serial (1 where ptxas serialized the kernel's wgmma instructions, its
"Potential Performance Loss" notes C7514/C7515: each product then waits for the one before, so
no softmax or copy overlaps them), and SASS instruction counts: HGMMA (wgmma), HMMA (mma.sync, warp-level tensor
cores), LDSM (ldmatrix), UTMALDG (TMA loads), LDG128 /
LDG64 / LDG32 / LDG16 (global loads by width; 16-byte ones are what a bandwidth-bound kernel
wants), LDGSTS (cp.async), SETMAXNREG (register reallocation between warpgroups).
These are facts about code, not speed: the GPU decides that.
"""
import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import warnings
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
HEAD_DIMS = (64, 128, 256)  # the attention head dims compiled

SASS_COUNTS = ("HGMMA", "HMMA", "LDSM", "UTMALDG", "LDG128", "LDG64", "LDG32", "LDG16", "LDGSTS", "SETMAXNREG")
OPCODE = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)")


def _column(op):
    """The SASS_COUNTS column an opcode counts in, or None."""
    if op.startswith("HGMMA"):
        return "HGMMA"
    if op.startswith("HMMA"):
        return "HMMA"
    if op.startswith("LDSM"):
        return "LDSM"
    if op.startswith("UTMALDG"):
        return "UTMALDG"
    if op.startswith("LDGSTS"):
        return "LDGSTS"
    if op.startswith("USETMAXREG"):
        return "SETMAXNREG"
    if op.startswith("LDG."):
        parts = set(op.split("."))
        for width, col in (("128", "LDG128"), ("64", "LDG64"), ("U16", "LDG16"), ("S16", "LDG16")):
            if width in parts:
                return col
        return None if parts & {"U8", "S8"} else "LDG32"
    return None


def _counts(sass_text):
    counts = dict.fromkeys(SASS_COUNTS, 0)
    for op in OPCODE.findall(sass_text):
        col = _column(op)
        if col:
            counts[col] += 1
    return counts


SPILL_LINE = re.compile(r"(\d+) bytes spill stores, (\d+) bytes spill loads")
SERIAL_LINE = re.compile(r"wgmma\.mma_async instructions are serialized due to .*? (?:in|for) (?:the )?function '(\w+)'")


def serialized_wgmma(text):
    """The mangled names of the kernels whose wgmma ptxas serialized, from ptxas -v."""
    return set(SERIAL_LINE.findall(text))


def _triton_tool(name):
    import triton
    path = Path(triton.__file__).parent / "backends" / "nvidia" / "bin" / name
    return str(path) if path.exists() else shutil.which(name)


def _ptxas_for_sm90():
    """The ptxas Triton itself assembles sm_90 code with (it ships two; the PTX it writes
    needs the newer one)."""
    from triton.backends.nvidia.compiler import get_ptxas
    return get_ptxas(90).path


def sass_counts(cubin: bytes, tool):
    """Counts of the SASS_COUNTS instructions in a cubin (cuobjdump -sass)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        sass = subprocess.run([tool, "-sass", f.name], capture_output=True, text=True,
                              check=True).stdout
    return _counts(sass)


def ptxas_usage(ptx: str, arch: str):
    """(registers, spill bytes, wgmma serialized) of the one kernel in `ptx`, from ptxas -v."""
    with tempfile.TemporaryDirectory() as d:
        src = Path(d) / "k.ptx"
        src.write_text(ptx)
        out = subprocess.run([_ptxas_for_sm90(), f"--gpu-name={arch}", "-v", str(src), "-o",
                              str(Path(d) / "k.o")], capture_output=True, text=True, check=True)
    text = out.stdout + out.stderr
    regs = int(re.search(r"Used (\d+) registers", text).group(1))
    spill = sum(int(a) + int(b) for a, b in SPILL_LINE.findall(text))
    return regs, spill, int(bool(serialized_wgmma(text)))


# --- Triton -------------------------------------------------------------------------------

def _signature(fn, values):
    """Triton signature, constexprs and specialization attributes for `fn` called with
    `values` (name -> "*dtype" for a pointer, int, float, or the constexpr's value)."""
    sig, const, attrs = {}, {}, {}
    for i, p in enumerate(fn.params):
        v = values[p.name]
        if p.is_constexpr:
            sig[p.name], const[p.name] = "constexpr", v
        elif isinstance(v, str):
            sig[p.name] = v
            attrs[(i,)] = [["tt.divisibility", 16]]  # device allocations are 256-byte aligned
        elif isinstance(v, float):
            sig[p.name] = "fp32"
        else:
            sig[p.name] = "i64" if abs(v) >= 2 ** 31 else "i32"
            if v % 16 == 0 and not p.do_not_specialize:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, const, attrs


def compile_triton(fn, values, num_warps, num_stages=3):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    sig, const, attrs = _signature(fn, values)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        k = triton.compile(ASTSource(fn=fn, signature=sig, constexprs=const, attrs=attrs),
                           target=GPUTarget("cuda", 90, 32),
                           options={"num_warps": num_warps, "num_stages": num_stages})
    regs, spill, serial = ptxas_usage(k.asm["ptx"], "sm_90a")
    return dict(regs=regs, spill=spill, serial=serial, smem=k.metadata.shared,
                **sass_counts(k.asm["cubin"], _triton_tool("cuobjdump")))


def _ptrs(names, dtype):
    return {n: f"*{dtype}" for n in names}


def _bshd_stride(name, d):
    """An attention stride argument (s_<tensor><b|s|h>) for contiguous (batch 2048, seq, 12 heads,
    head dim d) tensors."""
    return {"b": 2048 * 12 * d, "s": 12 * d, "h": d}[name[-1]]


def triton_cases():
    """(kernel, config label, fn, values, num_warps, num_stages) for every case listed."""
    from fusedlm.kernels import attention as A, layer_norm as L, lm_loss as C
    from fusedlm.kernels._host import next_power_of_2
    cases = []
    # Layer norm at BERT-base (768), GPT-2 XL-ish (1600) and 4096 wide, bf16, with a residual;
    # at 768 also with dropout, as BERT's "dropout, add & norm" runs it, eagerly (the seed by
    # value) and compiled (read from a device tensor).
    for n, dropout, seed_ptr in ((768, False, False), (768, True, False), (768, True, True),
                                 (1600, False, False), (4096, False, False)):
        block = L._block_n(n)
        label = f"bf16 N={n}" + (" dropout" if dropout else "") + (" compiled" if seed_ptr else "")
        fwd = dict(_ptrs("X RES W B Y Z".split(), "bf16"), MEAN="*fp32", RSTD="*fp32", SEED="*i64",
                   stride_x=n, stride_res=n, stride_y=n, stride_z=n, N=n, eps=1e-5, seed=1,
                   p_drop=0.1, drop_scale=1 / 0.9, IS_RMS=False, HAS_RES=True, HAS_W=True,
                   HAS_B=True, STORE_Z=True, DROPOUT=dropout, SEED_PTR=seed_ptr, BLOCK_N=block)
        cases.append(("layer_norm fwd", label, L._norm_fwd_kernel, fwd, L._num_warps(block), 1))
        bwd = dict(_ptrs("DY Z W DZ_EXTRA DZ DX".split(), "bf16"), MEAN="*fp32", RSTD="*fp32",
                   DW_PART="*fp32", DB_PART="*fp32", SEED="*i64", stride_dy=n, stride_z=n, stride_extra=n,
                   stride_dz=n, stride_dx=n, n_rows=16384, N=n, rows_per_program=64, seed=1,
                   p_drop=0.1, drop_scale=1 / 0.9, IS_RMS=False, HAS_W=True, HAS_B=True,
                   HAS_DZ_EXTRA=True, NEED_DW=True, STORE_DZ=True, DROPOUT=dropout,
                   SEED_PTR=seed_ptr, BLOCK_N=block)
        cases.append(("layer_norm bwd", label, L._norm_bwd_kernel, bwd, L._num_warps(block), 1))
    # The MLP's activation backward (A recomputed, dpre, b1's partial sums) at BERT-base's
    # intermediate width, bf16, for each activation; gated (SwiGLU) at Llama-3 8B's.
    from fusedlm.kernels import mlp as M
    for act, gated, n in [(a, False, 3072) for a in M.ACTIVATIONS] + [("silu", True, 14336)]:
        values = dict(_ptrs("PRE UP DA A DPRE DUP".split(), "bf16"), DB_PART="*fp32",
                      DBU_PART="*fp32", stride_pre=n, stride_up=n, stride_da=n, stride_a=n,
                      stride_dpre=n, stride_dup=n, n_rows=16384, N=n, rows_per_program=256,
                      ACT=M.ACTIVATIONS.index(act), GATED=gated, STORE_A=True, HAS_DB=not gated,
                      HAS_DBU=False, BLOCK_M=M.BLOCK_M, BLOCK_N=M.BLOCK_N)
        label = f"bf16 N={n} {act}" + (" gated" if gated else "")
        cases.append(("mlp act_bwd", label, M._act_bwd_kernel, values, 4, 3))
    # The LM loss row kernel at BERT's, GPT-2's (raw, and padded to 50304 by the model) and
    # Llama 3's vocabularies, with the row pitch the driver gives the logits buffer on a GPU.
    import importlib
    import torch
    D = importlib.import_module("fusedlm.ops.lm_loss")  # the module (the package exports the function)
    for vocab in (30522, 50257, 50304, 128256):
        padded = -(-vocab // D.GEMM_ALIGN) * D.GEMM_ALIGN
        pitch = D.logits_pitch(padded, torch.bfloat16)
        block = min(next_power_of_2(vocab), 4096)
        values = dict(LOGITS="*bf16", LABELS="*i64", LOSS="*fp32", LSE="*fp32", HIT="*fp32",
                      ROW_SCALE="*fp32", stride_vecs=pitch // 8, V=vocab, smoothing=0.0,
                      z_loss=0.0, grad_scale=1.0, COMPUTE_GRAD=True, HAS_ROW_SCALE=False,
                      SMOOTH=False, BLOCK_V=block, VEC=8)
        cases.append(("lm_loss ce_rows", f"bf16 V={vocab}", C._ce_rows_kernel, values,
                      8 if block >= 2048 else 4, 3))
    # Attention: every autotuning candidate at its head dims, bf16, causal, BERT-like contiguous
    # (batch, seq, heads, D) strides at 12 heads; at the first candidate, also the Gemma-2 /
    # Mistral variant (window + softcap, with ALiBi too) and grouped-query heads (4 query heads a
    # key head).
    # dkdv_dq: dK/dV with dQ's atomic shares (FUSEDLM_TRITON_ATOMIC_DQ), at the head dims it serves.
    for name, fn in (("fwd", A._attn_fwd), ("dkdv", A._attn_bwd_dkdv), ("dq", A._attn_bwd_dq),
                     ("dkdv_dq", A._attn_bwd_dkdv)):
        for d in HEAD_DIMS:
            block_d = max(next_power_of_2(d), 16)
            if not A.configs(name, block_d):
                continue
            # Reproducible runs' pinned config (dkdv_dq has none: deterministic runs skip it).
            pinned = [] if name == "dkdv_dq" else [A._pinned_config(name, A._blocks(d)[1], None)]
            # The classes the models train in, each at every candidate it keeps (their spills
            # are what kernels/attention.SPILLS_IN_CLASS leaves out): causal with dropout (GPT-2),
            # packed (fusedlm's BERT, without and with dropout), a padding mask with dropout
            # (Hugging Face's BERT patched). Not the pinned configuration of reproducible runs,
            # which trades speed away.
            classes = (
                (" dropout", dict(DROPOUT=True, p_drop=0.1)),
                (" packed", dict(IS_VARLEN=True, CAUSAL=False)),
                (" packed+dropout", dict(IS_VARLEN=True, CAUSAL=False, DROPOUT=True, p_drop=0.1)),
                (" mask+dropout", dict(HAS_KMASK=True, CAUSAL=False, DROPOUT=True, p_drop=0.1)))
            kept = {suffix: A.configs(name, block_d, **{f: v for f, v in flags.items()
                                                      if f.isupper() and v is True})
                    for suffix, flags in classes}
            for i, cfg in enumerate([*A.configs(name, block_d), *pinned]):
                values = {p.name: "*bf16" for p in fn.params if p.name.isupper()
                          and not p.is_constexpr}
                values.update(LSE="*fp32", DELTA="*fp32", DQ_ACC="*fp32", KMASK="*i8",
                              CU_Q="*i32", CU_K="*i32", ALIBI="*fp32", SEED="*i64")
                values.update(s_lb=12 * 2048, s_lh=2048, s_mb=2048, seq_q=2048, seq_k=2048,
                              n_heads=12, group=1, scale_log2=0.18, sm_scale=0.125, seed=0,
                              p_drop=0.0, win_left=0, win_right=0, cap=0.0, s_ab=0,
                              seq_bucket=2048, HEAD_DIM=d, BLOCK_D=block_d, IS_VARLEN=False,
                              CAUSAL=True, HAS_KMASK=False, DROPOUT=False, WINDOW=False,
                              SOFTCAP=False, HAS_ALIBI=False, GROUPED=False, TMA=False,
                              ATOMIC_DQ=name == "dkdv_dq", SEED_PTR=False, **cfg.kwargs)
                for p in fn.params:  # (batch, seq, heads, D) strides: s_?b, s_?s, s_?h
                    if p.name.startswith("s_") and p.name not in values:
                        values[p.name] = _bshd_stride(p.name, d)
                label = (f"d{d} M{cfg.kwargs['BLOCK_M']} N{cfg.kwargs['BLOCK_N']} "
                         f"w{cfg.num_warps} s{cfg.num_stages}{' pinned' if cfg in pinned else ''}")
                variants = [("", values)]
                # The opt-in TMA path (FUSEDLM_TRITON_TMA) of each kernel (dK/dV's: one head).
                variants.append((" tma", dict(values, TMA=True)))
                variants += [(suffix, dict(values, **flags)) for suffix, flags in classes
                             if cfg in kept[suffix]]
                if i == 0:  # every flash-attn extra at once: the most registers they take
                    variants.append((" window+softcap+alibi", dict(values, WINDOW=True,
                                                                   SOFTCAP=True, HAS_ALIBI=True,
                                                                   win_left=4095, cap=72.1)))
                    if name.startswith("dkdv"):
                        variants.append((" gqa", dict(values, group=4, GROUPED=True)))
                for suffix, v in variants:
                    cases.append((f"attention {name}", label + suffix, fn, v, cfg.num_warps,
                                  cfg.num_stages))
    # The atomic-dQ backward's first pass (delta, and the dQ accumulator zeroed): one program per
    # DELTA_BLOCK_M rows of a head, as the launcher gives it.
    for d in HEAD_DIMS:
        values = dict(_ptrs(("O", "DO"), "bf16"), DELTA="*fp32", DQ_ACC="*fp32", CU_Q="*i32",
                      CU_K="*i32", s_lb=12 * 2048, s_lh=2048, seq_q=2048, seq_k=2048, n_heads=12,
                      HEAD_DIM=d, BLOCK_D=d, BLOCK_M=A.DELTA_BLOCK_M, IS_VARLEN=False)
        values.update({f"s_{t}{x}": _bshd_stride(x, d) for t in ("o", "do", "acc") for x in "bsh"})
        cases.append(("attention delta", f"d{d} M{A.DELTA_BLOCK_M}", A._attn_bwd_delta, values, 4, 1))
    return cases


# Scalars that give a flag's code something to do when --every-flag turns it on.
_FLAG_SCALARS = {"DROPOUT": {"p_drop": 0.1}, "WINDOW": {"win_left": 100}, "SOFTCAP": {"cap": 30.0},
                 "GROUPED": {"group": 4}, "SMOOTH": {"smoothing": 0.1}}


_CASES = []  # what _compile_all's worker processes compile, inherited through fork


def _compile_case(i):
    """(facts, None) or (None, what the compile error says) for _CASES[i]."""
    kernel, label, fn, values, warps, stages = _CASES[i]
    try:
        return compile_triton(fn, values, warps, stages), None
    except Exception as e:  # noqa: BLE001 (a compile error is a finding, reported by the caller)
        return None, _first_error_line(e)


def _compile_all(cases):
    """_compile_case over `cases`, one process per core (each compile is one Python thread and a
    ptxas run: CI's two cores take twice the cases a second)."""
    import multiprocessing
    _CASES[:] = cases
    jobs = min(len(cases), os.cpu_count() or 1)
    if jobs <= 1:
        return [_compile_case(i) for i in range(len(cases))]
    with multiprocessing.get_context("fork").Pool(jobs) as pool:
        return pool.map(_compile_case, range(len(cases)), chunksize=1)


def _first_error_line(exc):
    """What a Triton compile error says is wrong: its innermost cause (each level above it
    quotes the source around the call it failed in)."""
    while exc.__cause__ is not None:
        exc = exc.__cause__
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    said = [line for line in lines if re.match(r"\w+(Error|Exception)\b", line)]
    return (said[-1] if said else f"{type(exc).__name__}: {(lines or [''])[-1]}")[:300]


def flag_cases():
    """--every-flag: each kernel's first listed case per class (its first word: the head dim or
    dtype) with each boolean constexpr flipped alone. Triton's compiler, unlike the interpreter
    that CI runs the kernels in, compiles the code after a constexpr branch's early return, and
    a flag whose code only the GPU machine compiles fails there first (dK/dV's transposed
    dropout mask did, at BLOCK_M != BLOCK_N)."""
    seen = set()
    for kernel, label, fn, values, warps, stages in triton_cases():
        if (kernel, label.split()[0]) in seen:
            continue
        seen.add((kernel, label.split()[0]))
        for p in fn.params:
            on = values[p.name]
            if p.is_constexpr and isinstance(on, bool):
                flipped = dict(values, **{p.name: not on}, **({} if on else _FLAG_SCALARS.get(p.name, {})))
                yield kernel, f"{label} {p.name}={not on}", fn, flipped, warps, stages


# --- CUDA C++ -----------------------------------------------------------------------------

def cuda_facts(arch, nvcc):
    """Per kernel of every csrc/*.cu a CUDA build compiles: registers, spills, smem and SASS
    counts at `arch` (csrc/emu/, the CPU emulator's, is never compiled by nvcc)."""
    cu_files = sorted(p for p in (ROOT / "csrc").rglob("*.cu") if "emu" not in p.relative_to(ROOT / "csrc").parts)
    defines = ["-DFUSEDLM_WITH_CUDA=1"] + (["-DFUSEDLM_HAS_SM90A=1"] if arch == "sm_90a" else [])
    rows = []
    with tempfile.TemporaryDirectory() as d:
        for cu in cu_files:
            obj = Path(d) / (cu.stem + ".o")
            out = subprocess.run([nvcc, "-std=c++17", "-O3", f"-arch={arch}",
                                  "--expt-relaxed-constexpr", "-Xptxas", "-v", *defines,
                                  "-c", str(cu), "-o", str(obj)],
                                 capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"nvcc failed on {cu}:\n{(out.stdout + out.stderr)[-3000:]}")
            usage = _parse_ptxas(out.stderr)
            serial = serialized_wgmma(out.stderr)
            sass = _sass_by_function(obj)
            for mangled, (regs, spill, smem) in usage.items():
                rows.append(dict(kernel=_demangle(mangled), file=str(cu.relative_to(ROOT)),
                                 regs=regs, spill=spill, serial=int(mangled in serial), smem=smem,
                                 **sass.get(mangled, dict.fromkeys(SASS_COUNTS, 0))))
    return rows


def default_archs():
    """The architectures the default build compiles for (CMakeLists.txt's FUSEDLM_CUDA_ARCHS)."""
    m = re.search(r'set\(FUSEDLM_CUDA_ARCHS "([^"]+)"', (ROOT / "CMakeLists.txt").read_text())
    return [f"sm_{a}" for a in m.group(1).split(";")]


def _parse_ptxas(text):
    """mangled kernel name -> (registers, spill bytes, static smem) from nvcc -Xptxas -v."""
    usage, current, spill = {}, None, 0
    for line in text.splitlines():
        m = re.search(r"Compiling entry function '(\w+)'", line)
        if m:
            current, spill = m.group(1), 0
            continue
        m = SPILL_LINE.search(line)
        if m and current:
            spill = int(m.group(1)) + int(m.group(2))
        m = re.search(r"Used (\d+) registers", line)
        if m and current:
            smem = re.search(r"(\d+) bytes smem", line)  # static only: dynamic is set at launch
            usage[current] = (int(m.group(1)), spill, int(smem.group(1)) if smem else 0)
            current = None
    return usage


def _sass_by_function(obj):
    out = subprocess.run([_triton_tool("cuobjdump") or "cuobjdump", "-sass", str(obj)],
                         capture_output=True, text=True, check=True).stdout
    counts = {}
    for block in re.split(r"\n\s*Function : ", out)[1:]:
        name, body = block.split("\n", 1)
        counts[name.strip()] = _counts(body)
    return counts


def _demangle(name):
    """kernel<template arguments>, without namespaces, return type and parameter list."""
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if tool is None:
        return name
    full = subprocess.run([tool, name], capture_output=True, text=True).stdout.strip()
    full = re.sub(r"(\w+::|\(anonymous namespace\)::)", "", re.sub(r"^void ", "", full))
    return re.sub(r"\([^()]*\)$", "", full)  # the parameter list


# --- Report -------------------------------------------------------------------------------

COLUMNS = ["regs", "spill", "serial", "smem", *SASS_COUNTS]


def _table(rows, first):
    head = [first, "config", *COLUMNS]
    lines = [[str(r.get(h, "")) for h in head] for r in rows]
    widths = [max([len(h)] + [len(line[i]) for line in lines]) for i, h in enumerate(head)]
    fmt = lambda cells: "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()  # noqa: E731
    return "\n".join([fmt(head), fmt(["-" * w for w in widths]), *map(fmt, lines)])


def spills_over(spills, allowed):
    """The kernel configurations that spill more bytes than `allowed` lets them (0 if absent)."""
    return [f"{n}: {b} bytes (allowed {allowed.get(n, 0)})" for n, b in spills.items()
            if b > allowed.get(n, 0)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--only", choices=("triton", "cuda"), help="one kind of kernel only")
    ap.add_argument("--archs", nargs="+", default=default_archs(),
                    help="CUDA C++ targets (default: the build's, CMakeLists.txt's "
                         "FUSEDLM_CUDA_ARCHS)")
    ap.add_argument("--match", default="", help="Triton: only the cases whose 'kernel config' "
                    "contains this text")
    ap.add_argument("--every-flag", action="store_true",
                    help="Triton: instead of the listed cases, each kernel's first one with each "
                         "boolean constexpr flipped alone; exit 1 if any fails to compile")
    ap.add_argument("--json", help="write the facts and their provenance here")
    ap.add_argument("--fail-on-spills", action="store_true",
                    help="exit 1 if any kernel listed spills")
    ap.add_argument("--fail-on-serialized-wgmma", action="store_true",
                    help="exit 1 if ptxas serialized any kernel's wgmma instructions")
    ap.add_argument("--spill-baseline", metavar="JSON",
                    help="exit 1 if a kernel spills more than this file allows it (a kernel "
                         "not in it: 0 bytes): a change may remove spills, never add them")
    ap.add_argument("--write-spill-baseline", metavar="JSON",
                    help="write the spills seen now as the baseline")
    args = ap.parse_args(argv)
    os.environ.pop("TRITON_INTERPRET", None)  # compile for the GPU, never interpret
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9 warns when unset
    report = {"command": " ".join([Path(sys.argv[0]).name, *(argv or sys.argv[1:])]),
              "commit": _commit(), "triton": [], "cuda": {}}
    failed = []  # --every-flag: the variants that do not compile
    if args.only in (None, "triton"):
        import triton
        report["triton_version"] = triton.__version__
        cases = [c for c in (flag_cases() if args.every_flag else triton_cases())
                 if args.match in f"{c[0]} {c[1]}"]
        for (kernel, label, *_), (row, error) in zip(cases, _compile_all(cases)):
            if error is not None:
                if not args.every_flag:
                    raise RuntimeError(f"Triton {kernel} {label}: {error}")
                failed.append(f"Triton {kernel} {label}: {error}")
            else:
                report["triton"].append(dict(kernel=kernel, config=label, **row))
        print(f"Triton {triton.__version__} kernels, sm_90a:")
        print(_table(report["triton"], "kernel"))
        if args.every_flag:
            print(f"\n{len(failed)} kernel variant(s) fail to compile" +
                  (":\n  " + "\n  ".join(failed) if failed else ""))
    if args.only in (None, "cuda"):
        nvcc = shutil.which("nvcc")
        if nvcc is None:
            print("\nCUDA C++: no nvcc on this machine, not compiled")
        archs = [a if a.startswith("sm_") else f"sm_{a}" for a in (args.archs if nvcc else ())]  # "90a" as CMake spells it
        # One nvcc per architecture at once: each compiles on one core, and the unrolled
        # attention kernels take it 30 s a file (CI has two cores).
        with ThreadPoolExecutor(max_workers=max(1, min(len(archs), os.cpu_count() or 1))) as pool:
            per_arch = list(pool.map(lambda arch: cuda_facts(arch, nvcc), archs))
        for arch, rows in zip(archs, per_arch):
            report["cuda"][arch] = rows
            print(f"\nCUDA C++ kernels ({_nvcc_version(nvcc)}), {arch}:")
            print(_table([dict(r, config="") for r in rows], "kernel"))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=1))
    spills = {f"Triton {r['kernel']} {r['config']}": r["spill"] for r in report["triton"]}
    spills.update({f"CUDA C++ {arch} {r['kernel']}": r["spill"]
                   for arch, rows in report["cuda"].items() for r in rows})
    spilled = [name for name, b in spills.items() if b]
    print(f"\n{len(spilled)} kernel configuration(s) spill" + (":\n  " + "\n  ".join(spilled)
                                                                if spilled else ""))
    if args.write_spill_baseline:
        Path(args.write_spill_baseline).write_text(json.dumps(
            {"what": "bytes each kernel configuration may spill (benchmarks/kernel_facts.py "
                     "--spill-baseline): the known spills, to be removed, never added to",
             "commit": report["commit"], "triton_version": report.get("triton_version"),
             "spills": {n: spills[n] for n in spilled}}, indent=1) + "\n")
    serialized = [f"Triton {r['kernel']} {r['config']}" for r in report["triton"] if r["serial"]]
    serialized += [f"CUDA C++ {arch} {r['kernel']}" for arch, rows in report["cuda"].items() for r in rows
                   if r["serial"]]
    print(f"{len(serialized)} kernel configuration(s) with serialized wgmma" +
          (":\n  " + "\n  ".join(serialized) if serialized else ""))
    worse = []
    if args.spill_baseline:
        allowed = json.loads(Path(args.spill_baseline).read_text())["spills"]
        worse = spills_over(spills, allowed)
        print(f"{len(worse)} spill more than {args.spill_baseline} allows" +
              (":\n  " + "\n  ".join(worse) if worse else ""))
    return 1 if (args.fail_on_spills and spilled) or (args.fail_on_serialized_wgmma and serialized) or worse or failed else 0


def _commit():
    out = subprocess.run(["git", "-C", str(ROOT), "rev-parse", "--short", "HEAD"],
                         capture_output=True, text=True)
    return out.stdout.strip() or None


def _nvcc_version(nvcc):
    out = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+)", out)
    return f"nvcc {m.group(1)}" if m else "nvcc"


if __name__ == "__main__":
    sys.exit(main())
