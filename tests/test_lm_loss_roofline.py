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


def test_strided_buffer_costs_the_bias_copy_and_only_that_and_a_wider_colsum():
    now = {r[0]: r for r in rl.stages(16384, 768, 50257, 0.15)[0]}  # 50264 is not 64-aligned
    before = {r[0]: r for r in rl.stages(16384, 768, 50257, 0.15, strided=True)[0]}
    assert set(before) - set(now) == {"  bias copied into the strided output"}
    assert before["d_bias += colsum(dlogits)"][2] > now["d_bias += colsum(dlogits)"][2]
    p = rl.predict("gpt2", 790, 4.3, bias=True)
    assert p["total_ms"] < rl.predict("gpt2", 790, 4.3, strided=True, bias=True)["total_ms"]
    # GPT-2's lm_head has no bias (the bench's case neither): the pitch then changes nothing.
    assert rl.predict("gpt2", 790, 4.3)["total_ms"] == rl.predict("gpt2", 790, 4.3, strided=True)["total_ms"]
    # Math-bound GEMMs at the measured rate: the projection's rate is below it, never above.
    assert 0 < p["projection_tflops"] < 790
    assert rl.predict("gpt2", 790, 4.3, dtype=torch.float32)["chunk"] == 1024
    # BERT's 30522 pads to 30528, a multiple of 64: its buffer was contiguous before too.
    assert rl.stages(16384, 768, 30522, 0.15, strided=True) == rl.stages(16384, 768, 30522, 0.15)
