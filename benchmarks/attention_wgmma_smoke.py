"""Triage for the Hopper CUDA C++ kernels (csrc/attention/attention_hopper.cu) on a GPU: which
kernels ran and how far each case's output and gradients are from the float64 reference, with
cases built to point at the part that is wrong when one is (the backward's products reuse the
forward's operand forms: a case wrong in both points at the shared part):

- q = 0 makes every probability equal, so the output is the mean of V's rows: only the P V
  product (V's tensor map, the MN-major descriptor, P's register fragments) is tested;
- k = q with one-hot rows makes S diagonal-dominant: the Q K^T product and the softmax;
- one key block against several: the two-stage ring and its barrier phases;
- head dims 64 and 128 (one 64-column slab or two), causal, a padding mask, packed sequences.

Then forward and forward+backward times (ms, and TFLOP/s counting 4 b h s^2 d forward flops,
halved for causal, and 2.5x that for the backward) for the wgmma kernels beside the WMMA ones,
the Triton kernels and cuDNN's SDPA, at a few BERT/GPT shapes.

    FUSEDLM_CUDA_ATTENTION is set here; run: python benchmarks/attention_wgmma_smoke.py [--no-time]
"""
import argparse
import math
import sys

import torch
import torch.nn.functional as F

import fusedlm
from fusedlm import reference
from fusedlm.ops import fused_attention as attn_ops


def _case(name, q, k, v, **kw):
    attn_ops.cuda_kernels = "wgmma"
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    out = fusedlm.attention(q, k, v, backend="cuda", **kw)
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    torch.cuda.synchronize()
    ran = f"{attn_ops.last_cuda_forward_kernel}/{attn_ops.last_cuda_backward_kernel}"
    f64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref, _ = reference.attention(*f64, causal=kw.get("causal", False), key_mask=kw.get("attention_mask"))
    want = torch.autograd.grad(ref, f64, do.double())
    rel = lambda a, r: ((a.double() - r).norm() / r.norm().clamp_min(1e-30)).item()
    errs = [rel(out, ref)] + [rel(a, r) for a, r in zip(grads, want)]
    nan = int(sum(torch.isnan(t).sum() for t in (out, *grads)))
    print(f"{name:<34} {ran:<12} rel err out {errs[0]:.2e} dq {errs[1]:.2e} dk {errs[2]:.2e} "
          f"dv {errs[3]:.2e}  max|out err| {(out.double() - ref).abs().max().item():.2e}  nan {nan}")
    return max(errs) < 2e-2 and nan == 0


def correctness():
    g = torch.Generator(device="cuda").manual_seed(0)
    rnd = lambda *s: torch.randn(*s, device="cuda", generator=g).to(torch.bfloat16)
    ok = True
    for d in (64, 128):
        for s in (128, 512):
            v = rnd(1, s, 2, d)
            z = torch.zeros(1, s, 2, d, device="cuda", dtype=torch.bfloat16)
            ok &= _case(f"d{d} s{s} q=0 (P V only)", z, rnd(1, s, 2, d), v)
            eye = torch.zeros(1, s, 2, d, device="cuda", dtype=torch.bfloat16)
            eye[0, torch.arange(s), :, torch.arange(s) % d] = 8.0
            ok &= _case(f"d{d} s{s} k=q one-hot (Q K^T)", eye, eye, v)
            ok &= _case(f"d{d} s{s} random", rnd(2, s, 4, d), rnd(2, s, 2, d), rnd(2, s, 2, d))
            ok &= _case(f"d{d} s{s} random causal", rnd(2, s, 4, d), rnd(2, s, 2, d), rnd(2, s, 2, d), causal=True)
        mask = torch.arange(300, device="cuda")[None, :] < torch.tensor([[300], [131]], device="cuda")
        ok &= _case(f"d{d} s300 padding mask", rnd(2, 300, 4, d), rnd(2, 300, 4, d), rnd(2, 300, 4, d),
                    attention_mask=mask)
        ok &= _case(f"d{d} sq200 sk700 causal", rnd(2, 200, 4, d), rnd(2, 700, 4, d), rnd(2, 700, 4, d), causal=True)
    return ok


def _time(fn, iters=20):
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def timing():
    from torch.nn.attention import SDPBackend, sdpa_kernel
    print(f"\n{'shape':<30} {'impl':<20} {'fwd ms':>8} {'TFLOP/s':>8} {'fwd+bwd ms':>10} {'TFLOP/s':>8}")
    for b, s, h, d, causal in [(32, 512, 12, 64, False), (8, 2048, 16, 128, False), (8, 2048, 16, 128, True),
                               (2, 8192, 16, 128, True), (4, 4096, 32, 64, False)]:
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        flops = 4 * b * h * s * s * d / (2 if causal else 1)  # forward; the backward is 2.5x
        impls = {}
        for kern in ("wgmma", "wmma"):
            def run(kern=kern):
                attn_ops.cuda_kernels = kern
                return fusedlm.attention(q, k, v, causal=causal, backend="cuda")
            impls[f"fusedlm[cuda:{kern}]"] = run
        impls["fusedlm[triton]"] = lambda: fusedlm.attention(q, k, v, causal=causal, backend="triton")

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)
        impls["sdpa[cudnn]"] = cudnn
        label = f"b{b} s{s} h{h} d{d}" + (" causal" if causal else "")
        for name, fn in impls.items():
            try:
                with torch.no_grad():
                    fwd = _time(fn)
                both = _time(lambda: torch.autograd.grad(fn(), (q, k, v), do))
                print(f"{label:<30} {name:<20} {fwd:8.3f} {flops / fwd / 1e9:8.1f} {both:10.3f} "
                      f"{3.5 * flops / both / 1e9:8.1f}")
            except Exception as e:  # noqa: BLE001 - report and go on to the next peer
                print(f"{label:<30} {name:<20} failed: {type(e).__name__}: {str(e)[:120]}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-time", action="store_true")
    args = ap.parse_args()
    print(f"device: {torch.cuda.get_device_name()}  fusedlm build: {fusedlm.build_info()}")
    ok = correctness()
    print("correctness:", "all within 2e-2" if ok else "FAILURES above")
    if not args.no_time and ok:
        timing()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
