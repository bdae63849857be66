"""What one training step (forward + backward) of `fusedlm bench model`'s cases should take on a
GPU, kernel by kernel, from the FLOPs and bytes of each: a prediction for the next GPU run to
confirm or refute, made on a machine with no GPU.

    python benchmarks/model_roofline.py                          # BERT-base and GPT-2 small, H200
    python benchmarks/model_roofline.py --case bert-base --padding 0.5 --tflops 600 --tbps 3.3

The step runs on the CPU as it would on the GPU, with the work taken out:
- every aten op that a GPU would run as a kernel is recorded (FLOPs from torch's own formulas,
  bytes as the sizes of the tensors it reads and writes); ops on floating-point tensors of 64k
  elements or more are not computed (their outputs are left unwritten: only shapes matter
  here), the rest (indices, masks, offsets, labels) run, so data-dependent shapes are exact;
- fusedlm's Triton launches are not run either: each is recorded with the FLOPs and bytes of
  what it computes (`_LAUNCH_COSTS`), and dispatch picks Triton for every op, as on a GPU, and
  the LM loss's GEMMs see the vocabulary padded as a GPU's do.
Each kernel then takes max(FLOPs / matmul rate, bytes / copy rate, dropout draws / draw rate),
as if it ran alone at the rates the machine reaches; the step is their sum. The third term is
dropout's Philox draws (csrc/common/philox.h), which make a dropout kernel issue-bound, not
memory- or matmul-bound: a Philox-4x32-10 draw is 60 integer instructions in the kernels' SASS
(Triton 3.6, sm_90a), 40 of them IMAD, which Hopper issues at 16 lanes a clock per SM
sub-partition (half the FP32 rate): `DRAW_RATE`. A fusedlm draw serves four elements, except in
the attention's dK/dV kernel, one (`--elements-per-draw 1` models the kernels before any
did: one draw an element); torch's dropout
kernel's also four, its flash attention's sixteen (FlashAttention-2's 8-bit thresholds). The
sum is a lower bound on the GPU's time: not modelled are kernels below their roofline (attention kernels reach 50-80% of the matmul
rate; small GEMMs less), the gaps between kernels (a few microseconds each: the kernel count is
printed), L2 hits and host time (`fusedlm bench host`). Beside the time, the bytes the forward
saves for the backward (activation memory: with the weights, their gradients and the optimizer's
state, what a training step's peak memory is made of).

Every model runs in bf16 (weights and activations): `fusedlm bench model` runs bf16 autocast
with fp32 weights instead, under which Hugging Face's models also cast each weight every step
and keep their residual stream and layer norms in fp32 (more bytes than here), so the Hugging
Face rows below are a lower bound on what autocast moves. The compiled implementations are not
modelled (Inductor fuses what this counts op by op).
"""
import argparse
import contextlib
import copy
import sys
from collections import defaultdict

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import flop_registry

from fusedlm.bench.harness import SavedBytes
from fusedlm.bench.host import _NO_LAUNCH
from fusedlm.bench.model import CASES, _batch, _hf_models, _packed

H200 = dict(tflops=790.0, tbps=4.3)  # the lent H200's measured rates (device/H200.md)
# Philox draws a second on an H200: 132 SMs x 4 sub-partitions x 16 IMAD lanes x 1.98 GHz over
# 40 IMAD a draw (its 20 LOP3 issue on another pipe beside them). An estimate from instruction
# counts, not a measurement.
DRAW_RATE = 132 * 4 * 16 * 1.98e9 / 40
ELEMENTS_PER_DRAW = 4  # fusedlm's masks: four elements a draw (csrc/common/philox.h)
TORCH_DROPOUT_PER_DRAW = 4  # torch's dropout kernel: curand's Philox, four floats a draw
FLASH_PER_DRAW = 16  # FlashAttention-2 (torch's flash SDPA): four 8-bit thresholds a word
# Floating-point tensors at least this large are not computed (their values do not matter here).
_SKIP_ELEMENTS = 1 << 16

_CATEGORIES = (
    ("gemm", ("mm", "addmm", "bmm", "baddbmm", "_scaled_mm")),
    ("attention", ("attention",)),
    ("norm", ("layer_norm", "rms_norm")),
    ("loss", ("lm_loss", "log_softmax", "nll_loss", "cross_entropy")),
)


def category(name):
    name = name.rstrip("_")  # an in-place variant (addmm_) is its op's kind
    for cat, keys in _CATEGORIES:
        if name in keys or any(k in name for k in keys if len(k) > 5):
            return cat
    return "other"


class Ledger:
    """Kernels of one step: [(name, FLOPs, bytes, dropout draws)], in order."""

    def __init__(self):
        self.kernels = []
        self.saved_bytes = 0

    def add(self, name, flops, nbytes, draws=0):
        self.kernels.append((name, int(flops), int(nbytes), int(draws)))

    def by_category(self, tflops, tbps, draw_rate=DRAW_RATE):
        """category -> (kernels, FLOPs, bytes, bound ms)."""
        out = defaultdict(lambda: [0, 0, 0, 0.0])
        for name, flops, nbytes, draws in self.kernels:
            row = out[category(name)]
            row[0] += 1
            row[1] += flops
            row[2] += nbytes
            row[3] += kernel_ms(flops, nbytes, tflops, tbps, draws, draw_rate)
        return dict(out)


def kernel_ms(flops, nbytes, tflops, tbps, draws=0, draw_rate=DRAW_RATE):
    return max(flops / (tflops * 1e12), nbytes / (tbps * 1e12), draws / draw_rate) * 1e3


def _tensors(tree):
    return [t for t in tree_flatten(tree)[0] if isinstance(t, torch.Tensor)]


def _nbytes(tensors):
    """Bytes of the distinct tensors (a tensor passed twice is read once)."""
    seen, total = set(), 0
    for t in tensors:
        key = (t.data_ptr(), tuple(t.shape), t.dtype) if t.device.type != "meta" else id(t)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total


def _sdpa_flops(q, k, backward, causal=False):
    """FLOPs of attention over (batch, heads, seq, D) q and k: every pair (what torch's fused
    kernels compute under a mask: a padded batch's), or with is_causal those on or below the
    diagonal (the blocks above it are skipped); 2.5x the forward's for the backward."""
    b, h, sq, d = q.shape
    sk = k.shape[-2]
    pairs = sum(min(sk, sk - sq + i + 1) for i in range(sq)) if causal else sq * sk
    fwd = 4 * b * h * pairs * d
    return fwd * 5 // 2 if backward else fwd


def _aten_flops(func, args, kwargs, out):
    name = func.overloadpacket.__name__
    if name.startswith("_scaled_dot_product") and "attention" in name:
        if name.endswith("_backward"):
            return _sdpa_flops(args[1], args[2], True)
        return _sdpa_flops(args[0], args[1], False)
    formula = flop_registry.get(func.overloadpacket)
    if formula is None and name.endswith("_"):  # addmm_ (the LM loss's d_weight) counts as addmm
        formula = flop_registry.get(getattr(torch.ops.aten, name[:-1], None))
    return formula(*args, **(kwargs or {}), out_val=out) if formula is not None else 0


def _written(func, args, kwargs):
    """The arguments a mutating op writes, in its schema's order (empty for a functional op)."""
    out = []
    for i, a in enumerate(func._schema.arguments):
        if a.alias_info is not None and a.alias_info.is_write:
            out.append(kwargs[a.name] if a.name in kwargs else args[i] if i < len(args) else None)
    return out


def _skippable(args, kwargs):
    return any(t.is_floating_point() and t.numel() >= _SKIP_ELEMENTS for t in _tensors((args, kwargs)))


class _SdpaKernel(torch.autograd.Function):
    """torch's scaled_dot_product_attention as one fused kernel forward and one backward (what
    a GPU runs: flash, memory-efficient or cuDNN attention), recorded, nothing computed."""

    @staticmethod
    def forward(ctx, ledger, q, k, v, mask, causal, dropout_p):
        ctx.ledger, ctx.mask, ctx.causal = ledger, mask, causal
        # (batch, heads, seq, D): its probabilities, each drawn for once a pass with dropout
        pairs = q.shape[0] * q.shape[1] * q.shape[2] * k.shape[2] // (2 if causal else 1)
        ctx.draws = -(-pairs // FLASH_PER_DRAW) if dropout_p else 0
        ctx.save_for_backward(q, k, v)
        o = q.new_empty(q.shape[:-1] + v.shape[-1:])
        extra = [] if mask is None else [mask]
        ledger.add("sdpa attention", _sdpa_flops(q, k, False, causal), _nbytes([q, k, v, o] + extra),
                   ctx.draws)
        return o

    @staticmethod
    def backward(ctx, do):
        q, k, v = ctx.saved_tensors
        grads = [torch.empty_like(t) for t in (q, k, v)]
        extra = [] if ctx.mask is None else [ctx.mask]
        ctx.ledger.add("sdpa attention backward", _sdpa_flops(q, k, True, ctx.causal),
                       _nbytes([q, k, v, do, do] + grads + extra), ctx.draws)  # do twice: dO and O
        return None, *grads, None, None, None


class _AsGpuAten(TorchFunctionMode):
    """What aten runs differently on a GPU, for the ops the models use: dropout as one
    native_dropout kernel (the CPU decomposes it into bernoulli_, div_ and mul), and
    scaled_dot_product_attention as one fused kernel (the CPU's math path materializes the
    scores when dropout is on)."""

    def __init__(self, ledger):
        super().__init__()
        self.ledger = ledger

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.nn.functional.dropout:
            x, p = args[0], kwargs.get("p", args[1] if len(args) > 1 else 0.5)
            training = kwargs.get("training", args[2] if len(args) > 2 else True)
            if training and p > 0 and not kwargs.get("inplace", False):
                return torch.native_dropout(x, p, True)[0]
        if func is torch.nn.functional.scaled_dot_product_attention:
            q, k, v = args[:3]
            mask = kwargs.get("attn_mask", args[3] if len(args) > 3 else None)
            causal = kwargs.get("is_causal", args[5] if len(args) > 5 else False)
            dropout_p = kwargs.get("dropout_p", args[4] if len(args) > 4 else 0.0)
            return _SdpaKernel.apply(self.ledger, q, k, v, mask, bool(causal), dropout_p)
        return func(*args, **kwargs)


class _Recorder(TorchDispatchMode):
    """Records each launching aten op; leaves the large floating-point ones uncomputed."""

    def __init__(self, ledger):
        super().__init__()
        self.ledger = ledger

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if name in _NO_LAUNCH:
            return func(*args, **kwargs)
        out = self._shape_only(func, args, kwargs) if _skippable(args, kwargs) else None
        if out is None:
            out = func(*args, **kwargs)
        draws = -(-args[0].numel() // TORCH_DROPOUT_PER_DRAW) if name == "native_dropout" else 0
        self.ledger.add(name, _aten_flops(func, args, kwargs, out),
                        _nbytes(_tensors((args, kwargs)) + _tensors(out)), draws)
        return out

    @staticmethod
    def _shape_only(func, args, kwargs):
        """The op's outputs with the right shapes and nothing computed, or None where its meta
        kernel cannot say (then the op runs)."""
        written = _written(func, args, kwargs)
        if written:  # in place or out=: the written tensors are the outputs
            if len(func._schema.returns) == len(written) and all(
                    isinstance(w, torch.Tensor) for w in written):
                return written[0] if len(written) == 1 else tuple(written)
            return None
        meta = lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t
        try:
            out = func(*tree_map(meta, args), **tree_map(meta, kwargs))
        except Exception:  # no meta kernel, or a data-dependent shape: compute it
            return None
        device = _tensors((args, kwargs))[0].device
        return tree_map(lambda m: torch.empty_strided(m.shape, m.stride(), dtype=m.dtype, device=device)
                        if isinstance(m, torch.Tensor) else m, out)


# ---- fusedlm's Triton launches: what each computes --------------------------------------------

def _pairs(q, k, kw):
    """(query, key) pairs a fusedlm attention launch computes, over heads: per sequence, every
    pair (causal: those on or below the diagonal), padding keys left out (the kernels stop at
    the last attended key block)."""
    causal = kw.get("causal", False)
    if kw.get("cu_q") is not None:
        lq = (kw["cu_q"][1:] - kw["cu_q"][:-1]).tolist()
        lk = (kw["cu_k"][1:] - kw["cu_k"][:-1]).tolist()
        heads = q.shape[1]
    else:
        b, sq, heads = q.shape[0], q.shape[1], q.shape[2]
        lq = [sq] * b
        mask = kw.get("key_mask")
        lk = (mask != 0).sum(1).tolist() if mask is not None else [k.shape[1]] * b
    total = 0
    for a, c in zip(lq, lk):
        total += sum(min(c, c - a + i + 1) for i in range(a)) if causal else a * c
    return total * heads


def _draws(elements, dropout_p):
    """Philox draws of a dropout mask over `elements` (none without dropout)."""
    return -(-elements // ELEMENTS_PER_DRAW) if dropout_p else 0


def _attention_fwd(q, k, v, o, lse, **kw):
    pairs = _pairs(q, k, kw)
    return 4 * q.shape[-1] * pairs, _nbytes([q, k, v, o, lse]), _draws(pairs, kw.get("dropout_p"))


def _attention_bwd(q, k, v, o, do, lse, delta, dq, dk, dv, **kw):
    # The dK/dV kernel runs S, dP, dV and dK; the dQ kernel S, dP and dQ again (7 products),
    # unless dQ is accumulated by the dK/dV kernel (5). Each reads its fixed tiles once and
    # streams the others: Q, dO, lse, delta and K, V twice in all.
    # Both kernels redraw the mask: dQ's (queries x keys) a draw per four keys, dK/dV's (keys x
    # queries) a draw per probability (kernels/attention._keep); atomic dQ, dK/dV's alone.
    products = 5 if kw.get("atomic_dq") else 7
    pairs = _pairs(q, k, kw)
    dkdv_draws = pairs if kw.get("dropout_p") else 0
    return (2 * products * q.shape[-1] * pairs,
            2 * _nbytes([q, k, v, do, lse, delta]) + _nbytes([dq, dk, dv]),
            dkdv_draws + (0 if kw.get("atomic_dq") else _draws(pairs, kw.get("dropout_p"))))


def _ce_rows(logits, labels, loss, lse, hit, **kw):
    # Two passes over each row (statistics, then the gradient written in place).
    passes = 3 if kw.get("compute_grad") else 1
    return 0, passes * _nbytes([logits]) + _nbytes([labels, loss, lse, hit])


def _mlp_activation_backward(pre, da, a, dpre, part, db, activation, up=None, dup=None,
                             part_up=None, db_up=None):
    # Reads pre and dA (and up, gated); writes A again (W2's gradient reads it), dpre over dA
    # (and dup); the partial column sums (the biases' gradients) are a few rows.
    read = [t for t in (pre, da, up) if t is not None]
    written = [t for t in (a, dpre, dup) if t is not None]
    small = [t for t in (part, db, part_up, db_up) if t is not None]
    return 0, _nbytes(read) + _nbytes(written) + _nbytes(small)


def _all_tensors(*args, **kw):
    return 0, _nbytes(_tensors((args, kw)))


def _norm_fwd(x, residual, weight, bias, y, z, mean, rstd, eps, is_rms, dropout_p=0.0, seed=0):
    return (0, _nbytes([t for t in (x, residual, weight, bias, y, z, mean, rstd) if t is not None]),
            _draws(x.numel(), dropout_p))


def _norm_bwd(dy, z, weight, mean, rstd, dz_extra, dz, dw_part, db_part, dw, db, is_rms, dx=None,
              dropout_p=0.0, seed=0):
    tensors = (dy, z, weight, mean, rstd, dz_extra, dz, dw_part, db_part, dw, db, dx)
    return 0, _nbytes([t for t in tensors if t is not None]), _draws(dy.numel(), dropout_p)


_LAUNCH_COSTS = {
    ("attention", "forward"): _attention_fwd,
    ("attention", "backward"): _attention_bwd,
    ("lm_loss", "ce_rows"): _ce_rows,
    ("mlp", "activation_backward"): _mlp_activation_backward,
    ("layer_norm", "forward"): _norm_fwd,
    ("layer_norm", "backward"): _norm_bwd,
    # The rest (the dropout mask for tests, ...): each tensor read or written once.
}


@contextlib.contextmanager
def _as_on_a_gpu(ledger):
    """fusedlm as a GPU runs it: Triton for every op (launches recorded, not run), and the LM
    loss's GEMM alignment."""
    import importlib
    from fusedlm.ops import _triton, dispatch
    loss_mod = importlib.import_module("fusedlm.ops.lm_loss")  # the module, not the function
    saved = _triton.run, dispatch.select, loss_mod._gemm_align

    def launch(name, launcher, *args, **kwargs):
        ledger.add(f"triton {name}.{launcher}",
                   *_LAUNCH_COSTS.get((name, launcher), _all_tensors)(*args, **kwargs))

    def select(op_name, case, backend=None):
        return "triton"
    _triton.run, dispatch.select = launch, select
    loss_mod._gemm_align = lambda device: loss_mod.GEMM_ALIGN
    try:
        yield
    finally:
        _triton.run, dispatch.select, loss_mod._gemm_align = saved


# ---- the step ---------------------------------------------------------------------------------

def _models(case):
    """name -> (model, layout) for the eager implementations `fusedlm bench model` times."""
    import fusedlm
    family, batch, seq, overrides = CASES[case]
    hf, ours, config = _hf_models(family, overrides)
    out = {"hf eager (sdpa)": (hf, "padded")}
    patched = copy.deepcopy(hf)  # its own config too: patching sets the attention there
    fusedlm.patch(patched)
    out["hf patched by fusedlm"] = (patched, "padded")
    if ours is not None:
        out["fusedlm model"] = (ours, "padded")
        out["fusedlm model, packed"] = (ours, "packed")
    return {k: (m.to(torch.bfloat16).train(), layout) for k, (m, layout) in out.items()}, config


def step_ledger(model, kw):
    """The kernels of one training step of `model` on the batch `kw`, and the bytes the forward
    keeps for the backward (`saved_bytes`: every storage autograd saved, the parameters' not
    counted): the activation memory, most of a training step's peak beside the weights."""
    ledger = Ledger()
    model.zero_grad(set_to_none=True)
    with _as_on_a_gpu(ledger), _AsGpuAten(ledger), _Recorder(ledger):
        with SavedBytes(model.parameters()) as saved:
            loss = model(**kw).loss
        loss.backward()
    ledger.saved_bytes = saved.bytes
    return ledger


def run(cases=("bert-base", "gpt2-small"), paddings=(0.0, 0.5), tflops=H200["tflops"],
        tbps=H200["tbps"], log=print):
    results = []
    for case in cases:
        family, batch, seq, _ = CASES[case]
        models, config = _models(case)
        for padding in paddings:
            kw, tokens = _batch(family, batch, seq, config.vocab_size, padding, "cpu")
            batches = {"padded": kw}
            if any(layout == "packed" for _, layout in models.values()):
                batches["packed"] = _packed(kw, seq)
            log(f"\n{case}: batch {batch} x seq {seq}, {1 - tokens / (batch * seq):.0%} padding; "
                f"bound at {tflops:g} TFLOP/s, {tbps:g} TB/s and {DRAW_RATE / 1e9:.0f}G dropout draws/s "
                f"({ELEMENTS_PER_DRAW} elements a draw)")
            log(f"  {'implementation':<26} {'kernels':>7} {'TFLOP':>7} {'GB':>7} {'bound ms':>9}"
                f"  {'gemm':>6} {'attn':>6} {'norm':>6} {'loss':>6} {'other':>6}  x HF"
                f"  {'saved GB':>8}")
            base = None
            for name, (model, layout) in models.items():
                ledger = step_ledger(model, batches[layout])
                cats = ledger.by_category(tflops, tbps)
                n, flops, nbytes, ms = (sum(c[i] for c in cats.values()) for i in range(4))
                base = base or ms
                split = "".join(f" {cats.get(c, [0, 0, 0, 0.0])[3]:6.2f}"
                                for c in ("gemm", "attention", "norm", "loss", "other"))
                log(f"  {name:<26} {n:7d} {flops / 1e12:7.2f} {nbytes / 1e9:7.2f} {ms:9.2f} "
                    f"{split}  x{base / ms:.2f}  {ledger.saved_bytes / 1e9:8.2f}")
                results.append(dict(case=case, padding=padding, impl=name, kernels=n,
                                    tflop=round(flops / 1e12, 3), gb=round(nbytes / 1e9, 3),
                                    bound_ms=round(ms, 3), speedup_vs_hf_eager=round(base / ms, 3),
                                    saved_gb=round(ledger.saved_bytes / 1e9, 3),
                                    by_category={c: dict(kernels=v[0], tflop=round(v[1] / 1e12, 3),
                                                         gb=round(v[2] / 1e9, 3), ms=round(v[3], 3))
                                                 for c, v in cats.items()}))
    return results


def main(argv=None):
    global ELEMENTS_PER_DRAW
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--case", nargs="+", default=["bert-base", "gpt2-small"], choices=sorted(CASES))
    p.add_argument("--padding", nargs="+", type=float, default=[0.0, 0.5])
    p.add_argument("--tflops", type=float, default=H200["tflops"], help="matmul rate, TFLOP/s")
    p.add_argument("--tbps", type=float, default=H200["tbps"], help="copy rate, TB/s")
    p.add_argument("--elements-per-draw", type=int, default=ELEMENTS_PER_DRAW,
                   help="elements of a fusedlm dropout mask a Philox draw serves (1: the kernels "
                        "before four did)")
    p.add_argument("--json", help="write the results here")
    a = p.parse_args(argv)
    ELEMENTS_PER_DRAW = a.elements_per_draw
    torch.manual_seed(0)
    results = run(a.case, a.padding, a.tflops, a.tbps)
    if a.json:
        import json
        with open(a.json, "w") as f:
            json.dump(dict(tflops=a.tflops, tbps=a.tbps, draw_rate=DRAW_RATE,
                           elements_per_draw=a.elements_per_draw, command=" ".join(sys.argv),
                           results=results),
                      f, indent=1)


if __name__ == "__main__":
    main()
