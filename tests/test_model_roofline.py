"""benchmarks/model_roofline.py records the kernels of a training step as a GPU would run them:
the GEMMs' FLOPs, fusedlm's attention launches over the real (query, key) pairs only, torch's
attention and dropout as one fused kernel each, every dropout mask's Philox draws, and nothing
large computed on the CPU."""
import importlib.util
from pathlib import Path

import pytest
import torch

_spec = importlib.util.spec_from_file_location(
    "model_roofline", Path(__file__).resolve().parents[1] / "benchmarks" / "model_roofline.py")
mr = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(mr)


class _Linear(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(512, 256)

    def forward(self, x):
        return type("Out", (), {"loss": torch.nn.functional.dropout(self.lin(x), 0.1).sum()})


def test_a_linear_step_is_three_gemms_and_a_fused_dropout_left_uncomputed():
    m, x = _Linear(), torch.randn(300, 512, requires_grad=True)
    ledger = mr.step_ledger(m, dict(x=x))
    gemm = sum(f for name, f, _, _ in ledger.kernels if mr.category(name) == "gemm")
    assert gemm == 3 * 2 * 300 * 512 * 256  # forward, d_input, d_weight
    names = [name for name, _, _, _ in ledger.kernels]
    assert names.count("native_dropout") == 1 and names.count("native_dropout_backward") == 1
    assert "bernoulli_" not in names  # not the CPU's decomposition
    # The forward GEMM reads x, the weight and the bias and writes its output, fp32.
    assert ledger.kernels[0] == ("addmm", 2 * 300 * 512 * 256,
                                 4 * (300 * 512 + 256 * 512 + 256 + 300 * 256), 0)
    # torch's dropout kernel: one Philox draw (curand's) for four elements.
    assert [d for n, _, _, d in ledger.kernels if n == "native_dropout"] == [300 * 256 // 4]


def test_sdpa_is_one_kernel_each_way_causal_pairs_halved():
    q = torch.randn(2, 4, 64, 32, requires_grad=True)

    class Attn(torch.nn.Module):
        def forward(self, q, causal):
            o = torch.nn.functional.scaled_dot_product_attention(q, q, q, is_causal=causal)
            return type("Out", (), {"loss": o.sum()})
    full = mr.step_ledger(Attn(), dict(q=q, causal=False)).kernels
    causal = mr.step_ledger(Attn(), dict(q=q, causal=True)).kernels
    pick = lambda ks, n: [f for name, f, _, _ in ks if name == n]
    assert pick(full, "sdpa attention") == [4 * 2 * 4 * 64 * 64 * 32]
    assert pick(full, "sdpa attention backward") == [10 * 2 * 4 * 64 * 64 * 32]
    assert pick(causal, "sdpa attention") == [4 * 2 * 4 * (64 * 65 // 2) * 32]


@pytest.mark.parametrize("padding", [0.0, 0.5])
def test_fusedlm_attention_counts_each_packed_sequences_pairs(padding):
    pytest.importorskip("transformers")
    models, config = mr._models("bert-tiny")
    family, batch, seq, _ = mr.CASES["bert-tiny"]
    kw, tokens = mr._batch(family, batch, seq, config.vocab_size, padding, "cpu")
    lens = kw["attention_mask"].sum(1).tolist()
    heads, d = config.num_attention_heads, config.hidden_size // config.num_attention_heads
    packed = mr._packed(kw, seq)
    # The pack's sequences: the samples, then the token budget's filler (rounded up to 64).
    in_pack = packed["cu_seqlens"].diff().tolist()
    assert in_pack[:batch] == lens and sum(in_pack) == packed["input_ids"].numel()
    for name, batch_kw, seqs in (("fusedlm model", kw, lens),
                                 ("fusedlm model, packed", packed, in_pack)):
        ledger = mr.step_ledger(models[name][0], batch_kw)
        fwd = [(f, r) for n, f, _, r in ledger.kernels if n == "triton attention.forward"]
        pairs = heads * sum(n * n for n in seqs)
        # Training with attention dropout: a Philox draw for four probabilities, forward and in
        # the dQ kernel; one a probability in the dK/dV kernel (its transposed tile).
        assert fwd == [(4 * d * pairs, -(-pairs // 4))] * config.num_hidden_layers, name
        bwd = [r for n, _, _, r in ledger.kernels if n == "triton attention.backward"]
        assert bwd == [-(-pairs // 4) + pairs] * config.num_hidden_layers, name  # dQ's, dK/dV's
        # The norms drop out their sublayer's output (BERT's dropout, add & norm) both ways.
        norm = [(n, r) for n, _, _, r in ledger.kernels if n.startswith("triton layer_norm")]
        rows = sum(seqs)
        assert ("triton layer_norm.forward", rows * config.hidden_size // 4) in norm, name
    # Hugging Face's attention computes the padding too: every (query, key) pair of the batch.
    hf = mr.step_ledger(*[models["hf eager (sdpa)"][0], kw]).kernels
    fwd = [(f, r) for n, f, _, r in hf if n == "sdpa attention"]
    pairs = heads * batch * seq * seq  # drawn for as FlashAttention-2 does: 16 a draw
    assert fwd == [(4 * d * pairs, -(-pairs // 16))] * config.num_hidden_layers


def test_the_bound_is_the_slowest_of_math_memory_and_dropout_draws():
    assert mr.kernel_ms(790e12, 0, 790, 4.3) == pytest.approx(1e3)
    assert mr.kernel_ms(1, 4.3e12, 790, 4.3) == pytest.approx(1e3)
    assert mr.kernel_ms(1, 1, 790, 4.3, draws=mr.DRAW_RATE) == pytest.approx(1e3)
    assert mr.category("addmm_") == "gemm" and mr.category("triton layer_norm.backward") == "norm"
