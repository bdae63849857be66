"""Backend selection shared by every op.

Three ways to choose, strongest first:
  * `backend=` on the call: strict. If that backend cannot serve the case, the call raises
    a ValueError naming `backend` and the reason; it never falls back behind the caller's back.
  * `FUSEDLM_BACKEND` in the environment: a preference for the whole process. Where it cannot
    serve a case, the call falls back to the automatic choice and the decision records why.
  * automatic: the first backend in the op's order of preference that serves the case and is
    verified for that device (a CUDA C++ kernel is not chosen automatically until the GPU suite
    has passed for it). On a GPU, a measured table (`measured_dispatch.json` beside this file,
    or the file FUSEDLM_DISPATCH_TABLE names) may put another order first for a GPU
    architecture, op and case bucket: written by `fusedlm bench layer_norm --tune FILE` (per
    dtype and width), `fusedlm bench lm_loss --tune FILE` (per dtype and vocabulary) and
    `fusedlm bench attention --tune FILE` (per dtype, head dim, causal and sequence length;
    an entry there may also name the CUDA C++ kernel family, `cuda_kernels`, and the Triton
    backward's, `triton_kernels`) from timings on that GPU; the fixed order is the fallback for
    every case it does not cover.

A case is each op's own NamedTuple (`NormCase`, `LossCase`, `AttentionCase`, defined beside
the op): the facts its backends' limits depend on, starting with the device type; callers pass
its values as a plain tuple (see `select`). Every decision
is cached per case so that the eager hot path pays a dict look-up, and the last decision per op
is kept for `fusedlm.explain`.
"""
import json
import os
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Tuple

BACKENDS = ("torch", "triton", "cuda")
ENV_VAR = "FUSEDLM_BACKEND"
TABLE_ENV_VAR = "FUSEDLM_DISPATCH_TABLE"
TABLE_PATH = os.path.join(os.path.dirname(__file__), "measured_dispatch.json")
# An entry's optional choices within a backend, by measured speed: attention's CUDA C++ kernel
# families and the Triton backward's dQ (its own kernel, or atomics from dK/dV); see
# ops/attention_kernels.py.
CUDA_KERNEL_FAMILIES = ("mma", "wgmma")
TRITON_KERNEL_FAMILIES = ("dq", "atomic-dq")
KERNEL_FIELDS = {"cuda_kernels": CUDA_KERNEL_FAMILIES, "triton_kernels": TRITON_KERNEL_FAMILIES}


@dataclass(frozen=True)
class Decision:
    op: str
    backend: str
    source: str  # "argument", "FUSEDLM_BACKEND" or "auto"
    skipped: Tuple[Tuple[str, str], ...] = ()  # (backend, why it was not used)
    case: Optional[tuple] = field(default=None, compare=False)
    measured: Optional[str] = None  # the measured-table entry that ordered the choice

    def __str__(self):
        lines = [f"{self.op}: ran on '{self.backend}' (chosen by {self.source})"]
        if self.measured:
            lines.append(f"  order from the measured table: {self.measured}")
        lines += [f"  '{b}' not used: {why}" for b, why in self.skipped]
        return "\n".join(lines)


@dataclass
class OpBackends:
    """What one op offers: per backend a function case -> None (serves it) or a reason string."""
    name: str
    case_type: type  # the op's NamedTuple of case facts
    supports: Dict[str, Callable[[tuple], Optional[str]]]
    # Automatic order on a CUDA device, best first, ending with "torch"; off a CUDA device the
    # automatic choice is always "torch" (the others are listed with the reason).
    cuda_order: Tuple[str, ...]
    # Backends verified on a GPU for this op. Others are never chosen automatically.
    gpu_verified: Tuple[str, ...]
    # Per verified backend, case -> None or the part of it that has not run on a GPU yet (a
    # feature added since the GPU suite passed): such cases are not chosen automatically either.
    unverified_cases: Dict[str, Callable[[tuple], Optional[str]]] = field(default_factory=dict)
    _cache: Dict[tuple, Decision] = field(default_factory=dict)

    def why_not(self, backend, case):
        if backend not in self.supports:
            return f"'{backend}' has no implementation of {self.name}"
        return self.supports[backend](self.case_type(*case))


_OPS: Dict[str, OpBackends] = {}
_LAST: Dict[str, Decision] = {}


def register(op: OpBackends) -> OpBackends:
    if op.cuda_order[-1:] != ("torch",) or "torch" not in op.gpu_verified:
        raise ValueError(f"{op.name}: cuda_order must end with 'torch' and gpu_verified hold it")
    _OPS[op.name] = op
    return op


def why_not(op_name: str, backend: str, case: tuple) -> Optional[str]:
    """None if `backend` can serve `case` of op `op_name` in this process (the device, the
    build, the kernels' limits), else the reason; `case` is the op's case tuple, e.g.
    ("cuda", torch.bfloat16, 64) for attention. Says nothing about GPU verification."""
    if op_name not in _OPS:
        raise ValueError(f"op_name must be one of {sorted(_OPS)}, got {op_name!r}")
    _check_name(backend, "backend")
    return _OPS[op_name].why_not(backend, case)


def _check_name(name, what):
    if name not in BACKENDS:
        raise ValueError(f"{what} must be one of {', '.join(BACKENDS)} or None, got {name!r}")


# ---- the measured table -----------------------------------------------------------------------

def _matches(entry_case: dict, case) -> bool:
    """An entry's case: field -> a value (equal, dtypes by name) or [lo, hi] (inclusive)."""
    for name, want in entry_case.items():
        got = getattr(case, name)
        got = str(got).replace("torch.", "") if not isinstance(got, (int, float, str)) else got
        if isinstance(want, list):
            if not (isinstance(got, (int, float)) and want[0] <= got <= want[1]):
                return False
        elif got != want:
            return False
    return True


def check_table(table: dict, where: str) -> List[dict]:
    """The entries of a measured table, or ValueError naming what is wrong with it."""
    entries = table.get("entries") if isinstance(table, dict) else None
    if not isinstance(entries, list):
        raise ValueError(f"{where}: a measured dispatch table is a JSON object with a list "
                         "'entries'")
    for i, e in enumerate(entries):
        keys = {"arch", "op", "case", "order"}
        if not isinstance(e, dict) or not keys <= set(e) or not isinstance(e["case"], dict):
            raise ValueError(f"{where}: entry {i} needs {sorted(keys)} with 'case' an object")
        if not e["order"] or any(b not in BACKENDS for b in e["order"]):
            raise ValueError(f"{where}: entry {i}'s order must name backends of {BACKENDS}, "
                             f"got {e['order']!r}")
        for name, families in KERNEL_FIELDS.items():
            if e.get(name, families[0]) not in families:
                raise ValueError(f"{where}: entry {i}'s {name} must be one of {families}, "
                                 f"got {e[name]!r}")
    return entries


_TABLE: Optional[List[dict]] = None


def table_entries() -> List[dict]:
    """The measured table in force (read once per process; clear_cache() rereads it)."""
    global _TABLE
    if _TABLE is None:
        path = os.environ.get(TABLE_ENV_VAR) or TABLE_PATH
        if not os.path.exists(path):
            if path != TABLE_PATH:
                raise ValueError(f"{TABLE_ENV_VAR}={path}: no such file")
            _TABLE = []
        else:
            with open(path) as f:
                _TABLE = check_table(json.load(f), path)
    return _TABLE


def _arch() -> str:
    import torch
    major, minor = torch.cuda.get_device_capability()
    return f"sm_{major}{minor}"


def _measured_entry(op_name, case):
    """The first table entry for this GPU, op and case, or None."""
    entries = [e for e in table_entries() if e["op"] == op_name]
    if not entries:
        return None
    arch = _arch()
    return next((e for e in entries if e["arch"] == arch and _matches(e["case"], case)), None)


def _measured_order(op_name, case):
    """(order, description) of the first table entry for this GPU, op and case, or (None, None)."""
    e = _measured_entry(op_name, case)
    if e is None:
        return None, None
    times = ", ".join(f"{b} {ms:.4g} ms" for b, ms in e.get("ms", {}).items())
    bucket = ", ".join(f"{k} {v[0]}-{v[1]}" if isinstance(v, list) else f"{k} {v}"
                       for k, v in e["case"].items())
    kernels = "".join(f" ({name.split('_')[0]}: the {e[name]} kernels)"
                      for name in KERNEL_FIELDS if name in e)
    return tuple(e["order"]), (f"{e['arch']}, {bucket}" + (f": {times}" if times else "") + kernels
                               + (f" ({e['source']})" if e.get("source") else ""))


def _auto(op: OpBackends, case, skipped):
    order, measured = (None, None)
    if case.device_type == "cuda":
        order, measured = _measured_order(op.name, case)
    if order is not None:  # the table's order first, then the fixed order for what it omits
        order = tuple(order) + tuple(b for b in op.cuda_order if b not in order)
    for b in order or op.cuda_order:  # ends with "torch", which serves every case (see register)
        why = op.why_not(b, case)
        if why is None and b != "torch":
            if case.device_type != "cuda":
                why = "off a CUDA device, automatic dispatch runs the reference"
            elif b not in op.gpu_verified:
                why = f"not yet verified on a GPU, so never chosen automatically; pass backend='{b}'"
            elif (part := op.unverified_cases.get(b, lambda case: None)(case)) is not None:
                why = (f"{part} has not run on a GPU yet, so it is never chosen automatically; "
                       f"pass backend='{b}'")
        if why is None:
            return b, measured
        skipped.append((b, why))
    raise RuntimeError(f"{op.name}: no backend serves this case: {skipped}")


def _constant_under_compile(fn):
    """What torch.compiler.assume_constant_result does (torch.compile calls `fn` at trace time
    and keeps its answer), without importing torch._dynamo at `import fusedlm`: that loads
    triton, which must not happen before a program chooses TRITON_INTERPRET. A fresh-process
    test (tests/test_compile.py) checks that torch still honours the mark."""
    fn._dynamo_marked_constant = True
    return fn


# A decision depends only on its (constant) arguments and the process: torch.compile calls it
# at trace time and keeps the answer, instead of tracing what deciding does (importing the Triton
# kernels, asking the compiled core), which it cannot trace when a case is first seen there.
@_constant_under_compile
def select(op_name: str, case: tuple, backend: Optional[str] = None) -> str:
    """Return the backend name for this call; raise ValueError if `backend` cannot serve it.
    `case`: the values of the op's case NamedTuple, in its field order, as a plain tuple (a
    NamedTuple built in a compiled function does not survive torch.compile's constant call:
    dynamo rebuilds it wrongly), typed here on a cache miss."""
    env = os.environ.get(ENV_VAR) or None
    key = (case, backend, env)
    op = _OPS[op_name]
    decision = op._cache.get(key)
    if decision is None:
        decision = _decide(op, op.case_type(*case), backend, env)
        op._cache[key] = decision
    _LAST[op_name] = decision
    return decision.backend


def _decide(op, case, backend, env):
    skipped = []
    if backend is not None:
        _check_name(backend, "backend")
        why = op.why_not(backend, case)
        if why is not None:
            raise ValueError(f"backend='{backend}' cannot run {op.name} here: {why}")
        return Decision(op.name, backend, "argument", (), case)
    if env is not None:
        _check_name(env, ENV_VAR)
        why = op.why_not(env, case)
        if why is None:
            return Decision(op.name, env, ENV_VAR, (), case)
        skipped.append((env, why))
    chosen, measured = _auto(op, case, skipped)
    return Decision(op.name, chosen, ENV_VAR if env and chosen == env else "auto",
                    tuple(s for s in skipped if s[0] != chosen), case, measured)


_KERNELS: Dict[tuple, Optional[str]] = {}


@_constant_under_compile
def measured_kernels(op_name: str, case: tuple, field: str) -> Optional[str]:
    """The kernel family that the measured table's entry for this GPU, op and case names in
    `field` ("cuda_kernels": "mma" or "wgmma"; "triton_kernels": "dq" or "atomic-dq"), or None
    (no entry, no such field, not a CUDA case). `case` as for `select`; cached per case."""
    if field not in KERNEL_FIELDS:
        raise ValueError(f"field must be one of {tuple(KERNEL_FIELDS)}, got {field!r}")
    key = (op_name, case, field)
    if key not in _KERNELS:
        op = _OPS[op_name]
        typed = op.case_type(*case)
        e = _measured_entry(op_name, typed) if typed.device_type == "cuda" else None
        _KERNELS[key] = None if e is None else e.get(field)
    return _KERNELS[key]


def explain(op_name: Optional[str] = None):
    """The last dispatch decision of `op_name` (or of every op, as a dict)."""
    if op_name is None:
        return dict(_LAST)
    if op_name not in _OPS:
        raise ValueError(f"op_name must be one of {sorted(_OPS)}, got {op_name!r}")
    return _LAST.get(op_name)


def clear_cache():
    """Forget every decision and the measured table (reread at the next decision)."""
    global _TABLE
    for op in _OPS.values():
        op._cache.clear()
    _LAST.clear()
    _KERNELS.clear()
    _TABLE = None
