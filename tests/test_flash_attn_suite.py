"""The runner of flash-attention's own test suite (tests/flash_attn_suite/run.py), checked on a
small suite of ours written the way flash-attention's is ("cuda" tensors, CUDA queries at
import, `flash_attn` imports): it must run such a suite on a CPU, sample its cases, and tell a
pass from fusedlm's refusal of a missing feature from a failure. The real suite is not in this
repository; benchmarks/results/ has its last run."""
import json
import os
import subprocess
import sys
import textwrap

RUNNER = os.path.join(os.path.dirname(__file__), "flash_attn_suite", "run.py")

SUITE = textwrap.dedent('''
    import math
    import pytest
    import torch
    from flash_attn import flash_attn_func, flash_attn_varlen_func, flash_attn_with_kvcache
    from flash_attn.bert_padding import pad_input, unpad_input
    from flash_attn.flash_attn_interface import _get_block_size_n

    is_sm90 = torch.cuda.get_device_capability("cuda") == (9, 0)

    @pytest.mark.parametrize("seqlen", [7, 16, 33, 4096])
    @pytest.mark.parametrize("causal", [False, True])
    def test_output(seqlen, causal):
        device = "cuda"
        torch.random.manual_seed(0)
        q, k, v = (torch.randn(2, seqlen, 2, 16, device=device, dtype=torch.float16)
                   for _ in range(3))
        out = flash_attn_func(q, k, v, causal=causal)
        ref = torch.nn.functional.scaled_dot_product_attention(
            *(t.float().transpose(1, 2) for t in (q, k, v)), is_causal=causal).transpose(1, 2)
        assert (out.float() - ref).abs().max().item() < 2e-3

    def test_backend_that_ran():
        import os, fusedlm
        q = torch.randn(1, 8, 2, 16, device="cuda", dtype=torch.float16)
        flash_attn_func(q, q, q)
        assert fusedlm.explain("attention").backend == os.environ["FUSEDLM_BACKEND"]

    def test_where_tensors_live():
        assert is_sm90
        assert torch.randn(2, device="cuda").device.type == "cpu"
        assert torch.zeros(2).to("cuda").device.type == "cpu"

    def test_padding_round_trip():
        x = torch.randn(3, 5, 4, device="cuda")
        mask = torch.arange(5, device="cuda")[None] < torch.tensor([[5], [2], [4]], device="cuda")
        rows, indices, cu, max_seqlen, used = unpad_input(x, mask)
        assert rows.shape == (11, 4) and max_seqlen == 5 and cu.tolist() == [0, 5, 7, 11]
        assert used.tolist() == [5, 2, 4]
        assert torch.equal(pad_input(rows, indices, 3, 5), x * mask[..., None])

    def test_kvcache():
        q = torch.randn(1, 1, 2, 16, device="cuda", dtype=torch.float16)
        flash_attn_with_kvcache(q, q, q)

    def test_refused_unaligned_argument():
        q = torch.randn(1, 4, 2, 16, device="cuda", dtype=torch.float16)
        flash_attn_func(q, q, q, window_size=(1.5, 0))

    def test_wrong_answer():
        q = torch.randn(1, 4, 2, 16, device="cuda", dtype=torch.float16)
        assert flash_attn_func(q, q, q).abs().sum() < 0

    def test_suite_own_error():
        raise ValueError("a ValueError in the suite's code is a failure, not a refusal")

    @pytest.mark.parametrize("d", [16, 256])
    def test_headdim(d):
        assert d == 16

    def test_skipped_by_suite():
        pytest.skip("too big for this device")
''')


def test_runner_on_a_suite_written_like_flash_attentions(tmp_path):
    suite = tmp_path / "test_flash_attn.py"
    suite.write_text(SUITE)
    summary_file = tmp_path / "summary.json"
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)  # the runner sets it for a CPU run
    run = subprocess.run([sys.executable, RUNNER, "--suite", str(suite), "--per-test", "5",
                          "--max-seqlen", "64", "--max-headdim", "64", "--json", str(summary_file),
                          "--device", "cpu", "--backend", "triton"],
                         capture_output=True, text=True, env=env, timeout=600)
    assert run.returncode == 1, run.stdout + run.stderr  # two failures
    summary = json.loads(summary_file.read_text())
    # test_output: 8 cases, the two at seqlen 4096 over --max-seqlen, 5 of the other 6 sampled;
    # the Triton kernels ran them (test_backend_that_ran), under the interpreter.
    # test_headdim: its d=256 case over --max-headdim (it would fail).
    assert summary["collected"] == 18 and summary["finished"] and summary["backend"] == "triton"
    assert summary["running"] is None
    assert summary["outcomes"] == {"passed": 9, "refused": 2, "failed": 2,
                                   "skipped by the suite": 1}, summary
    assert summary["per_function"]["test_output"] == {"passed": 5}
    assert summary["per_function"]["test_kvcache"] == {"refused": 1}
    refusals = summary["refusals"]
    assert any(m.startswith("ValueError: flash_attn_with_kvcache") for m in refusals)
    assert any("window_size" in m for m in refusals)
    failed = sorted(f["test"] for f in summary["failures"])
    assert failed == ["test_suite_own_error", "test_wrong_answer"], summary["failures"]


def test_runner_samples_the_same_cases_for_a_seed(tmp_path):
    """--seed fixes the sample, so a recorded run can be repeated case for case."""
    suite = tmp_path / "test_flash_attn.py"
    suite.write_text(SUITE)
    lists = []
    for _ in range(2):
        run = subprocess.run([sys.executable, RUNNER, "--suite", str(suite), "--per-test", "3",
                              "--seed", "7", "--device", "cpu", "--", "--collect-only"],
                             capture_output=True, text=True, timeout=600)
        lists.append([line for line in run.stdout.splitlines() if "::test_output" in line])
    assert len(lists[0]) == 3 and lists[0] == lists[1], lists
