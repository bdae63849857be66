"""What the LM-loss driver (fusedlm.ops.lm_loss) should take on a GPU, stage by stage, from its
FLOPs and bytes at the machine's measured rates: a prediction for the next GPU run to confirm or
refute, made on a machine with no GPU.

    python benchmarks/lm_loss_roofline.py                      # the bench's cases, H200 rates
    python benchmarks/lm_loss_roofline.py --tflops 600 --tbps 3.3 --case gpt2

Each stage is one kernel (or one per chunk): its time is max(FLOPs / matmul rate, bytes / copy
rate), as if it ran alone at the rate the machine reaches. The driver's own parameters (chunk
rows, vocabulary padding) come from fusedlm, so a change to the driver changes the prediction.
Two ways of summing the weight's gradient over the chunks are compared: in the weight's dtype
(bf16 weights, the default) and in fp32 (an fp32 master weight under autocast, or
`accum_dtype=torch.float32`): each chunk's d_weight GEMM then reads and writes 4-byte
elements. Not modelled: launch and host time (see `fusedlm bench host`),
L2 hits (the cross-entropy kernel's second read of a row may hit L2: its three passes are an
upper bound), and overlap between kernels (they run one after another on one stream).
"""
import argparse
import math

import torch

from fusedlm.bench.lm_loss import CASES
from fusedlm.ops.lm_loss import GEMM_ALIGN, default_chunk_size

# The H200 the device tool lends (/work/.library/device/H200.md): measured rates, not datasheet.
H200 = dict(tflops=790.0, tbps=4.3)


def stages(tokens, hidden, vocab, labelled, dtype=torch.bfloat16, bias=True, fp32_accum=False):
    """[(stage, FLOPs, bytes, kernels)] of one forward + backward (reduction 'mean', gradients of
    hidden, weight and bias): the forward computes every gradient, the backward scales them.
    fp32_accum: the weight's gradient summed over the chunks in fp32."""
    e = torch.empty((), dtype=dtype).element_size()
    acc = 4 if fp32_accum else e
    n = max(1, round(tokens * labelled))
    vp = -(-vocab // GEMM_ALIGN) * GEMM_ALIGN
    chunk = min(default_chunk_size(vocab, dtype), n)
    k = -(-n // chunk)
    # Bytes a chunk's logits occupy as the GEMMs read and write them.
    logits = n * vp * e
    out = []
    if labelled < 1:
        out.append(("select labelled rows (+1 host sync)", 0, tokens * 8 + 2 * n * hidden * e, 3))
    if vp != vocab:
        out.append(("pad weight and bias to V % 8 == 0", 0, (vocab + vp) * (hidden + bias) * e, 1 + bias))
    gemm = 2 * n * hidden * vp
    w_bytes = k * vp * hidden * e  # the weight, read once per chunk
    out.append(("logits = h W^T (+ b)", gemm, n * hidden * e + w_bytes + logits, k))
    out.append(("cross-entropy rows (loss, lse, dlogits)", 0, 3 * n * vocab * e, k))
    out.append(("d_hidden = dlogits W", gemm, logits + w_bytes + n * hidden * e, k))
    # Each chunk's GEMM reads the running sum and writes it back (the first only writes).
    out.append(("d_weight += dlogits^T h", gemm, logits + n * hidden * e + 2 * w_bytes // e * acc, k))
    if bias:
        out.append(("d_bias += colsum(dlogits)", 0, n * vp * e + k * vp * 8, k))
    scatter = tokens * hidden * e + n * hidden * e if labelled < 1 else 0
    out.append(("d_hidden to every token; backward scales", 0,
                scatter + 2 * tokens * hidden * e + 2 * vocab * hidden * e, 3))
    return out, n, chunk


def predict(case, tflops, tbps, dtype=torch.bfloat16, bias=None, fp32_accum=False):
    """bias: None takes the case's (the bench's: BERT's MLM head has one, GPT-2 and Llama none)."""
    tokens, hidden, vocab, labelled, case_bias = CASES[case]
    rows, n, chunk = stages(tokens, hidden, vocab, labelled, dtype,
                            case_bias if bias is None else bias, fp32_accum)
    table = []
    for name, flops, nbytes, kernels in rows:
        t_f, t_b = flops / (tflops * 1e12), nbytes / (tbps * 1e12)
        table.append((name, max(t_f, t_b) * 1e3, "math" if t_f >= t_b else "memory", kernels))
    total = sum(ms for _, ms, _, _ in table)
    useful = 6 * n * hidden * vocab  # the projection's FLOPs, as the bench counts them
    return dict(case=case, n=n, chunk=chunk, table=table, total_ms=total,
                projection_tflops=useful / (total * 1e-3) / 1e12)


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", nargs="+", default=["bert-mlm", "bert-large-mlm", "gpt2", "large-vocab", "llama-8k"])
    p.add_argument("--tflops", type=float, default=H200["tflops"], help="bf16 matmul rate (%(default)s)")
    p.add_argument("--tbps", type=float, default=H200["tbps"], help="copy rate, TB/s (%(default)s)")
    a = p.parse_args()
    print(f"LM loss, bf16, forward + backward, predicted at {a.tflops:g} TFLOP/s and {a.tbps:g} TB/s\n")
    for case in a.case:
        now, wide = (predict(case, a.tflops, a.tbps, fp32_accum=w) for w in (False, True))
        tokens, hidden, vocab, _, bias = CASES[case]
        print(f"{case}: {tokens} tokens, {now['n']} labelled, H {hidden}, V {vocab}"
              f"{' + bias' if bias else ', no bias'}; "
              f"chunks of {now['chunk']} rows ({math.ceil(now['n'] / now['chunk'])})")
        print(f"  {'stage':<44}{'ms':>8}  bound    kernels")
        for name, ms, bound, kernels in now["table"]:
            print(f"  {name:<44}{ms:8.3f}  {bound:<7}{kernels:>4}")
        print(f"  {'total':<44}{now['total_ms']:8.3f}  projection {now['projection_tflops']:.0f} "
              f"TFLOP/s ({100 * now['projection_tflops'] / a.tflops:.0f}% of the matmul rate)")
        print(f"  {'(d_weight summed in fp32)':<44}{wide['total_ms']:8.3f}  "
              f"projection {wide['projection_tflops']:.0f} TFLOP/s\n")


if __name__ == "__main__":
    main()
