"""Host cost per call: what Python spends around each fused op, with its kernel launches
stubbed out, beside the torch op it replaces (whose time on the small inputs used is mostly its
own dispatch). A step is host-bound when these, summed over the step's calls, reach the GPU's
time for it; the graph-step issue's target is a few microseconds of the torch op per call.

`fusedlm bench host` prints the table; with launches stubbed it runs the same on a CPU as on a
GPU machine (the outputs are left unwritten: the numbers are of time, not of values). Beside
the time, counts that do not depend on the machine, for one call (backward included): `launches`,
the aten ops that would launch a kernel on a GPU (not allocations or views; counted below
autograd, as this device decomposes them), `triton_calls`, fusedlm's Triton launcher calls (each
one kernel or more: attention's backward launches two), and `syncs`, the values read back to the
host (`item`, `tolist`, `nonzero`, a tensor's truth or number value), each of which makes the
host wait for the GPU. On a GPU a launch costs the host a few microseconds. Beside the ops, a
whole BERT pretraining step (`bert_step`: the demo's model, every op on the backend named)
against Hugging Face's, whose small GPU steps are bound by exactly these costs.
"""
import contextlib

import torch
import torch.nn.functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from .harness import collect, time_ms


class _Counter:
    triton = 0


@contextlib.contextmanager
def launches_stubbed():
    """Within the block, the Triton launchers do nothing (each call counted)."""
    from ..ops import _triton
    saved = _triton.run

    def stub(name, launcher, *args, **kwargs):
        _Counter.triton += 1
    _triton.run = stub
    try:
        yield
    finally:
        _triton.run = saved


# aten ops that launch no kernel on a GPU: allocations, views and metadata.
_NO_LAUNCH = {
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "as_strided",
    "view", "_unsafe_view", "reshape", "_reshape_alias", "alias", "t", "transpose", "permute",
    "slice", "select", "unsqueeze", "squeeze", "expand", "detach", "unbind", "split",
    "split_with_sizes", "chunk", "narrow", "unflatten", "flatten", "view_as", "lift_fresh",
    "resolve_conj", "resolve_neg", "is_nonzero", "sym_size", "sym_stride",
    "_local_scalar_dense",  # a read back to the host: counted as a sync
}
# Tensor methods that read a value back to the host (and so wait for the GPU).
_SYNCS = ("item", "tolist", "nonzero", "__bool__", "__int__", "__float__")


class _Launches(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.launches = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func.overloadpacket.__name__ not in _NO_LAUNCH:
            self.launches += 1
        return func(*args, **(kwargs or {}))


@contextlib.contextmanager
def _syncs_counted(counter):
    saved = {name: getattr(torch.Tensor, name) for name in _SYNCS}

    def counting(method):
        def wrapper(*args, **kwargs):
            counter[0] += 1
            return method(*args, **kwargs)
        return wrapper
    for name, method in saved.items():
        setattr(torch.Tensor, name, counting(method))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def count_launches(fn):
    """(aten kernel launches, Triton launcher calls, host reads) of one call of fn; Triton
    launcher calls are counted while stubbed (launches_stubbed)."""
    before, syncs = _Counter.triton, [0]
    with _syncs_counted(syncs), _Launches() as mode:
        fn()
    return mode.launches, _Counter.triton - before, syncs[0]


def _bert_step(device):
    """(inputs maker, fusedlm step, Hugging Face step or None without transformers): BERT
    pretraining (MLM + NSP) on a padded 32 x 64 batch (4 x 64 on a CPU, whose fp16 matmuls are
    slow: the counts do not depend on the batch), fp16 (the kernels' path on a GPU and in the
    interpreter), both models with the same weights; a step returns its loss."""
    from .. import models as fm
    from ..demo.train import Settings, model_config
    try:
        import transformers
    except ImportError:
        transformers = None
    # The demo's pretraining model at its default settings: small enough that a GPU step is
    # host-bound.
    settings = Settings()
    config = model_config(settings, settings.vocab)
    g = torch.Generator().manual_seed(0)
    batch, seq, vocab = settings.batch if device == "cuda" else 4, settings.max_len, settings.vocab
    ids = torch.randint(5, vocab, (batch, seq), generator=g)
    lens = torch.randint(seq // 3, seq + 1, (batch,), generator=g)
    mask = (torch.arange(seq)[None] < lens[:, None]).long()
    labels = torch.full((batch, seq), -100)
    pick = (torch.rand(batch, seq, generator=g) < 0.15) & (mask > 0)
    labels[pick] = ids[pick]
    nsp = torch.randint(0, 2, (batch,), generator=g)
    ids, mask, labels, nsp = (t.to(device) for t in (ids, mask, labels, nsp))
    types = torch.zeros_like(ids)
    models = {}

    def inputs():
        if not models:
            torch.manual_seed(0)
            models["ours"] = fm.BertForPreTraining(fm.BertConfig(**config)).to(device, torch.float16)
            if transformers is not None:
                hf = transformers.BertForPreTraining(transformers.BertConfig(
                    **config, attn_implementation="sdpa")).to(device, torch.float16)
                hf.load_state_dict(models["ours"].state_dict())
                models["theirs"] = hf
        return ()

    # Gradients set to None before each step, as a training loop's zero_grad does: every step
    # then launches alike (accumulating into existing gradients would add launches).
    def ours(be):
        models["ours"].zero_grad(set_to_none=True)
        with _backend(be):
            return models["ours"](input_ids=ids, attention_mask=mask, token_type_ids=types,
                                  labels=labels, next_sentence_label=nsp).loss

    def theirs():
        models["theirs"].zero_grad(set_to_none=True)
        out = models["theirs"](input_ids=ids, attention_mask=mask, token_type_ids=types)
        logits = out.prediction_logits
        return (F.cross_entropy(logits.reshape(-1, vocab).float(), labels.reshape(-1))
                + F.cross_entropy(out.seq_relationship_logits.float(), nsp))
    return inputs, ours, (theirs if transformers is not None else None)


@contextlib.contextmanager
def _backend(name):
    """Every op of the model on backend `name` (FUSEDLM_BACKEND), as a GPU would run it."""
    import os
    from ..ops import dispatch
    saved = os.environ.get(dispatch.ENV_VAR)
    os.environ[dispatch.ENV_VAR] = name
    try:
        yield
    finally:
        if saved is None:
            del os.environ[dispatch.ENV_VAR]
        else:
            os.environ[dispatch.ENV_VAR] = saved


def _cases(device):
    """op -> (inputs maker, fusedlm call, torch call, the torch call's label); each call does
    forward + backward when its inputs require grad."""
    import fusedlm
    half = torch.float16

    def ln_inputs():
        x = torch.randn(8, 768, device=device, dtype=half, requires_grad=True)
        return x, torch.ones(768, device=device, dtype=half, requires_grad=True), \
            torch.zeros(768, device=device, dtype=half, requires_grad=True)

    def attn_inputs():
        return [torch.randn(1, 16, 2, 64, device=device, dtype=half, requires_grad=True)
                for _ in range(3)]

    def loss_inputs():
        # Small enough that the (real) GEMMs around the stubbed row kernel cost little on a CPU.
        h = torch.randn(16, 32, device=device, dtype=half, requires_grad=True)
        w = torch.randn(64, 32, device=device, dtype=half, requires_grad=True)
        y = torch.randint(0, 64, (16,), device=device)
        return h, w, y

    def mlp_inputs():
        x = torch.randn(8, 64, device=device, dtype=half, requires_grad=True)
        return (x, *(torch.randn(*shape, device=device, dtype=half, requires_grad=True)
                     for shape in ((256, 64), (256,), (64, 256), (64,))))

    step_inputs, step_ours, step_theirs = _bert_step(device)
    return {
        "layer_norm": (ln_inputs,
                       lambda x, w, b, be: fusedlm.layer_norm(x, w, b, backend=be),
                       lambda x, w, b: F.layer_norm(x, (768,), w, b), "torch"),
        "attention": (attn_inputs,
                      lambda q, k, v, be: fusedlm.attention(q, k, v, causal=True, backend=be),
                      lambda q, k, v: F.scaled_dot_product_attention(
                          q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True),
                      "torch"),
        "lm_loss": (loss_inputs,
                    lambda h, w, y, be: fusedlm.lm_loss(h, w, y, backend=be),
                    lambda h, w, y: F.cross_entropy(h @ w.t(), y), "torch"),
        "mlp": (mlp_inputs,
                lambda x, w1, b1, w2, b2, be: fusedlm.ops.mlp(x, w1, b1, w2, b2, backend=be),
                lambda x, w1, b1, w2, b2: F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2), "torch"),
        # A whole training step, forward only or with its backward: what the demo runs.
        "bert_step": (step_inputs, lambda be: step_ours(be), step_theirs, "Hugging Face (sdpa)"),
    }


def _per_call(fn, backward, rep):
    """(host µs, (launches, Triton calls, syncs)) of one call: forward, and backward from a
    gradient of ones when asked (made outside the count)."""
    def call():
        out = fn()
        if backward:
            out.float().sum().backward()

    grad = torch.ones_like(fn()) if backward else None

    def counted():
        out = fn()
        if backward:
            out.backward(grad)
    counts = count_launches(counted)
    return time_ms(call, "cpu", rep=rep) * 1e3, counts


def run(backends=("triton",), device=None, rep=200, log=print, on_result=None):
    """Host µs per call, forward and forward + backward, for each op: fusedlm on `backends`
    (Triton's launches stubbed; on a GPU also real) and the torch op (run for real); with each,
    the kernel launches and host reads of one call (see the module docstring)."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    from ..ops import dispatch
    results = []
    for op, (inputs, ours, theirs, their_label) in _cases(device).items():
        args = inputs()
        dtype = args[0].dtype if args else torch.float16
        if op == "layer_norm":
            case = (device, dtype, 768, args[1].dtype)
        elif op == "mlp":
            case = (device, dtype)
        else:  # attention and bert_step: head dim 64; lm_loss: V 64
            case = (device, dtype, 64)
        rows = {}
        for backward in (False, True):
            direction = "fwd+bwd" if backward else "fwd"
            for be in backends:
                # A model step runs every op there; its attention (fp16, head dim 64) decides.
                why = dispatch.why_not("attention" if op == "bert_step" else op, be, case)
                if why is not None:
                    log(f"  {op} fusedlm[{be}]: not run ({why})")
                    continue
                # The Triton launchers are stubbed; the CUDA C++ ones are not (a pybind11 call
                # into the core: a few us, part of what that backend costs the host).
                label = "launches stubbed" if be == "triton" else "launches real"
                with launches_stubbed():
                    rows[(f"fusedlm[{be}], {label}", direction)] = _per_call(
                        lambda: ours(*args, be), backward, rep)
                if be == "triton" and device == "cuda":
                    # On a GPU also with Triton's own launcher (argument binding, its cache
                    # lookup, the launch): the host cost to set beside torch's, which launches
                    # for real too.
                    rows[(f"fusedlm[{be}], launches real", direction)] = _per_call(
                        lambda: ours(*args, be), backward, rep)
            if theirs is not None:
                rows[(their_label, direction)] = _per_call(lambda: theirs(*args), backward, rep)
        for (impl, direction), (us, (launches, triton_calls, syncs)) in rows.items():
            collect(results, [dict(op=op, direction=direction, impl=impl, host_us=round(us, 2),
                                   launches=launches, triton_calls=triton_calls, syncs=syncs)],
                    on_result)
            log(f"  {op:<10} {direction:<8} {impl:<34} {us:9.2f} us/call  {launches:3d} aten "
                f"launches  {triton_calls} Triton calls  {syncs} host reads")
    return results
