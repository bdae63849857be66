"""benchmarks/lm_loss_roofline.py counts what the LM-loss driver does: its FLOPs are the three
projections, its memory stages follow the driver's chunking and padding."""
import importlib.util
from pathlib import Path

import torch

_spec = importlib.util.spec_from_file_location(
    "lm_loss_roofline", Path(__file__).resolve().parents[1] / "benchmarks" / "lm_loss_roofline.py")
rl = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(rl)


def test_flops_are_three_projections_over_the_padded_vocabulary():
    rows, n, chunk = rl.stages(16384, 768, 50257, 1.0)
    assert n == 16384 and chunk == 2048  # 2048 x 50257 bf16 logits: about 256 MiB
    assert sum(f for _, f, _, _ in rows) == 3 * 2 * n * 768 * 50264
    names = [r[0] for r in rows]
    assert "select labelled rows (+1 host sync)" not in names  # every row labelled
    assert "pad weight and bias to V % 8 == 0" in names        # 50257 is not a multiple of 8
    assert "pad weight and bias to V % 8 == 0" not in [r[0] for r in rl.stages(64, 64, 128256, 1.0)[0]]


def test_fp32_accumulation_costs_only_the_weight_gradients_bytes():
    """Summing d_weight in fp32 (autocast's fp32 master weight, accum_dtype) changes that stage's
    bytes alone: twice the weight's elements per chunk at 4 bytes instead of 2; the FLOPs stay."""
    half = {r[0]: r for r in rl.stages(16384, 768, 50257, 1.0)[0]}
    wide = {r[0]: r for r in rl.stages(16384, 768, 50257, 1.0, fp32_accum=True)[0]}
    stage = "d_weight += dlogits^T h"
    assert {k: v for k, v in wide.items() if k != stage} == {k: v for k, v in half.items() if k != stage}
    assert wide[stage][1] == half[stage][1]
    assert wide[stage][2] - half[stage][2] == 8 * 2 * 50264 * 768 * (4 - 2)  # 8 chunks
    p = rl.predict("gpt2", 790, 4.3)
    assert p["total_ms"] <= rl.predict("gpt2", 790, 4.3, fp32_accum=True)["total_ms"]
    assert 0 < p["projection_tflops"] < 790  # math-bound GEMMs at the measured rate: below it
    assert rl.predict("gpt2", 790, 4.3, dtype=torch.float32)["chunk"] == 1024
    assert rl.predict("gpt2", 790, 4.3, bias=True)["total_ms"] > p["total_ms"]  # + d_bias
