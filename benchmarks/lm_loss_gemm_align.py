"""A/B of the LM loss's vocabulary padding for its GEMMs (fusedlm.ops.lm_loss.GEMM_ALIGN): the
Triton backend with the padding (8, the default) and without it (1), in one process, beside
torch.compile of the reference, on the cases whose vocabulary is not a multiple of 8
(BERT's 30522, GPT-2's 50257).

    python3 benchmarks/lm_loss_gemm_align.py [case ...]
"""
import importlib
import sys

import torch

import fusedlm
from fusedlm.bench import lm_loss
from fusedlm.bench.report import table

loss_mod = importlib.import_module("fusedlm.ops.lm_loss")

BACKEND = "triton" if torch.cuda.is_available() else "torch"  # CPU: a smoke run


def unpadded(h, w, b, y):
    saved, loss_mod.GEMM_ALIGN = loss_mod.GEMM_ALIGN, 1
    try:
        return fusedlm.lm_loss(h, w, y, b, backend=BACKEND)
    finally:
        loss_mod.GEMM_ALIGN = saved


if __name__ == "__main__":
    cases = sys.argv[1:] or ["bert-mlm", "gpt2"]
    rows = lm_loss.run(cases=cases, peers=["torch.compile(ref)", f"fusedlm[{BACKEND}]"],
                       extra={f"fusedlm[{BACKEND}] GEMM_ALIGN=1": unpadded})
    print("\n" + table(rows))
    if torch.cuda.is_available():
        print(torch.cuda.get_device_name(), "torch", torch.__version__)
