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
from fusedlm import reference  # noqa: E402
from fusedlm.bench import environment, write_json  # noqa: E402
from fusedlm.bench import attention as attn_bench  # noqa: E402
from fusedlm.bench import layer_norm as ln_bench  # noqa: E402
from fusedlm.bench import lm_loss as loss_bench  # noqa: E402
from fusedlm.bench import model as model_bench  # noqa: E402
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


def _check_backend(backend, device, dtype, n, rows=37):
    g = torch.Generator().manual_seed(0)
    x = torch.randn(rows, n, generator=g).to(device, dtype).requires_grad_()
    r = torch.randn(rows, n, generator=g).to(device, dtype)
    w = (1 + torch.randn(n, generator=g)).to(device, dtype).requires_grad_()
    b = torch.randn(n, generator=g).to(device, dtype).requires_grad_()
    dy = torch.randn(rows, n, generator=g).to(device, dtype)
    y = fusedlm.layer_norm(x, w, b, residual=r, backend=backend)
    got = torch.autograd.grad(y, (x, w, b), dy)
    xs, ws, bs = (t.detach().double().requires_grad_() for t in (x, w, b))
    ref = reference.layer_norm(reference.rounded_sum(xs, r.double(), dtype), ws, bs)[0]
    want = torch.autograd.grad(ref, (xs, ws, bs), dy.double())
    errs = [((a.double() - c).norm() / c.norm()).item() for a, c in
            zip((y,) + got, (ref,) + want)]
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    return all(e < 2 * tol for e in errs), max(errs)


def _check_lm_loss(backend, device, dtype, vocab=4099, tokens=64, hidden=32):
    g = torch.Generator().manual_seed(0)
    h = torch.randn(tokens, hidden, generator=g).to(device, dtype).requires_grad_()
    w = (torch.randn(vocab, hidden, generator=g) / 3).to(device, dtype).requires_grad_()
    b = torch.randn(vocab, generator=g).to(device, dtype).requires_grad_()
    y = torch.randint(0, vocab, (tokens,), generator=g)
    y[torch.rand(tokens, generator=g) > 0.3] = -100
    y = y.to(device)
    loss = fusedlm.lm_loss(h, w, y, b, z_loss=1e-4, chunk_size=7, backend=backend)
    got = torch.autograd.grad(loss, (h, w, b))
    hs, ws, bs = (t.detach().double().requires_grad_() for t in (h, w, b))
    ref = reference.lm_loss(hs, ws, y, bs, z_loss=1e-4)[0]
    want = torch.autograd.grad(ref, (hs, ws, bs))
    errs = [((a.double() - c).norm() / c.norm()).item() for a, c in
            zip((loss,) + got, (ref,) + want)]
    tol = {torch.float32: 1e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}[dtype]
    return all(e < 2 * tol for e in errs), max(errs)


# op -> (what is checked, dispatch case for (device, dtype), check function)
_CHECKS = {
    "layer_norm": ("layer_norm(x + residual)", lambda d, t: (d, t, 1000, t),
                   lambda be, d, t: _check_backend(be, d, t, 1000)),
    "lm_loss": ("lm_loss(hidden, weight, labels, bias), V=4099", lambda d, t: (d, t),
                _check_lm_loss),
}


def cmd_check(args):
    env = environment()
    _print_env(env)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtypes = [torch.float32, torch.float16] + ([torch.bfloat16] if device == "cuda" else [])
    ok = True
    for op, (what, case, check) in _CHECKS.items():
        print(f"\ncorrectness: {what}, forward and backward vs the float64 reference")
        for backend in dispatch.BACKENDS:
            for dtype in dtypes:
                why = dispatch._OPS[op].why_not(backend, case(device, dtype))
                label = f"  {backend:<7} {str(dtype).split('.')[-1]:<9}"
                if why is not None:
                    print(f"{label} skipped: {why}")
                    continue
                passed, err = check(backend, device, dtype)
                ok &= passed
                print(f"{label} {'PASS' if passed else 'FAIL'}  max rel. error {err:.2e}")
    x = torch.randn(4, 1000, device=device)
    fusedlm.layer_norm(x)
    print("\ndispatch for a default call:\n  " + str(fusedlm.explain("layer_norm")).replace("\n", "\n  "))

    if device == "cuda":
        print("\nbenchmark (bf16, 16384 rows; speed-up over torch eager):")
        ln_bench.run(dtypes=(torch.bfloat16,), rows=(16384,), widths=(1024, 4096),
                     peers=("fusedlm[triton]", "fusedlm[cuda]"))
        print("\nbenchmark: BERT-base masked-LM loss step, fwd+bwd (speed-up over the full-logits path):")
        loss_bench.run(cases=("bert-mlm",), peers=("fusedlm[triton]",))
    else:
        print("\nbenchmark: no GPU here, so the fused kernels cannot show their speed (the "
              "interpreter is for correctness only). On CPU:")
        ln_bench.run(dtypes=(torch.float32,), rows=(4096,), widths=(1024,), peers=())
        print("\nmasked-LM loss step, fwd+bwd, 15% of tokens labelled (speed-up over the "
              "full-logits path):")
        loss_bench.run(cases=("tiny",), dtype=torch.float32, peers=("fusedlm[torch]",))
    print("\nall checks passed" if ok else "\nSOME CHECKS FAILED")
    return 0 if ok else 1


def cmd_bench(args):
    env = environment()
    _print_env(env)
    payload = {"environment": env}
    if args.op == "layer_norm":
        payload["results"] = ln_bench.run(dtypes=[_DTYPES[d] for d in args.dtype], rows=args.rows,
                                          widths=args.widths, directions=args.direction)
        print("\nhost cost per call:")
        payload["overhead"] = ln_bench.dispatch_overhead()
    elif args.op == "model":
        payload["results"] = model_bench.run(cases=args.case, paddings=args.padding)
    elif args.op == "attention":
        payload["results"] = attn_bench.run(seqlens=args.seq, head_dims=args.head_dim,
                                            tokens=args.tokens, dtype=_DTYPES[args.dtype])
        payload["results"] += attn_bench.run_padded_bert(dtype=_DTYPES[args.dtype],
                                                         **({} if torch.cuda.is_available() else
                                                            dict(batch=2, seq=64, heads=2)))
    else:
        payload["results"] = loss_bench.run(cases=args.case, dtype=_DTYPES[args.dtype])
    if args.out:
        write_json(args.out, payload)
        print(f"\nwrote {args.out}")
    return 0


def cmd_info(args):
    _print_env(environment())
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    for op, (_, case, _) in _CHECKS.items():
        for backend in dispatch.BACKENDS:
            why = dispatch._OPS[op].why_not(backend, case(device, dtype))
            print(f"  {op}/{backend:<7} {'available' if why is None else why}")
    return 0


def main(argv=None):
    p = argparse.ArgumentParser(prog="fusedlm", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    sub.add_parser("check", help="verify every backend here and show a short benchmark")
    bench = sub.add_parser("bench", help="benchmark an op against its peers")
    ops = bench.add_subparsers(dest="op", required=True)
    b = ops.add_parser("layer_norm", help="layer norm, forward and backward, GB/s")
    b.add_argument("--dtype", nargs="+", default=["bf16", "fp32"], choices=sorted(_DTYPES))
    b.add_argument("--rows", nargs="+", type=int, default=[16384])
    b.add_argument("--widths", nargs="+", type=int, default=list(ln_bench.WIDTHS))
    b.add_argument("--direction", nargs="+", default=["fwd", "bwd"], choices=["fwd", "bwd"])
    b.add_argument("--out", help="write results as JSON here")
    gpu = torch.cuda.is_available()
    b = ops.add_parser("attention", help="attention fwd and fwd+bwd TFLOP/s vs SDPA backends")
    b.add_argument("--seq", nargs="+", type=int, default=[512, 1024, 2048, 4096, 8192] if gpu else [64])
    b.add_argument("--head-dim", nargs="+", type=int, default=[64, 128] if gpu else [32])
    b.add_argument("--tokens", type=int, default=16384 if gpu else 128,
                   help="tokens per batch (batch = tokens / seq)")
    b.add_argument("--dtype", default="bf16" if gpu else "fp32", choices=sorted(_DTYPES))
    b.add_argument("--out", help="write results as JSON here")
    b = ops.add_parser("model", help="training step of BERT / GPT-2: HF vs patched vs fusedlm")
    b.add_argument("--case", nargs="+", choices=sorted(model_bench.CASES),
                   default=["bert-base", "gpt2-small"] if gpu else ["bert-tiny", "gpt2-tiny"])
    b.add_argument("--padding", nargs="+", type=float, default=[0.0, 0.5],
                   help="fraction of each batch that is padding")
    b.add_argument("--out", help="write results as JSON here")
    b = ops.add_parser("lm_loss", help="LM loss step (fwd+bwd): time, TFLOP/s, peak memory")
    b.add_argument("--case", nargs="+", choices=sorted(loss_bench.CASES),
                   default=["bert-mlm", "gpt2", "large-vocab"] if torch.cuda.is_available() else ["tiny"],
                   help="tokens x H x V presets (default: the three GPU cases; 'tiny' on a CPU)")
    b.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32",
                   choices=sorted(_DTYPES))
    b.add_argument("--out", help="write results as JSON here")
    sub.add_parser("info", help="build and backend facts")
    args = p.parse_args(argv)
    return {"check": cmd_check, "bench": cmd_bench, "info": cmd_info}[args.cmd](args)


if __name__ == "__main__":
    sys.exit(main())
