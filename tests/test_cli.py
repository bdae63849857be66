"""The `fusedlm` command on tiny settings: outputs produced, bad arguments a usage error."""
import json

import pytest
import torch

from conftest import HAS_GPU
from fusedlm.cli import main


def test_bench_lm_loss_writes_json(tmp_path, capsys):
    out = tmp_path / "lm_loss.json"
    assert main(["bench", "lm_loss", "--case", "tiny", "--dtype", "fp32", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    order = [r["impl"] for r in payload["results"]]
    impls = set(order)
    assert {"hf full logits", "fusedlm[torch]", "fusedlm[torch], capacity", "fusedlm[torch], fp32 accum"} <= impls
    # Timed in the order a cut-short GPU run should keep them: the base, the peers (and on a GPU
    # fusedlm's kernels), then fusedlm's variants, its reference backend last.
    assert order[:2] == ["hf full logits", "torch.compile(ref)"] and order[-1] == "fusedlm[torch]"
    assert order.index("fusedlm[torch], capacity") > order.index("torch.compile(ref)")
    assert all(r["labelled"] > 0 and r["ms"] > 0 for r in payload["results"])
    assert payload["environment"]["git_commit"]
    assert "TFLOP/s" in capsys.readouterr().out


def test_bench_lm_loss_chunk_sweep(tmp_path, monkeypatch):
    """--chunk-rows times the backend dispatch picks at each chunk size, beside what --impl
    names, and hands each size to the op; none of those rows enters a measured table."""
    from fusedlm.bench import lm_loss as loss_bench
    from fusedlm.bench.tune import fusedlm_backend
    seen = []
    real = loss_bench.lm_loss

    def recording(*args, chunk_size=None, **kwargs):
        seen.append(chunk_size)
        return real(*args, chunk_size=chunk_size, **kwargs)
    monkeypatch.setattr(loss_bench, "lm_loss", recording)
    out = tmp_path / "lm_loss.json"
    assert main(["bench", "lm_loss", "--case", "tiny", "--dtype", "fp32", "--impl", "fusedlm[torch]",
                 "--chunk-rows", "3", "16", "--out", str(out)]) == 0
    impls = [r["impl"] for r in json.loads(out.read_text())["results"]]
    assert impls == ["hf full logits", "fusedlm[torch]", "fusedlm[torch], chunk 3",
                     "fusedlm[torch], chunk 16"]
    assert {3, 16, None} == set(seen)
    assert fusedlm_backend("fusedlm[torch], chunk 3") is None


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
    # On a GPU the fused kernels run in bf16 (fp32 attention is the reference there).
    args = ["--head-dim", "64", "--dtype", "bf16"] if HAS_GPU else ["--head-dim", "16", "--dtype", "fp32"]
    assert main(["bench", "attention", "--seq", "32", "--tokens", "64", *args, "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    ours = "fusedlm[triton]" if HAS_GPU else "fusedlm[torch]"
    assert {r["impl"] for r in results} >= {ours, f"{ours} packed"}
    assert {r["direction"] for r in results} == {"fwd", "fwd+bwd"}
    assert all(r["ms"] > 0 for r in results)


def test_bench_attention_times_only_the_named_implementations(tmp_path):
    out = tmp_path / "attention.json"
    ours = "fusedlm[triton]" if HAS_GPU else "fusedlm[torch]"
    args = ["--head-dim", "64", "--dtype", "bf16"] if HAS_GPU else ["--head-dim", "16", "--dtype", "fp32"]
    assert main(["bench", "attention", "--seq", "32", "--tokens", "64", *args, "--impl", ours,
                 "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert {r["impl"] for r in results} == {ours, f"{ours} packed", f"{ours} padded+mask"}


def test_bench_model_writes_json(tmp_path):
    pytest.importorskip("transformers")
    out = tmp_path / "model.json"
    assert main(["bench", "model", "--case", "bert-tiny", "--padding", "0.5", "--out", str(out)]) == 0
    results = json.loads(out.read_text())["results"]
    assert {r["impl"] for r in results} == {"hf eager (sdpa)", "hf patched by fusedlm",
                                            "fusedlm model", "fusedlm model, packed"}
    assert all(r["tokens_per_s"] > 0 and r["padding"] == 0.5 and r["host_ms"] > 0 for r in results)
    # The activation memory each eager step keeps, counted here too: at half padding fusedlm's
    # model (no padding rows, the MLM head on labelled rows only) keeps less than Hugging Face.
    saved = {r["impl"]: r["saved_mib"] for r in results}
    assert all(v > 0 for v in saved.values()) and saved["fusedlm model"] < saved["hf eager (sdpa)"]
    # Compiled variants (a GPU's default; timing them here would cost minutes of compiling).
    from fusedlm.bench import model as model_bench
    impls, _ = model_bench._impls("gpt2", model_bench.CASES["gpt2-tiny"][3], "cpu", compiled=True)
    assert {name: layout for name, (_, layout) in impls.items()} == {
        "hf eager (sdpa)": "padded", "hf torch.compile": "padded", "hf patched by fusedlm": "padded",
        "fusedlm model": "padded", "fusedlm model, packed": "packed",
        "fusedlm model, compiled": "padded", "fusedlm model, packed, compiled": "packed"}
    impls, _ = model_bench._impls("llama", model_bench.CASES["llama-tiny"][3], "cpu", compiled=False)
    assert {name: layout for name, (_, layout) in impls.items()} == {
        "hf eager (sdpa)": "padded", "hf patched by fusedlm": "padded",
        "hf patched, padding-free (flattened)": "flattened"}
    kw, _ = model_bench._batch("llama", 3, 16, 1000, 0.5, "cpu")
    flat = model_bench._flattened(kw)
    real = kw["attention_mask"].bool()
    assert torch.equal(flat["input_ids"][0], kw["input_ids"][real])
    assert int((flat["position_ids"][0] == 0).sum()) == 3 == int((flat["labels"][0] == -100).sum())


def test_bench_model_times_every_eager_row_before_any_compile(monkeypatch):
    """Compiles take most of a fresh GPU machine's time: every case's eager implementations
    run before the first compiled one, so a run cut by its time limit keeps them, and each
    compiled row still gets its case's Hugging Face baseline."""
    from fusedlm.bench import model as model_bench

    class Fake:
        def __init__(self, name, compiled):
            self.name = name
            if compiled:
                self._orig_mod = self

        def train(self):
            pass
    fakes = {"hf eager (sdpa)": (False, "padded"), "hf torch.compile": (True, "padded"),
             "fusedlm model": (False, "padded"), "fusedlm model, compiled": (True, "padded"),
             "fusedlm model, packed, compiled": (True, "packed")}
    monkeypatch.setattr(model_bench, "_impls", lambda family, overrides, device, compiled: (
        {n: (Fake(n, c), layout) for n, (c, layout) in fakes.items()}, 100))
    monkeypatch.setattr(model_bench, "_batch", lambda family, b, s, v, padding, device: ({}, b * s))
    monkeypatch.setattr(model_bench, "_packed", lambda kw, seq: {})
    order = []
    monkeypatch.setattr(model_bench, "_step", lambda model, kw, device: lambda: order.append(model.name))
    monkeypatch.setattr(model_bench, "time_ms", lambda step, device, **k: step() or 2.0)
    monkeypatch.setattr(model_bench, "host_ms", lambda step: 0.1)
    monkeypatch.setattr(model_bench, "saved_mib", lambda model, kw, device: 1.0)
    rows = model_bench.run(cases=("bert-tiny", "gpt2-tiny"), paddings=(0.0, 0.5), device="cpu",
                           compiled=True, log=lambda *a: None)
    phases = ["compiled" if "compile" in r["impl"] else "eager" for r in rows]
    assert phases == ["eager"] * 8 + ["compiled"] * 12
    # Of the compiled rows, what the targets compare first, for every case; the padded
    # fusedlm compile after them.
    assert [r["impl"] for r in rows[8:]] == ["hf torch.compile", "fusedlm model, packed, compiled"] * 4 \
        + ["fusedlm model, compiled"] * 4
    assert [(r["case"], r["padding"]) for r in rows[8:16:2]] == [
        ("bert-tiny", 0.0), ("bert-tiny", 0.5), ("gpt2-tiny", 0.0), ("gpt2-tiny", 0.5)]
    assert all(r["speedup_vs_hf_eager"] == 1.0 for r in rows)


def test_bench_writes_table_csv_and_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    csv_path, png = tmp_path / "ln.csv", tmp_path / "ln.png"
    assert main(["bench", "layer_norm", "--rows", "64", "--widths", "128", "256", "--dtype", "fp32",
                 "--csv", str(csv_path), "--plot", str(png)]) == 0
    header, *rows = csv_path.read_text().splitlines()
    assert header.split(",")[:3] == ["op", "direction", "dtype"] and len(rows) >= 4
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    out = capsys.readouterr().out
    assert "speedup_vs_torch" in out and "gbps" in out  # the table


@pytest.mark.parametrize("argv", [["pretrain", "--steps", "0"], ["pretrain", "--dropout", "1.5"],
                                  ["pretrain", "--hidden", "30", "--heads", "4"],
                                  ["pretrain", "--corpus", "/no/such/file"],
                                  ["pretrain", "--impl", "mine"], ["bench", "layer_norm", "--rows", "-3"]])
def test_bad_pretrain_and_bench_values_are_a_usage_error(argv, capsys):
    with pytest.raises(SystemExit) as info:
        main(argv)
    assert info.value.code == 2
    assert "error:" in capsys.readouterr().err


@pytest.mark.parametrize("op", ["lm_loss", "attention", "layer_norm"])
def test_bench_impl_that_is_not_available_is_named_not_skipped(op, capsys):
    """A name --impl (the API's peers) does not know is an error listing what is available
    here: a typo must not leave a table of the baseline alone (the tune steps read it)."""
    from fusedlm.bench import attention as attn_bench, layer_norm as ln_bench, lm_loss as loss_bench
    if op == "lm_loss":
        with pytest.raises(SystemExit) as info:
            main(["bench", "lm_loss", "--case", "tiny", "--dtype", "fp32", "--impl", "fusedlm[trtion]"])
        assert info.value.code == 2
        err = capsys.readouterr().err
        assert "fusedlm[trtion] not available here" in err and "fusedlm[torch]" in err
        return
    run = {"attention": lambda: attn_bench.run(seqlens=(16,), head_dims=(16,), tokens=32, device="cpu",
                                               peers=["sdpa[nope]"], log=lambda *a: None),
           "layer_norm": lambda: ln_bench.run(dtypes=(torch.float32,), rows=(8,), widths=(64,),
                                              device="cpu", peers=["liger[x]"], log=lambda *a: None)}[op]
    with pytest.raises(ValueError, match=r"peers \(--impl\): .* not available here; available: "):
        run()


def test_bench_out_holds_what_was_measured_before_a_cut(tmp_path, monkeypatch):
    """--out is rewritten as each result comes (complete: false), so a bench stopped by a time
    limit (gpu_run.sh's steps) leaves what it measured; the finished run says complete: true."""
    from fusedlm.bench import lm_loss as loss_bench
    out = tmp_path / "lm_loss.json"
    seen = []
    real = loss_bench.time_ms

    def cut_after_two(*a, **k):
        if len(seen) == 2:
            raise KeyboardInterrupt  # what the time limit's signal does mid-run
        seen.append(1)
        return real(*a, **k)
    monkeypatch.setattr(loss_bench, "time_ms", cut_after_two)
    with pytest.raises(KeyboardInterrupt):
        main(["bench", "lm_loss", "--case", "tiny", "--dtype", "fp32", "--out", str(out)])
    payload = json.loads(out.read_text())
    assert payload["complete"] is False and len(payload["results"]) == 2
    assert payload["environment"]["git_commit"]
    monkeypatch.setattr(loss_bench, "time_ms", real)
    assert main(["bench", "lm_loss", "--case", "tiny", "--dtype", "fp32", "--out", str(out)]) == 0
    payload = json.loads(out.read_text())
    assert payload["complete"] is True and len(payload["results"]) > 2


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks a machine with no GPU")
@pytest.mark.parametrize("op", ["layer_norm", "lm_loss", "attention"])
def test_tune_without_a_gpu_is_a_usage_error(op, tmp_path, capsys):
    with pytest.raises(SystemExit) as info:
        main(["bench", op, "--tune", str(tmp_path / "t.json")])
    assert info.value.code == 2 and "--tune measures" in capsys.readouterr().err
    assert not (tmp_path / "t.json").exists()


TINY = ["--steps", "12", "--finetune-steps", "6", "--batch", "8", "--hidden", "32", "--heads", "2",
        "--docs", "60", "--vocab", "200", "--no-progress"]


def test_pretrain_fused_and_reference_side_by_side(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    pytest.importorskip("matplotlib")
    out = tmp_path / "run"
    assert main(["pretrain", *TINY, "--out", str(out)]) == 0
    report = json.loads((out / "metrics.json").read_text())
    fused, ref = report["results"]["fused"], report["results"]["reference"]
    assert len(fused["curve"]) == 12 and len(fused["finetune_curve"]) == 6
    # Same seed, same batches, dropout off: the same curve, step by step.
    for a, b in zip(fused["curve"], ref["curve"]):
        assert abs(a["loss"] - b["loss"]) < 1e-3 * b["loss"], (a, b)
    assert report["curves_agree"] and report["speedup"] > 0
    assert 0 <= fused["finetune_accuracy"] <= 1 and fused["tokens_per_s"] > 0
    assert (out / "loss.png").read_bytes()[:4] == b"\x89PNG"
    assert (out / "tokenizer.json").exists()
    text = capsys.readouterr().out
    assert "masked-LM accuracy" in text and "the same curve" in text


def test_pretrain_compiled_is_one_graph_on_the_same_curve(tmp_path, capsys, monkeypatch):
    """--compile: fusedlm's side compiled whole (fullgraph: a graph break fails), batches padded
    to one shape, the MLM head at a fixed capacity; its curve is the reference's. aot_eager
    stands in for inductor, whose CPU compile would take a minute here."""
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    compiles, real_compile = [], torch.compile

    def compile_(model, **kw):
        compiles.append(kw)
        return real_compile(model, fullgraph=kw["fullgraph"], backend="aot_eager")
    monkeypatch.setattr(torch, "compile", compile_)
    torch._dynamo.reset()
    out = tmp_path / "run"
    assert main(["pretrain", "--compile", *TINY, "--out", str(out)]) == 0
    assert [c["fullgraph"] for c in compiles] == [True, True]  # pretraining and fine-tuning
    report = json.loads((out / "metrics.json").read_text())
    fused, ref = report["results"]["fused"], report["results"]["reference"]
    for a, b in zip(fused["curve"], ref["curve"]):
        assert abs(a["loss"] - b["loss"]) < 1e-3 * b["loss"], (a, b)
    assert report["settings"]["compile"] and "fusedlm, compiled" in capsys.readouterr().out


def test_pretrain_on_a_corpus_file(tmp_path):
    pytest.importorskip("tokenizers")
    corpus = tmp_path / "corpus.txt"
    corpus.write_text("\n\n".join("\n".join(f"line {d} {i} of document {d} ." for i in range(4))
                                  for d in range(20)))
    assert main(["pretrain", *TINY, "--impl", "fused", "--corpus", str(corpus),
                 "--out", str(tmp_path / "run")]) == 0
    one_line = tmp_path / "one.txt"
    one_line.write_text("just one line\n")
    with pytest.raises(SystemExit) as info:  # no document with two sentences: a usage error
        main(["pretrain", *TINY, "--corpus", str(one_line), "--out", ""])
    assert info.value.code == 2


def test_demo_checks_then_pretrains(tmp_path, capsys):
    pytest.importorskip("tokenizers")
    pytest.importorskip("transformers")
    assert main(["demo", *TINY, "--out", str(tmp_path / "run")]) == 0
    text = capsys.readouterr().out
    assert "all checks passed" in text and "masked-LM accuracy" in text
    last = text.strip().splitlines()[-1]  # the verdict, last
    assert last.startswith("verdict: every kernel that runs here matches the float64 reference; "
                           "fusedlm's BERT trains like Hugging Face's"), last
    assert "x its tokens/s on this CPU" in last or "on this GPU" in last, last


def test_verdict_says_what_failed():
    from fusedlm.cli import _verdict
    line = _verdict(1, dict(curves_agree=False, speedup=0.9, device="cpu"))
    assert "A CORRECTNESS CHECK FAILED" in line and "THE LOSS CURVES DIFFER" in line


def test_verdict_reports_the_realistic_step_where_it_ran():
    from fusedlm.cli import _DEMO_STEP_IMPLS, _verdict
    from fusedlm.bench import model as model_bench
    line = _verdict(0, dict(curves_agree=True, speedup=1.1, device="cuda:0",
                            realistic_step=(1.8, 1.4)))
    assert "a BERT-base training step runs 1.80x Hugging Face eager's speed" in line
    assert "compiled: 1.40x" in line
    # The demo's GPU step times implementations the model benchmark has, on a case it has.
    impls, _ = model_bench._impls("bert", model_bench.CASES["bert-tiny"][3], "cpu", compiled=True)
    names = {n.replace(" + CUDA graphs", "") for n in _DEMO_STEP_IMPLS}
    assert names <= set(impls) and "bert-base-demo" in model_bench.CASES
    # Compiled, fusedlm's BERT computes a capacity of MLM rows; the benchmark's batches fit it.
    for name in ("fusedlm model, compiled", "fusedlm model, packed, compiled"):
        assert impls[name][0]._orig_mod.config.mlm_capacity == model_bench.MLM_CAPACITY
    assert impls["fusedlm model"][0].config.mlm_capacity is None
    for case in ("bert-base", "bert-base-demo"):
        _, batch, seq, _ = model_bench.CASES[case]
        kw, _ = model_bench._batch("bert", batch, seq, 30522, 0.0, "cpu")
        assert (kw["labels"] != -100).sum() < model_bench.MLM_CAPACITY * batch * seq * 0.8
