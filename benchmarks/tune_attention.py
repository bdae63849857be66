"""Sweep the Triton attention kernels' launch configurations on this GPU and print each one's time,
to choose the autotuning lists in kernels/attention.py from measurements instead of guesses.

    python3 benchmarks/tune_attention.py [fwd|dkdv|dq ...]   (default: all three)

Cases: bf16, about 16k tokens, hidden 2048, head dim 64 and 128, not causal, seq 1024 and 4096.
Each kernel gets a wide autotuner keyed on the sequence length too, swapped in for the library's
own; the timings are Triton's autotuner's (median of its benchmark, L2 flushed)."""
import sys
import time

import torch
import triton

import fusedlm
from fusedlm.ops import _triton

K = _triton.kernels("attention")


def configs(shapes):
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s)
            for m, n, w, s in shapes]


SPACES = {
    "fwd": [(m, n, w, s) for m in (64, 128) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3, 4)
            if not (m == 64 and w == 8) and not (n == 32 and w == 8)],
    "dkdv": [(m, n, w, s) for m in (32, 64) for n in (64, 128) for w in (4, 8) for s in (2, 3)
             if not (m == 32 and n == 64 and w == 8)],
    "dq": [(m, n, w, s) for m in (64, 128) for n in (32, 64) for w in (4, 8) for s in (2, 3)
           if not (m == 64 and n == 32 and w == 8)],
}
KERNELS = {"fwd": K._attn_fwd, "dkdv": K._attn_bwd_dkdv, "dq": K._attn_bwd_dq}


wanted = sys.argv[1:] or list(SPACES)
tuners = {name: triton.autotune(configs(SPACES[name]), key=K._TUNE_KEY + ["seq_q", "seq_k"])(KERNELS[name])
          for name in wanted}
# The sweep tunes again at every sequence length: nothing is remembered between calls; kernels
# not swept keep their usual tuners.
K.TUNING = K.Tuning({**K.TUNING.tuners, **tuners}, remember=False)

for d in (64, 128):
    for s in (1024, 4096):
        b, h = 16384 // s, 2048 // d
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True)
                   for _ in range(3))
        t0 = time.time()
        out = fusedlm.attention(q, k, v, backend="triton")
        out.backward(torch.randn_like(out))
        torch.cuda.synchronize()
        print(f"\n== d={d} s={s} (batch {b}, heads {h}): tuned in {time.time() - t0:.0f} s", flush=True)
        flops = {"fwd": 4 * b * h * s * s * d, "dkdv": 8 * b * h * s * s * d, "dq": 6 * b * h * s * s * d}
        for name, tuner in tuners.items():
            timings = sorted(tuner.configs_timings.items(), key=lambda kv: kv[1][0] if isinstance(kv[1], list) else kv[1])
            for cfg, t in timings[:8]:
                ms = t[0] if isinstance(t, list) else t
                print(f"  {name:<5} M={cfg.kwargs['BLOCK_M']:<4} N={cfg.kwargs['BLOCK_N']:<4} "
                      f"warps={cfg.num_warps} stages={cfg.num_stages}  {ms:8.3f} ms "
                      f"{flops[name] / ms / 1e9:7.1f} TFLOP/s", flush=True)
        del q, k, v, out
