"""`fusedlm pretrain`: pretrain a small BERT (masked LM + next sentence) on a built-in corpus,
fine-tune it on a sentence-classification task, fused and reference side by side.

The two implementations start from the same weights and see the same batches:
  * fused: fusedlm's BertForPreTraining / BertForSequenceClassification (packed sequences, fused
    attention, layer norm and masked-LM loss, dispatched to the best verified backend here);
  * reference: Hugging Face transformers' BERT with its own attention (sdpa) and the loss over
    full logits, the path users run today.
With dropout off (the default) their arithmetic is the same up to rounding, so their loss curves
agree within a tolerance that the run reports; the speed ratio is measured on the same steps.
Under torchrun each process takes its slice of every global batch (DistributedDataParallel).
"""
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import Dict, NamedTuple, Optional

import torch
import torch.nn.functional as F

from .. import models as fm
from . import corpus as corpus_mod
from .data import ClassificationBatches, PretrainingBatches, encode, train_tokenizer


@dataclass
class Settings:
    steps: int = 400              # pretraining steps
    finetune_steps: int = 600
    batch: int = 32               # global batch (split across processes under torchrun)
    max_len: int = 64
    hidden: int = 128
    layers: int = 2
    heads: int = 2
    vocab: int = 512              # WordPiece vocabulary size, at most
    lr: float = 2e-3
    finetune_lr: float = 3e-4     # 1e-3 spiked (batch loss back to 0.5-1.1 after ~0) in 2 of 4 seeds
    dropout: float = 0.0          # 0: the two implementations' curves coincide
    docs: int = 2000              # generated documents (ignored with corpus)
    corpus: Optional[str] = None  # a text file: one sentence per line, blank line between documents
    seed: int = 0
    dtype: str = "auto"           # fp32 | bf16 | auto (bf16 autocast on a GPU, fp32 on a CPU)
    impls: tuple = ("fused", "reference")
    # fusedlm's side as one compiled graph: every batch padded to max_len (static shapes, so one
    # graph serves the run), the MLM head at a fixed capacity, CUDA graphs on a GPU.
    compile: bool = False
    out: Optional[str] = "fusedlm-pretrain"
    progress: bool = True
    # The largest loss gap between the curves (mean over a 10-step window) in the first quarter
    # of pretraining that still counts as "the same curve". A wrong gradient shows there at once;
    # later, training amplifies rounding differences (the whole-run gap is reported, not judged).
    curve_tolerance: Dict[str, float] = field(default_factory=lambda: {"fp32": 0.05, "bf16": 0.15})


def model_config(s: Settings, vocab: int) -> dict:
    """The BERT both implementations build (Hugging Face's BertConfig fields), for a vocabulary
    of `vocab` words; `fusedlm bench host` times a step of it."""
    return dict(vocab_size=vocab, hidden_size=s.hidden, num_hidden_layers=s.layers,
                num_attention_heads=s.heads, intermediate_size=4 * s.hidden,
                max_position_embeddings=s.max_len, hidden_dropout_prob=s.dropout,
                attention_probs_dropout_prob=s.dropout, num_labels=2)


# ---- the two implementations ------------------------------------------------------------------

class PretrainStep(NamedTuple):
    loss: torch.Tensor          # mlm + nsp: what is trained on
    mlm: torch.Tensor
    nsp: torch.Tensor
    mlm_accuracy: torch.Tensor
    nsp_logits: torch.Tensor


class _Fused:
    name = "fused"
    label = "fusedlm"

    def __init__(self, cfg, compile_len=None):
        # compile_len: compiled, every batch padded to this length (see Settings.compile); the
        # MLM head then computes a quarter of the tokens (15% of the real ones are labelled).
        self.compile_len = compile_len
        self.cfg = fm.BertConfig(**cfg, mlm_capacity=0.25 if compile_len else None)
        if compile_len:
            self.label = "fusedlm, compiled" + (" + CUDA graphs" if torch.cuda.is_available() else "")

    def pretraining_model(self):
        return fm.BertForPreTraining(self.cfg)

    def classifier(self):
        return fm.BertForSequenceClassification(self.cfg)

    def compiled(self, model):
        """What the trainer steps on: the model, or its compiled graph."""
        if not self.compile_len:
            return model
        mode = "reduce-overhead" if next(model.parameters()).is_cuda else None
        return torch.compile(model, fullgraph=True, mode=mode)

    def _static(self, b):
        """The batch padded to compile_len (one shape for the whole run), or as it is."""
        width = b["input_ids"].shape[1]
        if not self.compile_len or width == self.compile_len:
            return b
        fill = {"labels": -100}
        return {k: (F.pad(v, (0, self.compile_len - width), value=fill.get(k, 0)) if v.dim() == 2 else v)
                for k, v in b.items()}

    def pretrain_losses(self, model, b):
        torch.compiler.cudagraph_mark_step_begin()  # a new step for CUDA graphs (else a no-op)
        out = model(**self._static(b))
        return PretrainStep(out.loss, out.mlm_loss, out.nsp_loss, out.mlm_accuracy,
                            out.seq_relationship_logits)

    def classify(self, model, b):
        torch.compiler.cudagraph_mark_step_begin()
        out = model(**self._static(b))
        return out.loss, out.logits


class _Reference:
    """Hugging Face's BERT, losses computed as BertForPreTraining computes them (full logits)."""
    name = "reference"
    label = "Hugging Face (sdpa)"

    def __init__(self, cfg):
        import transformers
        self.tf = transformers
        self.cfg = transformers.BertConfig(**cfg, attn_implementation="sdpa")

    def pretraining_model(self):
        return self.tf.BertForPreTraining(self.cfg)

    def classifier(self):
        return self.tf.BertForSequenceClassification(self.cfg)

    @staticmethod
    def pretrain_losses(model, b):
        out = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"],
                    token_type_ids=b["token_type_ids"])
        logits, labels = out.prediction_logits, b["labels"]
        mlm = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), labels.reshape(-1))
        nsp = F.cross_entropy(out.seq_relationship_logits.float(), b["next_sentence_label"])
        sel = labels != -100
        acc = (logits.detach().argmax(-1)[sel] == labels[sel]).float().mean()
        return PretrainStep(mlm + nsp, mlm, nsp, acc, out.seq_relationship_logits)

    @staticmethod
    def classify(model, b):
        out = model(**b)
        return out.loss, out.logits

    @staticmethod
    def compiled(model):
        return model  # Hugging Face's side runs eager, as users run it today


# ---- plumbing ---------------------------------------------------------------------------------

class _Dist:
    """torchrun's environment, or one process."""

    def __init__(self, device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = device
        if self.world > 1:
            import torch.distributed as dist
            self.dist = dist
            if device.type == "cuda":
                local = int(os.environ.get("LOCAL_RANK", "0"))
                if local >= torch.cuda.device_count():
                    raise RuntimeError(
                        f"torchrun started process {local} on this node but only "
                        f"{torch.cuda.device_count()} GPU(s) are visible: one process per GPU "
                        "(--nproc_per_node), or CUDA_VISIBLE_DEVICES= to train on CPU processes")
                self.device = torch.device("cuda", local)
                torch.cuda.set_device(self.device)
            self.owns_group = not dist.is_initialized()
            if self.owns_group:
                dist.init_process_group("nccl" if device.type == "cuda" else "gloo")

    @property
    def main(self):
        return self.rank == 0

    def wrap(self, model):
        if self.world == 1:
            return model
        ids = [self.device.index] if self.device.type == "cuda" else None
        return torch.nn.parallel.DistributedDataParallel(model, device_ids=ids)

    def sum(self, values):
        t = torch.tensor(values, dtype=torch.float64, device=self.device)
        if self.world > 1:
            self.dist.all_reduce(t)
        return t.tolist()

    def close(self):
        if self.world > 1 and self.owns_group:
            self.dist.destroy_process_group()

    def broadcast(self, obj):
        if self.world == 1:
            return obj
        box = [obj]
        self.dist.broadcast_object_list(box, src=0)
        return box[0]


def _schedule(opt, steps, warmup_frac=0.1):
    warmup = max(1, int(steps * warmup_frac))
    return torch.optim.lr_scheduler.LambdaLR(
        opt, lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))))


def _optimizer(model, lr):
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    rest = [p for n, p in model.named_parameters() if p.dim() < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": 0.01},
                              {"params": rest, "weight_decay": 0.0}], lr=lr)


class _Progress:
    """tqdm on a terminal; on a pipe (CI, logs) a line every quarter of the run."""

    def __init__(self, total, desc, enabled):
        self.total, self.desc, self.n, self.bar = total, desc, 0, None
        self.enabled = enabled
        if enabled and sys.stderr.isatty():
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc=desc, unit="step", leave=True, dynamic_ncols=True)
            except ImportError:
                pass

    def update(self, **stats):
        self.n += 1
        if not self.enabled:
            return
        text = {k: (f"{v:.3g}" if isinstance(v, float) else v) for k, v in stats.items()}
        if self.bar is not None:
            self.bar.set_postfix(text, refresh=False)
            self.bar.update()
        elif self.n == self.total or self.n % max(1, self.total // 4) == 0:
            print(f"  {self.desc} step {self.n}/{self.total}  " +
                  "  ".join(f"{k} {v}" for k, v in text.items()), flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _autocast(device, dtype):
    if dtype == torch.float32:
        return torch.autocast(device.type, enabled=False)
    return torch.autocast(device.type, dtype=dtype)


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


# ---- the run ----------------------------------------------------------------------------------

def run(s: Settings, device=None, log=print) -> dict:
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dist = _Dist(device)
    device = dist.device
    say = log if dist.main else (lambda *a, **k: None)
    dtype_name = s.dtype if s.dtype != "auto" else ("bf16" if device.type == "cuda" else "fp32")
    dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype_name]
    if s.batch % dist.world:
        raise ValueError(f"--batch ({s.batch}) must be a multiple of the number of processes ({dist.world})")

    # Data: corpus, tokenizer (trained once, on rank 0), encoded documents and the task.
    docs = (corpus_mod.read_documents(s.corpus) if s.corpus else
            corpus_mod.generate_documents(s.docs, seed=s.seed))
    train_set = corpus_mod.generate_reviews(2000, seed=s.seed + 1)
    test_set = corpus_mod.generate_reviews(500, seed=s.seed + 2)
    t0 = time.perf_counter()
    tok_json = None
    if dist.main:
        texts = [t for d in docs for t in d] + [t for t, _ in train_set]
        tok_json = train_tokenizer(texts, s.vocab).to_str()
    tok_json = dist.broadcast(tok_json)
    from tokenizers import Tokenizer
    tok = Tokenizer.from_str(tok_json)
    vocab = tok.get_vocab_size()
    flat = [t for d in docs for t in d]
    enc = iter(encode(tok, flat))
    enc_docs = [[next(enc) for _ in d] for d in docs]
    say(f"corpus: {'file ' + s.corpus if s.corpus else 'generated'}, {len(docs)} documents, "
        f"{len(flat)} sentences; WordPiece vocabulary {vocab} (trained in "
        f"{time.perf_counter() - t0:.1f} s)")
    pre = PretrainingBatches(enc_docs, vocab, s.max_len, seed=s.seed)
    cls_train = ClassificationBatches(encode(tok, [t for t, _ in train_set]),
                                      [y for _, y in train_set], s.max_len, seed=s.seed)
    cls_test = ClassificationBatches(encode(tok, [t for t, _ in test_set]),
                                     [y for _, y in test_set], s.max_len, seed=s.seed)

    cfg = model_config(s, vocab)
    impls = []
    for name in s.impls:
        if name == "reference":
            try:
                impls.append(_Reference(cfg))
            except ImportError:
                say("reference: transformers is not installed (pip install 'fusedlm[demo]'); "
                    "running the fused implementation alone")
        else:
            impls.append(_Fused(cfg, s.max_len if s.compile else None))
    if not impls:
        raise ValueError("nothing to run: --impl selected no available implementation")

    # One initialization for both: fusedlm's models take Hugging Face's parameter names.
    torch.manual_seed(s.seed)
    init = impls[0].pretraining_model().state_dict()
    torch.manual_seed(s.seed + 1)
    head = torch.nn.Linear(s.hidden, 2)
    torch.nn.init.normal_(head.weight, std=0.02)
    torch.nn.init.zeros_(head.bias)
    say(f"model: BERT, {s.layers} layers, hidden {s.hidden}, {s.heads} heads, seq <= {s.max_len}, "
        f"{sum(v.numel() for k, v in init.items() if k != 'cls.predictions.decoder.weight') / 1e6:.2f}M "
        f"parameters; {dtype_name} on {device.type}" + (f", {dist.world} processes" if dist.world > 1 else ""))

    results = _train(impls, s, init, head, pre, cls_train, cls_test, dist, dtype)

    report = _report(s, results, impls, vocab, dtype_name, device, dist, say)
    if dist.main and s.out:
        os.makedirs(s.out, exist_ok=True)
        with open(os.path.join(s.out, "metrics.json"), "w") as f:
            json.dump(report, f, indent=1)
        tok.save(os.path.join(s.out, "tokenizer.json"))
        plot = _plot(results, impls, os.path.join(s.out, "loss.png"))
        say(f"\nwrote {s.out}/metrics.json, {s.out}/tokenizer.json" +
            (f", {plot}" if plot else " (no plot: matplotlib is not installed)"))
    dist.close()
    return report


class _Trainer:
    """One model, its optimizer and schedule, stepping on the batches it is given and timing
    itself (after a few warm-up steps that compile kernels and fill caches)."""

    def __init__(self, model, lr, steps, dist, dtype, compiled=lambda m: m):
        self.model, self.dist, self.dtype = model.to(dist.device).train(), dist, dtype
        self.ddp = compiled(dist.wrap(self.model))
        self.opt = _optimizer(self.model, lr)
        self.sched = _schedule(self.opt, steps)
        self.warmup = min(5, steps // 5)
        self.n = self.tokens = 0
        self.elapsed = 0.0

    def step(self, loss_fn, batch):
        """loss_fn(model, batch) -> a tuple whose first item is the loss; one optimizer step
        on it. Returns the tuple."""
        device = self.dist.device
        _sync(device)
        t0 = time.perf_counter()
        with _autocast(device, self.dtype):
            out = loss_fn(self.ddp, batch)
        out[0].backward()
        # Gradient-norm clipping at 1, as BERT's recipe: measured over seeds 0-9 on a CPU, it
        # lifted next-sentence accuracy (seed 0: 48% -> 61%) and kept fine-tuning at 100%.
        torch.nn.utils.clip_grad_norm_(self.model.parameters(), 1.0)
        self.opt.step()
        self.sched.step()
        self.opt.zero_grad(set_to_none=True)
        _sync(device)
        if self.n >= self.warmup:
            self.elapsed += time.perf_counter() - t0
            self.tokens += int(batch["attention_mask"].sum())
        self.n += 1
        return out

    def tokens_per_s(self):
        """Real (not padding) tokens a second, every process together."""
        return self.dist.sum([self.tokens / self.elapsed if self.elapsed else float("nan")])[0]


def _train(impls, s, init, head, pre, cls_train, cls_test, dist, dtype):
    """Pretrain, then fine-tune, every implementation in lockstep: each step's batch goes to
    each model in turn, so a busy machine slows them alike and the speed ratio stays fair."""
    device, world = dist.device, dist.world
    out = {i.name: dict(curve=[], finetune_curve=[]) for i in impls}
    runs = {}
    for impl in impls:
        model = impl.pretraining_model()
        model.load_state_dict(init)
        runs[impl.name] = _Trainer(model, s.lr, s.steps, dist, dtype, impl.compiled)
    bar = _Progress(s.steps, "pretrain", s.progress and dist.main)
    for step in range(s.steps):
        b = pre.batch(step, s.batch, device, dist.rank, world)
        stats = {}
        for impl in impls:
            r = runs[impl.name].step(impl.pretrain_losses, b)
            mlm, nsp, acc = r.mlm.item(), r.nsp.item(), float(r.mlm_accuracy)
            m, n, a = (v / world for v in dist.sum([mlm, nsp, acc]))
            out[impl.name]["curve"].append(dict(step=step, loss=m + n, mlm_loss=m, nsp_loss=n,
                                                mlm_accuracy=a))
            stats[f"loss[{impl.name}]"] = m + n
        bar.update(**stats, **_speed(runs, impls))
    bar.close()
    for impl in impls:
        r = out[impl.name]
        r["tokens_per_s"] = runs[impl.name].tokens_per_s()
        r.update(_evaluate_pretraining(impl, runs[impl.name].model, pre, s, dist, dtype))

    # Fine-tune: the pretrained encoder (and pooler) under a fresh classification head, the
    # same head weights for every implementation.
    tuned = {}
    for impl in impls:
        clf = impl.classifier()
        state = {k: v for k, v in runs[impl.name].model.state_dict().items() if k.startswith("bert.")}
        state.update({"classifier.weight": head.weight.detach(), "classifier.bias": head.bias.detach()})
        missing, unexpected = clf.load_state_dict(state, strict=False)
        if missing or unexpected:
            raise RuntimeError(f"fine-tuning model: missing {missing}, unexpected {unexpected}")
        tuned[impl.name] = _Trainer(clf, s.finetune_lr, s.finetune_steps, dist, dtype,
                                    impl.compiled)
    bar = _Progress(s.finetune_steps, "fine-tune", s.progress and dist.main)
    for step in range(s.finetune_steps):
        b = cls_train.batch(step, s.batch, device, dist.rank, world)
        stats = {}
        for impl in impls:
            loss, _ = tuned[impl.name].step(impl.classify, b)
            loss = dist.sum([loss.item()])[0] / world
            out[impl.name]["finetune_curve"].append(dict(step=step, loss=loss))
            stats[f"loss[{impl.name}]"] = loss
        bar.update(**stats)
    bar.close()
    for impl in impls:
        out[impl.name]["finetune_accuracy"] = _accuracy(impl, tuned[impl.name].model, cls_test,
                                                        device, dtype)
    return out


def _speed(runs, impls):
    rates = {i.name: runs[i.name].tokens / runs[i.name].elapsed for i in impls if runs[i.name].elapsed}
    if len(rates) != len(impls):
        return {}
    if len(impls) == 1:
        return {"tok/s": f"{next(iter(rates.values())):,.0f}"}
    a, b = (rates[i.name] for i in impls)
    return {"speedup": f"{a / b:.2f}x"}


def _accuracy(impl, model, batches, device, dtype):
    model.eval()
    right = total = 0
    with torch.no_grad(), _autocast(device, dtype):
        for b in batches.all(64, device):
            _, logits = impl.classify(model, {k: v for k, v in b.items() if k != "labels"})
            right += int((logits.argmax(-1) == b["labels"]).sum())
            total += len(b["labels"])
    return right / total


def _evaluate_pretraining(impl, model, pre, s, dist, dtype, batches=8):
    """Masked-LM and next-sentence accuracy on batches the training never drew."""
    model.eval()
    mlm_right = mlm_total = nsp_right = nsp_total = 0
    with torch.no_grad(), _autocast(dist.device, dtype):
        for i in range(batches):
            b = pre.batch(10 ** 9 + i, s.batch, dist.device)  # evaluation: every rank, whole batch
            r = impl.pretrain_losses(model, b)
            acc, nsp_logits = r.mlm_accuracy, r.nsp_logits
            n = int((b["labels"] != -100).sum())
            mlm_right += float(acc) * n
            mlm_total += n
            nsp_right += int((nsp_logits.argmax(-1) == b["next_sentence_label"]).sum())
            nsp_total += len(b["next_sentence_label"])
    model.train()
    return dict(mlm_accuracy=mlm_right / mlm_total, nsp_accuracy=nsp_right / nsp_total)


def _window_means(values, width=10):
    return [sum(values[i:i + width]) / len(values[i:i + width]) for i in range(0, len(values), width)]


def _report(s, results, impls, vocab, dtype_name, device, dist, say):
    names = [i.name for i in impls]
    rows = [("pretraining tokens/s", lambda r: f"{r['tokens_per_s']:,.0f}"),
            ("final loss (MLM + NSP)", lambda r: f"{r['curve'][-1]['loss']:.3f}"),
            ("masked-LM accuracy (held out)", lambda r: f"{100 * r['mlm_accuracy']:.1f}%"),
            ("next-sentence accuracy", lambda r: f"{100 * r['nsp_accuracy']:.1f}%"),
            ("fine-tuned classification accuracy", lambda r: f"{100 * r['finetune_accuracy']:.1f}%")]
    width = 36
    say("\n" + " " * width + "".join(f"{i.label:>22}" for i in impls))
    for title, fmt in rows:
        say(f"{title:<{width}}" + "".join(f"{fmt(results[n]):>22}" for n in names))
    say(f"(chance: masked-LM {100 / vocab:.1f}%, next sentence 50%, classification 50%)")
    report = dict(settings=asdict(s), device=str(device),
                  processes=dist.world, dtype=dtype_name, vocab_size=vocab,
                  results=results)
    if len(names) == 2:
        a, b = (results[n] for n in names)
        head = max(10, s.steps // 4)
        gaps = [abs(x - y) for x, y in zip(_window_means([c["loss"] for c in a["curve"]]),
                                           _window_means([c["loss"] for c in b["curve"]]))]
        gap, whole = max(gaps[:-(-head // 10)]), max(gaps)
        tol = s.curve_tolerance[dtype_name]
        ratio = a["tokens_per_s"] / b["tokens_per_s"]
        report.update(curve_gap=gap, curve_gap_whole_run=whole, curve_tolerance=tol, curves_agree=gap <= tol,
                      speedup=ratio)
        say(f"loss curves, same seed and batches: largest gap of 10-step means {gap:.4f} over the "
            f"first {head} steps (tolerance {tol}): {'the same curve' if gap <= tol else 'THE CURVES DIFFER'}; "
            f"{whole:.4f} over the whole run, where rounding differences grow")
        say(f"speed: {impls[0].label} trains at {ratio:.2f}x the tokens/s of {impls[1].label}"
            + ("" if device.type == "cuda" else
               " (on a CPU fusedlm runs PyTorch math on packed sequences, the loss on masked tokens"
               " only; its Triton and CUDA kernels need a GPU and show their speed there)"))
    return report


def _plot(results, impls, path):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    for impl, style in zip(impls, ("-", "--")):
        r = results[impl.name]
        ax1.plot([c["step"] for c in r["curve"]], [c["loss"] for c in r["curve"]], style,
                 label=f"{impl.label} ({r['tokens_per_s']:,.0f} tok/s)")
        ax2.plot([c["step"] for c in r["finetune_curve"]], [c["loss"] for c in r["finetune_curve"]],
                 style, label=f"{impl.label} (test accuracy {100 * r['finetune_accuracy']:.1f}%)")
    ax1.set(title="pretraining: masked LM + next sentence", xlabel="step", ylabel="loss")
    ax2.set(title="fine-tuning: sentence classification", xlabel="step", ylabel="loss")
    for ax in (ax1, ax2):
        ax.legend()
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
