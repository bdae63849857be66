"""Triage for the Hopper CUDA C++ forward (csrc/attention/attention_hopper.cu) on a GPU: which
kernel ran and how far each case is from the float64 reference, with cases built to point at
the part that is wrong when one is:

- q = 0 makes every probability equal, so the output is the mean of V's rows: only the P V
  product (V's tensor map, the MN-major descriptor, P's register fragments) is tested;
- k = q with one-hot rows makes S diagonal-dominant: the Q K^T product and the softmax;
- one key block against several: the two-stage ring and its barrier phases;
- head dims 64 and 128 (one 64-column slab or two), causal, a padding mask, packed sequences.

Then forward times (ms, TFLOP/s as DESIGN.md counts them) for the wgmma kernel beside the WMMA
one, the Triton kernel and cuDNN's SDPA, at a few BERT/GPT shapes.

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
    attn_ops.cuda_forward_kernel = "wgmma"
    out = fusedlm.attention(q, k, v, backend="cuda", **kw)
    torch.cuda.synchronize()
    ran = attn_ops.last_cuda_forward_kernel
    ref, _ = reference.attention(q.double(), k.double(), v.double(), causal=kw.get("causal", False),
                                 key_mask=kw.get("attention_mask"))
    diff = (out.double() - ref).abs()
    rel = (diff.norm() / ref.norm().clamp_min(1e-30)).item()
    nan = int(torch.isnan(out).sum())
    print(f"{name:<34} {ran:<10} max|err| {diff.max().item():.3e}  rel {rel:.3e}  nan {nan}")
    return rel < 2e-2 and nan == 0


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
    print(f"\n{'shape':<30} {'impl':<16} {'ms':>8} {'TFLOP/s':>8}")
    for b, s, h, d, causal in [(32, 512, 12, 64, False), (8, 2048, 16, 128, False), (8, 2048, 16, 128, True),
                               (2, 8192, 16, 128, True), (4, 4096, 32, 64, False)]:
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        flops = 4 * b * h * s * s * d / (2 if causal else 1)
        impls = {}
        for kern in ("wgmma", "wmma"):
            def run(kern=kern):
                attn_ops.cuda_forward_kernel = kern
                return fusedlm.attention(q, k, v, causal=causal, backend="cuda")
            impls[f"fusedlm[cuda:{kern}]"] = run
        impls["fusedlm[triton]"] = lambda: fusedlm.attention(q, k, v, causal=causal, backend="triton")
        qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal)
        impls["sdpa[cudnn]"] = cudnn
        for name, fn in impls.items():
            try:
                with torch.no_grad():
                    ms = _time(fn)
                print(f"{f'b{b} s{s} h{h} d{d}' + (' causal' if causal else ''):<30} {name:<16} {ms:8.3f} "
                      f"{flops / ms / 1e9:8.1f}")
            except Exception as e:  # noqa: BLE001 - report and go on to the next peer
                print(f"{'':<30} {name:<16} failed: {type(e).__name__}: {str(e)[:120]}")


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
