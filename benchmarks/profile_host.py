"""Host time or kernel time? For each case, one attention step (forward, or forward + backward) or
one LM-loss step (forward + backward) timed three ways on the same inputs:

  bench    the benchmark's number: triton.testing.do_bench's median (L2 flushed between calls);
  kernels  the GPU time of the kernels of one step, summed from torch.profiler;
  host     the CPU time to enqueue one step (STEPS steps without a synchronization, averaged).

bench close to host and well above kernels: the step is host-bound (launch and Python cost);
bench close to kernels: the kernels are what to speed up. Also prints each case's kernel table
and the autotuner's choices, to tell a bad configuration from a slow kernel. The LM-loss cases
run the loss with and without its vocabulary padding (fusedlm.ops.lm_loss.GEMM_ALIGN): the kernel
table names the cuBLAS kernels each one gets.

    python3 benchmarks/profile_host.py [case ...]     (cases: see CASES; default all)

Off a GPU it runs the same steps on the CPU reference (a smoke run of the script itself).
"""
import importlib
import sys
import time

import torch
import torch.nn.functional as F

import fusedlm
from fusedlm.bench.lm_loss import _inputs as loss_inputs
from fusedlm.ops import _triton, unpad
loss_mod = importlib.import_module("fusedlm.ops.lm_loss")

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
DTYPE = torch.bfloat16 if CUDA else torch.float32
OURS = "triton" if CUDA else "torch"
STEPS = 50 if CUDA else 3
# name: (batch, seq, heads, head dim, padding (a fraction of each batch's tokens), causal)
CASES = {
    "bert-s512": (32, 512, 12, 64, 0.0, False),
    "bert-s512-padded": (32, 512, 12, 64, 0.5, False),
    "dense-s512-h32": (32, 512, 32, 64, 0.0, False),
    "gpt-s1024": (16, 1024, 12, 64, 0.0, True),
    # The steadiest outlier of 2026-11-23-h100-s2: its backward took ~1.2 ms in both calls, as
    # long as seq 2048's with 4x the work (same tokens, same configs).
    "d128-s512-causal": (32, 512, 16, 128, 0.0, True),
    "d128-s4096": (4, 4096, 16, 128, 0.0, False),
}
# name: (tokens, hidden, vocab, labelled fraction), as fusedlm.bench.lm_loss's cases
LOSS_CASES = {"loss-gpt2": (16384, 768, 50257, 1.0), "loss-bert-mlm": (16384, 768, 30522, 0.15)}


def inputs(batch, seq, heads, d, padding):
    if not CUDA:  # the smoke run: small shapes
        batch, seq = 2, 64
    g = torch.Generator().manual_seed(0)
    lo = int(seq * (1 - 2 * padding)) + 1
    lens = torch.randint(lo, seq + 1, (batch,), generator=g) if padding else torch.full((batch,), seq)
    mask = (torch.arange(seq)[None, :] < lens[:, None]).to(DEVICE)
    q, k, v = (torch.randn(batch, seq, heads, d, device=DEVICE, dtype=DTYPE) for _ in range(3))
    return q, k, v, mask


def impls(q, k, v, mask, causal, padded):
    """name -> (fn(q, k, v), (q, k, v)) on (batch, seq, heads, D) or packed tensors."""
    def sdpa(q, k, v):
        m = mask[:, None, None, :] if padded else None
        return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                              v.transpose(1, 2), attn_mask=m,
                                              is_causal=causal and m is None).transpose(1, 2)
    out = {"sdpa (auto backend)": (sdpa, (q, k, v))}
    if padded:
        out[f"fusedlm[{OURS}] padded+mask"] = (
            lambda q, k, v: fusedlm.attention(q, k, v, attention_mask=mask, causal=causal,
                                              backend=OURS), (q, k, v))
        (qp, _, cu, mx), kp, vp = unpad(q, mask), unpad(k, mask)[0], unpad(v, mask)[0]
        out[f"fusedlm[{OURS}] packed"] = (
            lambda q, k, v: fusedlm.attention_varlen(q, k, v, cu, cu, mx, mx, causal=causal,
                                                     backend=OURS), (qp, kp, vp))
    else:
        out[f"fusedlm[{OURS}]"] = (
            lambda q, k, v: fusedlm.attention(q, k, v, causal=causal, backend=OURS), (q, k, v))
    return out


def loss_impls(tokens, hidden, vocab, labelled):
    if not CUDA:  # the smoke run: small shapes, an odd vocabulary
        tokens, vocab = 256, 1001
    h, w, b, y = loss_inputs(tokens, hidden, vocab, labelled, DTYPE, DEVICE)

    def ours(align):
        def fn(h, w, b):
            saved, loss_mod.GEMM_ALIGN = loss_mod.GEMM_ALIGN, align
            try:
                return fusedlm.lm_loss(h, w, y, b, backend=OURS)
            finally:
                loss_mod.GEMM_ALIGN = saved
        return fn
    return {f"fusedlm[{OURS}] GEMM_ALIGN={a}": (ours(a), (h, w, b)) for a in (loss_mod.GEMM_ALIGN, 1)}


def step_fn(fn, args, direction):
    if direction == "fwd":
        return lambda: fn(*args)
    leaves = [t.detach().requires_grad_() for t in args]
    do = torch.randn_like(args[0])

    def step():
        out = fn(*leaves)
        return torch.autograd.grad(out, leaves, do if out.dim() else None)
    return step


def sync():
    if CUDA:
        torch.cuda.synchronize()


def bench_ms(step):
    if CUDA:
        import triton.testing
        return triton.testing.do_bench(step, warmup=25, rep=100, return_mode="median")
    t0 = time.perf_counter()
    for _ in range(5):
        step()
    return (time.perf_counter() - t0) / 5 * 1e3


def host_ms(step):
    sync()
    t0 = time.perf_counter()
    for _ in range(STEPS):
        step()
    host = (time.perf_counter() - t0) / STEPS * 1e3
    sync()
    return host


def kernel_ms(step):
    """GPU time of one step's kernels (self device time summed over the profiled steps)."""
    from torch.profiler import ProfilerActivity, profile
    acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if CUDA else [])
    sync()
    with profile(activities=acts) as prof:
        for _ in range(10):
            step()
        sync()
    events = prof.key_averages()
    attr = "self_device_time_total" if hasattr(events[0], "self_device_time_total") else "self_cuda_time_total"
    total = sum(getattr(e, attr) for e in events) / 10 / 1e3
    table = events.table(sort_by=attr if CUDA else "self_cpu_time_total", row_limit=12)
    return total, table


def autotuner_choices():
    mod = _triton.kernels("attention")
    tuned = mod.TUNING.tuners if mod is not None else {}
    lines = []
    for name, tuner in tuned.items():
        for key, config in getattr(tuner, "cache", {}).items():
            lines.append(f"  {name}: {key} -> {config}")
    return lines


def main(names):
    print(f"device {torch.cuda.get_device_name() if CUDA else 'cpu'}, torch {torch.__version__}, "
          f"fusedlm backend {OURS}, {DTYPE}")
    for name in names:
        if name in LOSS_CASES:
            todo, directions = loss_impls(*LOSS_CASES[name]), ("fwd+bwd",)
        else:
            batch, seq, heads, d, padding, causal = CASES[name]
            q, k, v, mask = inputs(batch, seq, heads, d, padding)
            todo, directions = impls(q, k, v, mask, causal, padding > 0), ("fwd", "fwd+bwd")
        for impl, (fn, args) in todo.items():
            for direction in directions:
                step = step_fn(fn, args, direction)
                step()  # compile / autotune outside the timings
                sync()
                bench, host = bench_ms(step), host_ms(step)
                kernels, table = kernel_ms(step)
                verdict = "host-bound" if host > 0.8 * bench and kernels < 0.8 * bench else \
                    "kernel-bound" if kernels > 0.8 * bench else "mixed"
                print(f"\n{name} {impl} {direction}: bench {bench:.3f} ms, host {host:.3f} ms, "
                      f"kernels {kernels:.3f} ms -> {verdict}")
                if direction == "fwd+bwd" or not CUDA:
                    print(table)
    print("\nautotuner choices:", *autotuner_choices() or ["  (none: no autotuned launch)"], sep="\n")


if __name__ == "__main__":
    known = [*CASES, *LOSS_CASES]
    wanted = sys.argv[1:] or known
    unknown = [n for n in wanted if n not in known]
    if unknown:
        sys.exit(f"unknown case(s) {unknown}; choose from {known}")
    main(wanted)
