"""The `fusedlm` command.

  fusedlm check              environment, correctness of every backend that can run here
                             against the float64 reference, and a short benchmark (speed-up
                             over torch on a GPU); exits 1 if any check fails
  fusedlm bench layer_norm   the full layer-norm benchmark, JSON with provenance
  fusedlm bench attention    attention, fwd and fwd+bwd TFLOP/s, against every SDPA backend,
                             flex_attention and flash-attn; a padded BERT batch, packed
  fusedlm bench model        a training step of BERT-base MLM+NSP and GPT-2 small: Hugging
                             Face eager, compiled, patched by fusedlm, fusedlm's own model
  fusedlm bench lm_loss      the fused LM loss against Hugging Face's full-logits path,
                             torch.compile, Liger-Kernel and Cut Cross-Entropy
  fusedlm bench mlp          the MLP (activation recomputed in the backward) against torch's
                             composition, eager and compiled: time and saved activations
  fusedlm bench all          every op above, then the model step
                             (each bench: a table; --out JSON, --csv, --plot PNG)
  fusedlm pretrain           pretrain a small BERT (masked LM + next sentence) on a generated
                             corpus, fine-tune it on a classification task; fusedlm and Hugging
                             Face side by side: loss curves, accuracy, speed (runs under torchrun)
  fusedlm demo               check, then pretrain: the README's first command
  fusedlm info               build and dispatch facts, one screen
"""
import argparse
import os
import sys

import torch

# Off a GPU the Triton kernels can only run under the interpreter, which must be chosen before
# triton decorates them (at `import fusedlm`); `check` then verifies them on the CPU too.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import fusedlm  # noqa: E402
from fusedlm.bench import environment, plot, table, write_csv, write_json  # noqa: E402
from fusedlm.bench.correctness import CHECKS, TOLERANCE  # noqa: E402
from fusedlm.bench import attention as attn_bench  # noqa: E402
from fusedlm.bench import mlp as mlp_bench  # noqa: E402
from fusedlm.bench import layer_norm as ln_bench  # noqa: E402
from fusedlm.bench import lm_loss as loss_bench  # noqa: E402
from fusedlm.bench import model as model_bench  # noqa: E402
from fusedlm.bench import host as host_bench  # noqa: E402
from fusedlm.ops import dispatch  # noqa: E402

_DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def _print_env(env):
    b = env["build"]
    print(f"fusedlm {env['fusedlm']}  torch {env['torch']}  triton {env['triton']}  "
          f"python {env['python']}")
    print(f"device: {env['device']}")
    if b.get("compiled_core"):
        cuda = f"CUDA {b['cuda_compiler']} for sm {b['cuda_archs']}" if b["cuda"] else "no CUDA"
        print(f"compiled core: {cuda}; {b['gpu_status']}")
    else:
        print(f"compiled core: not importable ({b.get('error')})")


def _fusedlm_impl(op, backend):
    """fusedlm's op on one backend, in the check's signature."""
    if op == "layer_norm":
        return lambda x, w, b, r: fusedlm.layer_norm(x, w, b, residual=r, backend=backend)
    if op == "lm_loss":
        return lambda h, w, b, y: fusedlm.lm_loss(h, w, y, b, z_loss=0.0, chunk_size=7, backend=backend)
    if op == "mlp":
        return lambda x, w1, b1, w2, b2: fusedlm.ops.mlp(x, w1, b1, w2, b2, backend=backend)
    # deterministic=True pins the kernels' block sizes: autotuning every candidate for a 37-token
    # check would spend most of a first GPU run compiling (the "no minutes lost").
    return lambda q, k, v, causal: fusedlm.attention(q, k, v, causal=causal, backend=backend,
                                                     deterministic=True)


# op -> (what is checked, dispatch case for (device, dtype), extra check arguments)
_CHECKS = {
    "layer_norm": ("layer_norm(x + residual), 37 x 1000", lambda d, t: (d, t, 1000, t),
                   dict(residual=True)),
    "lm_loss": ("lm_loss(hidden, weight, labels, bias), V=4099, 3 chunks", lambda d, t: (d, t, 4099), {}),
    "attention": ("attention(q, k, v), 2 x 37 x 4 x 64, causal and not", lambda d, t: (d, t, 64), {}),
    "mlp": ("ops.mlp(x, w1, b1, w2, b2), GELU, 37 x 48 -> 200", lambda d, t: (d, t), {}),
}


def cmd_check(args):
    env = environment()
    _print_env(env)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
    ok = True
    rows = []
    print("\ncorrectness: forward and backward against the float64 reference")
    for op, (what, case, extra) in _CHECKS.items():
        for backend in dispatch.BACKENDS:
            for dtype in dtypes:
                row = dict(op=what, backend=backend, dtype=str(dtype).split(".")[-1])
                why = dispatch.why_not(op, backend, case(device, dtype))
                if why is None:
                    passed, err = CHECKS[op](_fusedlm_impl(op, backend), device, dtype, **extra)
                    ok &= passed
                    row.update(result="PASS" if passed else "FAIL", max_rel_error=f"{err:.1e}",
                               tolerance=f"{TOLERANCE[dtype]:.0e}", why="")
                else:
                    row.update(result="skipped", max_rel_error="", tolerance="", why=why)
                rows.append(row)
    print(table(rows))
    x = torch.randn(4, 1000, device=device)
    fusedlm.layer_norm(x)
    print("\ndispatch for a default call:\n  " + str(fusedlm.explain("layer_norm")).replace("\n", "\n  "))

    if device == "cuda":
        print("\nbenchmark (bf16, 16384 rows; speed-up over torch eager):")
        kernels = [f"fusedlm[{b}]" for b in ("triton", "cuda")  # CUDA C++: only where built
                   if dispatch.why_not("layer_norm", b, ("cuda", torch.bfloat16, 1024, None)) is None]
        ln_bench.run(dtypes=(torch.bfloat16,), rows=(16384,), widths=(1024, 4096), peers=kernels)
        print("\nbenchmark: BERT-base masked-LM loss step, fwd+bwd (speed-up over the full-logits path):")
        loss_bench.run(cases=("bert-mlm",), peers=("fusedlm[triton]",))
    else:
        print("\nbenchmark: no GPU here, so the Triton and CUDA kernels cannot show their speed "
              "(the interpreter is for correctness only).\nOn this CPU, a masked-LM loss step, "
              "fwd+bwd, 15% of tokens labelled (speed-up over the full-logits path):")
        loss_bench.run(cases=("tiny",), dtype=torch.float32, peers=("fusedlm[torch]",))
    print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


def _bench_op(op, args, on_result):
    """Runs one op's benchmark, handing each result to on_result as it is measured."""
    gpu = torch.cuda.is_available()
    if op == "host":
        return host_bench.run(backends=args.backend, on_result=on_result)
    if op == "layer_norm":
        return ln_bench.run(dtypes=[_DTYPES[d] for d in args.dtype], rows=args.rows,
                            widths=args.widths, directions=args.direction,
                            dropout_p=args.dropout, on_result=on_result)
    if op == "mlp":
        return mlp_bench.run(cases=args.case, dtype=_DTYPES[args.dtype[0]], peers=args.impl,
                             on_result=on_result)
    if op == "model":
        return model_bench.run(cases=args.case, paddings=args.padding,
                               compiled=True if args.compiled else None, on_result=on_result)
    if op == "attention":
        dtype = _DTYPES[args.dtype[0]]
        attn_bench.run(seqlens=args.seq, head_dims=args.head_dim, tokens=args.tokens, dtype=dtype,
                       peers=args.impl, dropout_p=args.dropout, on_result=on_result)
        return attn_bench.run_padded_bert(dtype=dtype, peers=args.impl, on_result=on_result,
                                          **({} if gpu else dict(batch=2, seq=64, heads=2)))
    return loss_bench.run(cases=args.case, dtype=_DTYPES[args.dtype[0]], peers=args.impl,
                          chunk_rows=args.chunk_rows, on_result=on_result)


# Ops whose benchmark can write measured-dispatch entries: op -> (its entries maker, the size
# field of its case, what that size is).
_TUNABLE = {"layer_norm": (ln_bench.tune_entries, "columns", "columns"),
            "lm_loss": (loss_bench.tune_entries, "vocab", "vocabulary"),
            "attention": (attn_bench.tune_entries, "seq_k", "sequence length")}


def _tune(op, path, results, env):
    from fusedlm.bench import tune
    from fusedlm.ops.dispatch import _arch
    make, field, what = _TUNABLE[op]
    source = (f"fusedlm bench {op} on {env.get('device', 'a GPU')}, "
              f"commit {env.get('git_commit', 'unknown')}")
    entries = make(results, _arch(), source)
    if not entries:
        raise SystemExit(f"--tune: no {what} with fusedlm's backends timed")
    tune.write_table(path, entries)
    print(f"\nmeasured dispatch ({len(entries)} entries) written to {path}:")
    for e in entries:
        c = e["case"]
        group = " ".join(str(v) if k == "dtype" else f"{k} {v}" for k, v in c.items() if k != field)
        kernels = "".join(f" ({name.split('_')[0]}: {e[name]})"
                          for name in ("cuda_kernels", "triton_kernels") if name in e)
        print(f"  {e['arch']} {op} {group} {what} {c[field][0]}-{c[field][1]}: "
              + " < ".join(f"{b} ({e['ms'][b]:.4g} ms)" for b in e["order"]) + kernels)


def cmd_bench(args):
    env = environment()
    _print_env(env)
    payload = {"environment": env, "results": []}
    ops = (("layer_norm", "attention", "lm_loss", "mlp", "model", "host") if args.op == "all"
           else (args.op,))

    def measured(rec):
        # --out is rewritten as each result comes: a run cut short (gpu_run.sh gives each step a
        # time limit) leaves the results it measured, marked incomplete until the end.
        payload["results"].append(rec)
        if args.out:
            write_json(args.out, dict(payload, complete=False))
    for op in ops:
        print(f"\n== {op}")
        sub = _parser().parse_args(["bench", op]) if args.op == "all" else args  # each op on its defaults
        _bench_op(op, sub, measured)
        if op == "layer_norm":
            print("\nhost cost per call:")
            payload["overhead"] = ln_bench.dispatch_overhead()
        if getattr(args, "tune", None):
            _tune(op, args.tune, payload["results"], env)
    print("\n" + table(payload["results"]))
    if args.out:
        write_json(args.out, dict(payload, complete=True))
        print(f"wrote {args.out}")
    if args.csv:
        write_csv(args.csv, payload["results"])
        print(f"wrote {args.csv}")
    if args.plot:
        files = plot(args.plot, payload["results"], title=env["device"])
        print("wrote " + ", ".join(files) if files else "no plot: matplotlib is not installed "
              "(pip install 'fusedlm[demo]')")
    return 0


def _settings(args):
    from fusedlm.demo import Settings
    impls = {"both": ("fused", "reference"), "fused": ("fused",), "reference": ("reference",)}
    return Settings(steps=args.steps, finetune_steps=args.finetune_steps, batch=args.batch,
                    max_len=args.max_len, hidden=args.hidden, layers=args.layers, heads=args.heads,
                    vocab=args.vocab, lr=args.lr, finetune_lr=args.finetune_lr,
                    dropout=args.dropout, docs=args.docs, corpus=args.corpus, seed=args.seed,
                    dtype=args.dtype, impls=impls[args.impl], out=args.out, compile=args.compile,
                    progress=not args.no_progress)


def _pretrain(args):
    """-> (exit status, the run's report)."""
    from fusedlm.demo import run
    report = run(_settings(args))
    agree = report.get("curves_agree", True)
    if not agree:
        print("the fused and reference loss curves differ by more than the tolerance")
    return (0 if agree else 1), report


def cmd_pretrain(args):
    return _pretrain(args)[0]


def _verdict(check_status, report):
    """The demo's last line: what it showed, in one sentence."""
    parts = ["every kernel that runs here matches the float64 reference" if check_status == 0
             else "A CORRECTNESS CHECK FAILED (see the table above)"]
    if "curves_agree" in report:
        parts.append("fusedlm's BERT trains like Hugging Face's (the same loss curve)"
                     if report["curves_agree"] else "THE LOSS CURVES DIFFER from Hugging Face's")
        where = "on this GPU" if report["device"].startswith("cuda") else \
            "on this CPU, where the kernels cannot show their speed"
        parts.append(f"at {report['speedup']:.2f}x its tokens/s {where}")
    if "realistic_step" in report:
        ours, hf = report["realistic_step"]
        parts.append(f"a BERT-base training step runs {ours:.2f}x Hugging Face eager's speed "
                     f"(Hugging Face's best, compiled: {hf:.2f}x)")
    return "verdict: " + "; ".join(parts) + "."


# The GPU-size step the demo times on a GPU: Hugging Face eager and compiled against fusedlm's
# model on the same samples packed, eager and compiled with CUDA graphs.
_DEMO_STEP_IMPLS = ("hf eager (sdpa)", "hf torch.compile", "fusedlm model, packed",
                    "fusedlm model, packed, compiled + CUDA graphs")


def _realistic_step():
    """On a GPU: a BERT-base-shaped training step (12 layers, hidden 768, 16 x 512, 25%
    padding), fusedlm against Hugging Face; returns (fusedlm's best, HF's best) speed-up over HF
    eager, or None off a GPU (the tiny model's tokens/s above is host-bound there)."""
    if not torch.cuda.is_available():
        print("\n(no GPU: the realistic-size step, BERT-base 16 x 512, is timed only on one; the "
              "tiny model's tokens/s above is bound by the host, not the kernels)")
        return None
    print("\n== realistic-size training step: BERT-base MLM+NSP, 16 x 512, 25% padding, bf16")
    rows = model_bench.run(cases=("bert-base-demo",), paddings=(0.25,), compiled=True,
                           impls=_DEMO_STEP_IMPLS)
    ours = max((r["speedup_vs_hf_eager"] for r in rows if r["impl"].startswith("fusedlm")), default=None)
    hf = max((r["speedup_vs_hf_eager"] for r in rows if r["impl"].startswith("hf")), default=None)
    return None if ours is None or hf is None else (ours, hf)


def cmd_demo(args):
    print("== 1/2  is it correct here? (fusedlm check)")
    status = cmd_check(args)
    print("\n== 2/2  does it train a model? (fusedlm pretrain)")
    pretrain_status, report = _pretrain(args)
    step = _realistic_step()
    if step is not None:
        report = dict(report, realistic_step=step)
    print("\n" + _verdict(status, report))
    return max(status, pretrain_status)


def cmd_info(args):
    _print_env(environment())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for op, (_, case, _) in _CHECKS.items():
        for backend in dispatch.BACKENDS:
            why = dispatch.why_not(op, backend, case(device, dtype))
            print(f"  {op}/{backend:<7} {'available' if why is None else why}")
    return 0


def _positive(kind):
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a {kind.__name__}, got {text!r}")
        if value <= 0:
            raise argparse.ArgumentTypeError(f"expected a positive number, got {text}")
        return value
    return parse


def _fraction(text):
    value = float(text)
    if not 0 <= value < 1:
        raise argparse.ArgumentTypeError(f"expected a fraction in [0, 1), got {text}")
    return value


def _outputs(b):
    b.add_argument("--out", help="write the results as JSON to this file")
    b.add_argument("--csv", help="write the results as CSV to this file")
    b.add_argument("--plot", help="plot speed against size to this PNG (one file per op)")


def _pretrain_args(b):
    from fusedlm.demo import Settings
    d = Settings()
    pos_int, pos_float = _positive(int), _positive(float)
    b.add_argument("--steps", type=pos_int, default=d.steps, help="pretraining steps (%(default)s)")
    b.add_argument("--finetune-steps", type=pos_int, default=d.finetune_steps, help="(%(default)s)")
    b.add_argument("--batch", type=pos_int, default=d.batch,
                   help="global batch, split across torchrun's processes (%(default)s)")
    b.add_argument("--max-len", type=pos_int, default=d.max_len, help="(%(default)s)")
    b.add_argument("--hidden", type=pos_int, default=d.hidden, help="(%(default)s)")
    b.add_argument("--layers", type=pos_int, default=d.layers, help="(%(default)s)")
    b.add_argument("--heads", type=pos_int, default=d.heads, help="(%(default)s)")
    b.add_argument("--vocab", type=pos_int, default=d.vocab, help="WordPiece vocabulary (%(default)s)")
    b.add_argument("--lr", type=pos_float, default=d.lr, help="(%(default)s)")
    b.add_argument("--finetune-lr", type=pos_float, default=d.finetune_lr, help="(%(default)s)")
    b.add_argument("--dropout", type=_fraction, default=d.dropout,
                   help="hidden and attention dropout (%(default)s: the curves then coincide)")
    b.add_argument("--docs", type=pos_int, default=d.docs, help="generated documents (%(default)s)")
    b.add_argument("--corpus", help="pretrain on this text file instead: one sentence per line, "
                                    "a blank line between documents")
    b.add_argument("--seed", type=int, default=d.seed)
    b.add_argument("--dtype", default="auto", choices=["auto", "fp32", "bf16"],
                   help="auto: bf16 autocast on a GPU, fp32 on a CPU")
    b.add_argument("--compile", action="store_true",
                   help="fusedlm's side as one compiled graph (static shapes, CUDA graphs on a GPU)")
    b.add_argument("--impl", default="both", choices=["both", "fused", "reference"],
                   help="fused: fusedlm's BERT; reference: Hugging Face's (%(default)s)")
    b.add_argument("--out", default=d.out, help="directory for metrics.json, tokenizer.json, "
                                                "loss.png (%(default)s)")
    b.add_argument("--no-progress", action="store_true", help="no progress bar or step lines")


def _tune_arg(b, size):
    b.add_argument("--tune", metavar="FILE",
                   help=f"write the measured backend order per dtype and {size} for this GPU into "
                        "FILE, a dispatch table (commit it as fusedlm/ops/measured_dispatch.json, "
                        "or point FUSEDLM_DISPATCH_TABLE at it; entries of other ops and GPUs in "
                        "FILE stay); needs a GPU")


def _parser():
    p = argparse.ArgumentParser(prog="fusedlm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="verify every backend here and show a short benchmark")
    bench = sub.add_parser("bench", help="benchmark an op against its peers")
    ops = bench.add_subparsers(dest="op", required=True)
    gpu = torch.cuda.is_available()
    b = ops.add_parser("host", help="host us per call of every op, launches stubbed, vs torch's op")
    b.add_argument("--backend", nargs="+", default=["triton", "cuda"] if gpu else ["triton"],
                   choices=["triton", "cuda"])
    _outputs(b)
    b = ops.add_parser("layer_norm", help="layer norm, forward and backward, GB/s")
    b.add_argument("--dtype", nargs="+", default=["bf16", "fp32"] if gpu else ["fp32"], choices=sorted(_DTYPES))
    b.add_argument("--rows", nargs="+", type=_positive(int), default=[16384] if gpu else [2048])
    b.add_argument("--widths", nargs="+", type=_positive(int), default=list(ln_bench.WIDTHS))
    b.add_argument("--direction", nargs="+", default=["fwd", "bwd"], choices=["fwd", "bwd"])
    b.add_argument("--dropout", type=_fraction, default=0.0, metavar="P",
                   help="time BERT's dropout, add & norm with this dropout probability (0.1 in "
                        "BERT) instead of the plain norm; default 0")
    _tune_arg(b, "width")
    _outputs(b)
    b = ops.add_parser("attention", help="attention fwd and fwd+bwd TFLOP/s vs SDPA backends")
    b.add_argument("--seq", nargs="+", type=_positive(int), default=[512, 1024, 2048, 4096, 8192] if gpu else [64])
    b.add_argument("--head-dim", nargs="+", type=_positive(int), default=[64, 128] if gpu else [32])
    b.add_argument("--tokens", type=_positive(int), default=16384 if gpu else 128,
                   help="tokens per batch (batch = tokens / seq)")
    b.add_argument("--dtype", nargs=1, default=["bf16" if gpu else "fp32"], choices=sorted(_DTYPES))
    b.add_argument("--impl", nargs="+", metavar="NAME",
                   help="time only these implementations (e.g. sdpa[cudnn] fusedlm[triton]; "
                        "default: every one available)")
    b.add_argument("--dropout", type=_fraction, default=0.0, metavar="P",
                   help="attention dropout probability for every implementation that has it "
                        "(training's: 0.1 in BERT and GPT-2); default 0")
    _tune_arg(b, "head dim, causal and sequence length (forward + backward; with "
                 "fusedlm[cuda-wgmma] in --impl, also which CUDA C++ kernels)")
    _outputs(b)
    b = ops.add_parser("model", help="training step of BERT / GPT-2: HF vs patched vs fusedlm")
    b.add_argument("--case", nargs="+", choices=sorted(model_bench.CASES),
                   default=["bert-base", "gpt2-small", "llama-style"] if gpu
                   else ["bert-tiny", "gpt2-tiny", "llama-tiny"])
    b.add_argument("--padding", nargs="+", type=_fraction, default=[0.0, 0.5],
                   help="fraction of each batch that is padding")
    b.add_argument("--compiled", action="store_true",
                   help="also the torch.compile variants off a GPU (on a GPU: always)")
    _outputs(b)
    b = ops.add_parser("lm_loss", help="LM loss step (fwd+bwd): time, TFLOP/s, peak memory")
    b.add_argument("--case", nargs="+", choices=sorted(loss_bench.CASES),
                   default=["bert-mlm", "bert-large-mlm", "gpt2", "large-vocab", "llama-8k"]
                   if gpu else ["tiny"],
                   help="tokens x H x V presets (default: the GPU cases; 'tiny' on a CPU)")
    b.add_argument("--dtype", nargs=1, default=["bf16" if gpu else "fp32"], choices=sorted(_DTYPES))
    b.add_argument("--impl", nargs="+", metavar="NAME",
                   help="time only these implementations (e.g. fusedlm[triton] fusedlm[cuda]) and "
                        "the full-logits path, the speed-ups' base (default: every one available)")
    b.add_argument("--chunk-rows", nargs="+", type=_positive(int), default=[], metavar="N",
                   help="also time fusedlm (the backend dispatch picks) projecting N labelled rows "
                        "at a time (default chunks: a logits buffer of about 256 MiB)")
    _tune_arg(b, "vocabulary")
    _outputs(b)
    b = ops.add_parser("mlp", help="MLP step (fwd+bwd): time and saved activations vs torch")
    b.add_argument("--case", nargs="+", choices=sorted(mlp_bench.CASES),
                   default=["bert-base", "gpt2-small"] if gpu else ["tiny"])
    b.add_argument("--dtype", nargs=1, default=["bf16" if gpu else "fp32"], choices=sorted(_DTYPES))
    b.add_argument("--impl", nargs="+", metavar="NAME",
                   help="time only these implementations and torch eager, the speed-ups' base")
    _outputs(b)
    b = ops.add_parser("all", help="every op, then the model step, each on its defaults")
    _outputs(b)
    _pretrain_args(sub.add_parser("pretrain", help="pretrain and fine-tune a small BERT, fused "
                                                   "and reference side by side"))
    _pretrain_args(sub.add_parser("demo", help="check, then pretrain (the README's first command)"))
    sub.add_parser("info", help="build and backend facts")
    return p


def main(argv=None):
    p = _parser()
    args = p.parse_args(argv)
    if args.cmd in ("pretrain", "demo"):
        if args.hidden % args.heads:
            p.error(f"--hidden ({args.hidden}) must be a multiple of --heads ({args.heads})")
        if args.corpus and not os.path.isfile(args.corpus):
            p.error(f"--corpus {args.corpus}: no such file")
    if getattr(args, "tune", None) and not torch.cuda.is_available():
        p.error("--tune measures fusedlm's backends on a GPU, and there is none here")
    handlers = {"check": cmd_check, "bench": cmd_bench, "info": cmd_info,
                "pretrain": cmd_pretrain, "demo": cmd_demo}
    try:
        return handlers[args.cmd](args)
    except ValueError as e:  # bad values that only the run can see (a corpus too small, ...)
        p.exit(2, f"fusedlm {args.cmd}: error: {e}\n")


if __name__ == "__main__":
    sys.exit(main())
