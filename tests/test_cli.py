"""The `fusedlm` command on tiny settings: outputs produced, bad arguments a usage error."""
import json

import pytest

from fusedlm.cli import main


def test_bench_lm_loss_writes_json(tmp_path, capsys):
    out = tmp_path / "lm_loss.json"
    assert main(["bench", "lm_loss", "--case", "tiny", "--dtype", "fp32", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    impls = {r["impl"] for r in payload["results"]}
    assert {"hf full logits", "fusedlm[torch]"} <= impls
    assert all(r["labelled"] > 0 and r["ms"] > 0 for r in payload["results"])
    assert payload["environment"]["git_commit"]
    assert "TFLOP/s" in capsys.readouterr().out


def test_info_lists_every_op():
    assert main(["info"]) == 0


@pytest.mark.parametrize("argv", [["bench"], ["bench", "softmax"], ["bench", "lm_loss", "--case", "nope"],
                                  ["bench", "lm_loss", "--dtype", "fp8"], ["frobnicate"]])
def test_bad_arguments_are_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "usage:" in capsys.readouterr().err


def test_bench_attention_writes_json(tmp_path):
    out = tmp_path / "attention.json"
    assert main(["bench", "attention", "--seq", "32", "--head-dim", "16", "--tokens", "64",
                 "--dtype", "fp32", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert {r["impl"] for r in results} >= {"fusedlm[torch]", "fusedlm[torch] packed"}
    assert {r["direction"] for r in results} == {"fwd", "fwd+bwd"}
    assert all(r["ms"] > 0 for r in results)


def test_bench_model_writes_json(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "model.json"
    assert main(["bench", "model", "--case", "bert-tiny", "--padding", "0.5", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert {r["impl"] for r in results} >= {"hf eager (sdpa)", "hf patched by fusedlm", "fusedlm model"}
    assert all(r["tokens_per_s"] > 0 and r["padding"] == 0.5 for r in results)
