"""The demo's accuracy over seeds: `fusedlm pretrain` at its default settings for each seed, both
implementations, and a table of what a user would judge it by (next-sentence, masked-LM and
fine-tuned accuracy, whether fine-tuning spiked after it converged, the curve gap).

    python benchmarks/demo_seeds.py --seeds 0-9 --jobs 2 > table.md

Each seed runs in its own process with one thread (--jobs of them at a time), so the numbers
are the same on any machine with the same torch; a run with more threads rounds differently.
"""
import argparse
import json
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor

# A fine-tuning "spike": a batch loss above SPIKE after the 10-step mean first fell below LOW.
LOW, SPIKE = 0.05, 0.3


def one(seed):
    import torch
    torch.set_num_threads(1)
    from fusedlm.demo import Settings, run
    r = run(Settings(seed=seed, out=None, progress=False), log=lambda *a, **k: None)
    row = dict(seed=seed, gap=r["curve_gap"], agree=r["curves_agree"])
    for name, res in r["results"].items():
        ft = [c["loss"] for c in res["finetune_curve"]]
        low = next((i + 10 for i in range(len(ft) - 9) if sum(ft[i:i + 10]) / 10 < LOW), len(ft))
        row[name] = dict(nsp=res["nsp_accuracy"], mlm=res["mlm_accuracy"],
                         finetune=res["finetune_accuracy"], converged_at=low,
                         spikes=sum(v > SPIKE for v in ft[low:]))
    return row


def table(rows):
    head = ("| seed | next sentence, fusedlm / HF | masked LM, fusedlm / HF | fine-tuned, fusedlm / HF "
            f"| fine-tune mean loss < {LOW} from step | batch losses > {SPIKE} after that | curve gap, first quarter |")
    lines = [head, "|" + "---|" * 7]
    pct = lambda a, b: f"{100 * a:.1f}% / {100 * b:.1f}%"  # noqa: E731
    for r in sorted(rows, key=lambda r: r["seed"]):
        f, h = r["fused"], r["reference"]
        lines.append(f"| {r['seed']} | {pct(f['nsp'], h['nsp'])} | {pct(f['mlm'], h['mlm'])} | "
                     f"{pct(f['finetune'], h['finetune'])} | {f['converged_at']} / {h['converged_at']} | "
                     f"{f['spikes']} / {h['spikes']} | {r['gap']:.4f} |")
    return "\n".join(lines)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seeds", default="0-9", help="a range a-b or a comma list (%(default)s)")
    p.add_argument("--jobs", type=int, default=2)
    p.add_argument("--one", type=int, help=argparse.SUPPRESS)  # a worker: one seed, JSON out
    a = p.parse_args()
    if a.one is not None:
        print(json.dumps(one(a.one)))
        return
    if "-" in a.seeds:
        lo, hi = map(int, a.seeds.split("-"))
        seeds = list(range(lo, hi + 1))
    else:
        seeds = [int(s) for s in a.seeds.split(",")]

    def worker(seed):
        out = subprocess.run([sys.executable, __file__, "--one", str(seed)], check=True,
                             capture_output=True, text=True).stdout
        return json.loads(out.strip().splitlines()[-1])
    with ThreadPoolExecutor(a.jobs) as pool:
        rows = list(pool.map(worker, seeds))
    print(table(rows))


if __name__ == "__main__":
    main()
