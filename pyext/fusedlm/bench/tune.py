"""Measured dispatch tables from benchmark timings (`fusedlm bench <op> --tune FILE`).

Each op's benchmark sums its own timings per (group, size) and backend (`timings`): the group
is the case fields an entry holds fixed (the dtype; for attention also the head dim and causal),
the size the one it buckets. `entries` turns them into table entries (see fusedlm.ops.dispatch):
per group, fusedlm's backends in order of measured time, one entry per measured size, covering
the sizes above the previous measured one up to it (from 1 for the first); sizes past the
largest measured keep the fixed order.
"""
import json
import os

from ..ops import dispatch


def fusedlm_backend(impl):
    """'triton' for a record of impl 'fusedlm[triton]'; None for a peer or a variant
    ('fusedlm[triton], capacity')."""
    if impl.startswith("fusedlm[") and impl.endswith("]") and impl.count("[") == 1:
        return impl[len("fusedlm["):-1]
    return None


def entries(op, size_field, timings, arch, source, kernels=None):
    """timings: {(group, size): {backend: ms}} -> the entries of `op` for GPU `arch`, the size
    bucketed under the case field `size_field`; a group is a tuple of (case field, value) pairs.
    kernels: {(group, size): {field: kernel family}} for the entries that name one
    (dispatch.KERNEL_FIELDS: cuda_kernels, triton_kernels)."""
    out = []
    for group in sorted({g for g, _ in timings}):
        lo = 1
        for size in sorted(s for g, s in timings if g == group):
            per = timings[(group, size)]
            if per:
                order = sorted(per, key=per.get)
                e = dict(arch=arch, op=op, case={**dict(group), size_field: [lo, size]},
                         order=order, ms={b: round(per[b], 5) for b in order}, source=source)
                e.update((kernels or {}).get((group, size), {}))
                out.append(e)
            lo = size + 1
    return out


def write_table(path, new_entries):
    """Merge `new_entries` into the measured table at `path` (created if missing): an entry for
    the same architecture, op and case replaces the old one; other ops' entries stay."""
    table = {"about": "fusedlm measured dispatch table (see fusedlm/ops/dispatch.py)", "entries": []}
    if os.path.exists(path):
        with open(path) as f:
            table = json.load(f)
        dispatch.check_table(table, path)
    key = lambda e: (e["arch"], e["op"], json.dumps(e["case"], sort_keys=True))  # noqa: E731
    new = {key(e) for e in new_entries}
    table["entries"] = [e for e in table["entries"] if key(e) not in new] + list(new_entries)
    with open(path, "w") as f:
        json.dump(table, f, indent=1)
        f.write("\n")
    return table
