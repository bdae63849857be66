"""Benchmark results as a terminal table, CSV and PNG plots.

Results are lists of flat dicts (one per op x case x implementation), as every benchmark module
returns them; these functions need no knowledge of the op beyond the plot layout below.
"""
import csv
import os
from collections import defaultdict
from typing import Dict, List

# op -> (x axis, y axis, keys that split the results into panels); series are implementations.
# A numeric x is drawn as lines over size, a textual one as grouped bars.
PLOTS = {
    "layer_norm": ("n", "gbps", ("direction", "dtype")),
    "attention": ("seq", "tflops", ("direction", "head_dim", "causal")),
    "attention/bert-padded": ("direction", "tflops_real", ()),
    "lm_loss": ("case", "tflops", ("dtype",)),
    "model": ("case", "tokens_per_s", ("padding",)),
    "custom": ("case", "ms", ()),
}
_LABELS = {"gbps": "GB/s", "tflops": "TFLOP/s", "tflops_real": "TFLOP/s (real tokens)",
           "tokens_per_s": "tokens/s", "ms": "ms", "n": "hidden size", "seq": "sequence length"}


def _kind(row):
    return row["op"] + ("/" + row["case"] if row.get("case") == "bert-padded" else "")


def _columns(rows):
    cols = []
    for r in rows:
        cols += [k for k in r if k not in cols]
    return cols


def _cell(v):
    if v is None:
        return "-"
    if isinstance(v, float):
        return f"{v:,.4g}" if abs(v) < 1e4 else f"{v:,.0f}"
    return str(v)


def table(results: List[Dict]) -> str:
    """Plain-text tables, one per op (and per row shape within it)."""
    groups = defaultdict(list)
    for r in results:
        groups[(_kind(r), tuple(_columns([r])))].append(r)
    out = []
    for (kind, _), rows in groups.items():
        cols = [c for c in _columns(rows) if c != "op"]
        cells = [[_cell(r.get(c)) for c in cols] for r in rows]
        widths = [max(len(c), *(len(row[i]) for row in cells)) for i, c in enumerate(cols)]
        # numbers right-aligned, text left-aligned
        right = [all(isinstance(r.get(c), (int, float)) or r.get(c) is None for r in rows) for c in cols]
        line = lambda vals: "  ".join(v.rjust(w) if rj else v.ljust(w)  # noqa: E731
                                      for v, w, rj in zip(vals, widths, right)).rstrip()
        out += [f"{kind}:", line(cols), line(["-" * w for w in widths])] + [line(c) for c in cells] + [""]
    return "\n".join(out)


def write_csv(path: str, results: List[Dict]):
    """One CSV of every row; columns are the union of the rows' keys, empty where absent."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=_columns(results), restval="")
        w.writeheader()
        w.writerows(results)


def plot(path: str, results: List[Dict], title: str = "") -> List[str]:
    """PNG plots of speed against size, one file per op kind (`path` with the kind appended
    when there are several); returns the files written, [] without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    kinds = defaultdict(list)
    for r in results:
        kind = _kind(r)
        if kind in PLOTS and r.get(PLOTS[kind][1]) is not None:
            kinds[kind].append(r)
    stem, ext = os.path.splitext(path)
    written = []
    for kind, rows in kinds.items():
        x_key, y_key, facet_keys = PLOTS[kind]
        panels = defaultdict(list)
        for r in rows:
            panels[tuple(r.get(k) for k in facet_keys)].append(r)
        n = len(panels)
        cols = min(n, 3)
        fig, axes = plt.subplots((n + cols - 1) // cols, cols, figsize=(5 * cols, 3.6 * ((n + cols - 1) // cols)),
                                 squeeze=False)
        for ax, (facet, prow) in zip(axes.flat, panels.items()):
            impls = list(dict.fromkeys(r["impl"] for r in prow))
            xs = list(dict.fromkeys(r[x_key] for r in prow))
            numeric = all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in xs)
            for i, impl in enumerate(impls):
                pts = {r[x_key]: r[y_key] for r in prow if r["impl"] == impl}
                if numeric:
                    xv = sorted(pts)
                    ax.plot(xv, [pts[x] for x in xv], marker="o", label=impl)
                else:
                    width = 0.8 / len(impls)
                    ax.bar([j + i * width for j, x in enumerate(xs) if x in pts],
                           [pts[x] for x in xs if x in pts], width, label=impl)
            if numeric:
                if len(xs) > 1 and max(xs) / max(min(xs), 1e-9) >= 8:
                    ax.set_xscale("log", base=2)
            else:
                ax.set_xticks([j + 0.4 - 0.4 / len(impls) for j in range(len(xs))], [str(x) for x in xs])
            ax.set(xlabel=_LABELS.get(x_key, x_key), ylabel=_LABELS.get(y_key, y_key),
                   title=", ".join(f"{k}={v}" for k, v in zip(facet_keys, facet)) or kind)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[n:]:
            ax.axis("off")
        fig.suptitle(f"{kind}: {title}" if title else kind)
        fig.tight_layout()
        out = path if len(kinds) == 1 else f"{stem}-{kind.replace('/', '-')}{ext or '.png'}"
        fig.savefig(out, dpi=110)
        plt.close(fig)
        written.append(out)
    return written
