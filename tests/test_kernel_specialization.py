"""Arguments that change from call to call in training (a batch's longest sequence, a packed
batch's row count, the dropout seed) must not be ones Triton specializes its compiled kernels on
(divisible by 16, equal to 1): each new value class would compile another variant, seconds in
the middle of a run. Checked on the kernels as Triton compiles them, outside the interpreter."""
import json
import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

PER_CALL = {
    "fusedlm.kernels.attention": {"_attn_fwd": {"seq_q", "seq_k", "seed"},
                                  "_attn_bwd_dkdv": {"seq_q", "seq_k", "seed"},
                                  "_attn_bwd_dq": {"seq_q", "seq_k", "seed"}},
    "fusedlm.kernels.layer_norm": {"_norm_bwd_kernel": {"n_rows", "rows_per_program"}},
}

_PROBE = """
import importlib, json, sys
out = {}
for module, kernels in json.loads(sys.argv[1]).items():
    mod = importlib.import_module(module)
    for name in kernels:
        out[name] = [p.name for p in getattr(mod, name).params if p.do_not_specialize]
print(json.dumps(out))
"""


def test_per_call_arguments_are_not_specialized_on():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # the compiled JIT
    names = {m: list(k) for m, k in PER_CALL.items()}
    run = subprocess.run([sys.executable, "-c", _PROBE, json.dumps(names)], env=env,
                         capture_output=True, text=True, timeout=120)
    assert run.returncode == 0, run.stderr[-2000:]
    got = json.loads(run.stdout.splitlines()[-1])
    for kernels in PER_CALL.values():
        for name, want in kernels.items():
            assert want <= set(got[name]), (name, sorted(want - set(got[name])))
