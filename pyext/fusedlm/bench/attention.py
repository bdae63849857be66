"""Attention benchmark: fusedlm against every SDPA backend, flex_attention and flash-attn.

TFLOP/s as DESIGN.md defines it: forward 4 * B * H * Sq * Sk * D / t (halved for causal),
forward + backward 3.5x that work (forward 1 + backward 2.5). Cases: about 16k tokens a batch
at each sequence length (B = 16384 / S), bf16, head dim 64 and 128, causal and not. The BERT
case is a padded batch (32 x 512, a random half of each sequence's tail is padding):
fusedlm's packed path against padded SDPA with the mask, TFLOP/s counted on the real tokens.

With `dropout_p` (`--dropout`), every implementation that has dropout runs with it (training's
attention: BERT's and GPT-2's 0.1); flex_attention has none and is left out. A dropout kernel
draws a Philox word per probability (fusedlm: four from a draw; FlashAttention-2: sixteen
8-bit ones): the case that shows what the draws cost.

`fusedlm[cuda-wgmma]` (the CUDA C++ kernels' Hopper path, on an sm_90 GPU),
`fusedlm[triton-tma]` (the Triton kernels' opt-in Hopper path: TMA copies in the forward and dQ,
the forward's key loop warp-specialized; FUSEDLM_TRITON_TMA) and `fusedlm[triton-atomic-dq]`
(the Triton backward with dQ added by atomics from the dK/dV kernel, FlashAttention-2's;
FUSEDLM_TRITON_ATOMIC_DQ) are timed only when named in `peers` (`--impl`): none has run on a GPU
yet, and a default run must not stake its time on them.
"""
import contextlib

import torch
import torch.nn.functional as F

from ..ops import attention, attention_varlen, dispatch, unpad
from ..ops import attention_kernels
from . import tune
from .harness import chosen, collect, time_ms
from .tune import fusedlm_backend

WGMMA = "fusedlm[cuda-wgmma]"
TRITON_TMA = "fusedlm[triton-tma]"
TRITON_ATOMIC_DQ = "fusedlm[triton-atomic-dq]"
OPT_IN = {WGMMA, TRITON_TMA, TRITON_ATOMIC_DQ}  # timed only when asked for by name


def _on_switch(fn, switch):
    """fn, timed with the Triton attention kernels' opt-in `switch` ("TMA", "ATOMIC_DQ") on:
    `_time` runs the whole step, backward included, under its `context`."""
    from ..ops import _triton
    kern = _triton.kernels("attention")

    @contextlib.contextmanager
    def switched():
        before = getattr(kern, switch)
        setattr(kern, switch, True)
        try:
            yield
        finally:
            setattr(kern, switch, before)

    def wrapped(*args, **kwargs):
        return fn(*args, **kwargs)
    wrapped.context = switched
    return wrapped


def _on_wgmma(fn):
    """fn, with backend="cuda" attention on the Hopper (wgmma) kernels (the forward's choice
    holds for its backward). Raises where they declined the call, so that the mma.sync kernels,
    which then serve it, are never timed under this name."""
    def wrapped(*args, **kwargs):
        with attention_kernels.using_cuda_kernels("wgmma"):
            out = fn(*args, **kwargs)
        if attention_kernels.last_cuda_forward_kernel != "wgmma":
            raise RuntimeError(f"ran {attention_kernels.last_cuda_forward_kernel}")
        return out
    return wrapped


def _sdpa_backends():
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:
        return {}
    return {name: (sdpa_kernel, getattr(SDPBackend, attr))
            for name, attr in (("sdpa[flash]", "FLASH_ATTENTION"),
                               ("sdpa[efficient]", "EFFICIENT_ATTENTION"),
                               ("sdpa[cudnn]", "CUDNN_ATTENTION")) if hasattr(SDPBackend, attr)}


def _peers(device_type):
    """name -> fn(q, k, v, causal, dropout_p=0.0) on (B, S, H, D) tensors."""
    peers = {}
    for name, (ctx, backend) in _sdpa_backends().items():
        def sdpa(q, k, v, causal, dropout_p=0.0, ctx=ctx, backend=backend):
            with ctx(backend):
                return F.scaled_dot_product_attention(
                    q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=causal,
                    dropout_p=dropout_p).transpose(1, 2)
        peers[name] = sdpa
    if device_type == "cuda":
        try:
            import torch._dynamo
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
            # One compiled kernel per shape: past dynamo's recompile limit (8 by default) flex
            # falls back to its unfused eager path, which would be timed in its place.
            for name in ("recompile_limit", "cache_size_limit"):
                if hasattr(torch._dynamo.config, name):
                    setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 64))
            flex = torch.compile(flex_attention, dynamic=False)
            masks = {}  # (Sq, Sk) -> causal block mask, built once (outside the timed calls)

            def flex_fn(q, k, v, causal, dropout_p=0.0):
                if dropout_p:
                    raise NotImplementedError("flex_attention has no dropout")
                mask = None
                if causal:
                    shape = (q.shape[1], k.shape[1])
                    if shape not in masks:
                        masks[shape] = create_block_mask(lambda b, h, i, j: i >= j, None, None, *shape,
                                                         device=q.device)
                    mask = masks[shape]
                return flex(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                            block_mask=mask).transpose(1, 2)
            peers["flex_attention"] = flex_fn
        except ImportError:
            pass
        try:
            from flash_attn import flash_attn_func
            peers["flash-attn"] = lambda q, k, v, causal, dropout_p=0.0: flash_attn_func(
                q, k, v, dropout_p=dropout_p, causal=causal)
        except ImportError:
            pass
        for be in ("triton", "cuda"):
            if dispatch.why_not("attention", be, ("cuda", torch.bfloat16, 64)) is None:
                peers[f"fusedlm[{be}]"] = lambda q, k, v, causal, dropout_p=0.0, be=be: attention(
                    q, k, v, causal=causal, dropout_p=dropout_p, backend=be)
        if "fusedlm[cuda]" in peers and torch.cuda.get_device_capability() == (9, 0):
            peers[WGMMA] = _on_wgmma(peers["fusedlm[cuda]"])
        if "fusedlm[triton]" in peers:
            peers[TRITON_ATOMIC_DQ] = _on_switch(peers["fusedlm[triton]"], "ATOMIC_DQ")
            if torch.cuda.get_device_capability()[0] >= 9:
                peers[TRITON_TMA] = _on_switch(peers["fusedlm[triton]"], "TMA")
    else:
        peers["fusedlm[torch]"] = lambda q, k, v, causal, dropout_p=0.0: attention(
            q, k, v, causal=causal, dropout_p=dropout_p, backend="torch")
    return peers


def _time(fn, args, direction, device, dropout_p=0.0):
    kw = dict(dropout_p=dropout_p) if dropout_p else {}  # (extra implementations may lack it)
    with getattr(fn, "context", contextlib.nullcontext)():  # e.g. _on_switch's
        if direction == "fwd":
            return time_ms(lambda: fn(*args, **kw), device)
        leaves = [t.detach().requires_grad_() for t in args[:3]]
        do = torch.randn_like(args[0])

        def step():
            out = fn(*leaves, *args[3:], **kw)
            torch.autograd.grad(out, leaves, do)
        return time_ms(step, device)


def run(seqlens=(512, 1024, 2048, 4096, 8192), head_dims=(64, 128), tokens=16384,
        dtype=torch.bfloat16, causal=(False, True), directions=("fwd", "fwd+bwd"), device=None,
        peers=None, extra=None, dropout_p=0.0, log=print, on_result=None):
    """extra: more implementations, name -> fn(q, k, v, causal) on (batch, seq, heads, D)
    tensors (and dropout_p=, when dropout_p > 0), timed beside the peers."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    impls = _peers(device)
    if peers is not None:
        impls = chosen(impls, peers)
    else:
        impls = {k: v for k, v in impls.items() if k not in OPT_IN}
    peers = {**impls, **(extra or {})}
    results = []
    for d in head_dims:
        heads = 2048 // d  # hidden 2048
        for s in seqlens:
            b = max(tokens // s, 1)
            q, k, v = (torch.randn(b, s, heads, d, device=device, dtype=dtype) for _ in range(3))
            for c in causal:
                flops = 4 * b * heads * s * s * d / (2 if c else 1)
                for direction in directions:
                    work = flops * (1 if direction == "fwd" else 3.5)
                    rows = []
                    for name, fn in peers.items():
                        try:
                            ms = _time(fn, (q, k, v, c), direction, device, dropout_p)
                        except Exception as e:  # a backend that cannot run this case
                            first = str(e).splitlines()[0][:100] if str(e) else ""
                            log(f"    {name:<18} d={d} s={s} causal={c} {direction}: n/a "
                                f"({type(e).__name__}: {first})")
                            continue
                        rows.append(dict(op="attention", direction=direction,
                                         dtype=str(dtype).split(".")[-1], batch=b, seq=s,
                                         heads=heads, head_dim=d, causal=c, impl=name,
                                         ms=round(ms, 4), tflops=round(work / ms / 1e9, 2),
                                         **({"dropout_p": dropout_p} if dropout_p else {})))
                    sdpa = [r["ms"] for r in rows if r["impl"].startswith("sdpa")]
                    for r in rows:
                        r["speedup_vs_best_sdpa"] = round(min(sdpa) / r["ms"], 3) if sdpa else None
                        log(f"  {direction:<8} d={d:<4} s={s:<5} causal={c!s:<5} "
                            f"{'dropout ' + str(dropout_p) + ' ' if dropout_p else ''}{r['impl']:<18} "
                            f"{r['ms']:9.3f} ms {r['tflops']:8.2f} TFLOP/s  "
                            f"x{r['speedup_vs_best_sdpa']} vs best SDPA")
                    collect(results, rows, on_result)
            del q, k, v
    return results


def run_padded_bert(batch=32, seq=512, heads=12, head_dim=64, padding=0.5, dtype=torch.bfloat16,
                    device=None, peers=None, log=print, on_result=None):
    """BERT-shaped padded batch: fusedlm's packed path vs SDPA on the padded batch + mask.
    peers: time only these implementations (names as in `run`, e.g. 'sdpa[cudnn]')."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    g = torch.Generator().manual_seed(0)
    # Lengths uniform in [seq * (1 - 2 * padding), seq]: on average `padding` of the batch is pad.
    lo = int(seq * (1 - 2 * padding)) + 1
    lens = torch.randint(lo, seq + 1, (batch,), generator=g).to(device)
    mask = torch.arange(seq, device=device)[None, :] < lens[:, None]
    q, k, v = (torch.randn(batch, seq, heads, head_dim, device=device, dtype=dtype) for _ in range(3))
    (qp, idx, cu, max_len), kp, vp = unpad(q, mask), unpad(k, mask)[0], unpad(v, mask)[0]
    real = float((lens.double() ** 2).sum()) * 4 * heads * head_dim  # flops on real tokens
    bool_mask = mask[:, None, None, :]
    impls = {}
    for name, (ctx, backend) in _sdpa_backends().items():
        def padded(q, k, v, ctx=ctx, backend=backend):
            with ctx(backend):
                return F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2),
                                                      v.transpose(1, 2), attn_mask=bool_mask).transpose(1, 2)
        impls[name + " padded"] = (padded, (q, k, v))
    ours = [be for be in ("triton", "cuda") if device == "cuda" and
            dispatch.why_not("attention", be, (device, dtype, head_dim)) is None] or ["torch"]
    for be in ours:
        impls[f"fusedlm[{be}] packed"] = (
            lambda q, k, v, be=be: attention_varlen(q, k, v, cu, cu, max_len, max_len, backend=be), (qp, kp, vp))
        impls[f"fusedlm[{be}] padded+mask"] = (
            lambda q, k, v, be=be: attention(q, k, v, attention_mask=mask, backend=be), (q, k, v))
    if "cuda" in ours and torch.cuda.get_device_capability() == (9, 0):
        for name in ("packed", "padded+mask"):
            fn, args = impls[f"fusedlm[cuda] {name}"]
            impls[f"{WGMMA} {name}"] = (_on_wgmma(fn), args)
    if peers is not None:
        impls = {name: impl for name, impl in impls.items() if name.split(" ")[0] in peers}
    else:
        impls = {name: impl for name, impl in impls.items() if name.split(" ")[0] not in OPT_IN}
    results = []
    for direction in ("fwd", "fwd+bwd"):
        rows = []
        for name, (fn, args) in impls.items():
            try:
                ms = _time(fn, args, direction, device)
            except Exception as e:
                log(f"    {name:<30} {direction}: n/a ({type(e).__name__})")
                continue
            rows.append(dict(op="attention", case="bert-padded", direction=direction, batch=batch,
                             seq=seq, padding=round(1 - float(lens.sum()) / (batch * seq), 3),
                             heads=heads, head_dim=head_dim, impl=name, ms=round(ms, 4),
                             tflops_real=round(real * (1 if direction == "fwd" else 3.5) / ms / 1e9, 2)))
        sdpa = [r["ms"] for r in rows if r["impl"].startswith("sdpa")]
        best = min(sdpa) if sdpa else None
        for r in rows:
            r["speedup_vs_best_sdpa"] = round(best / r["ms"], 3) if best else None
            log(f"  bert-padded {direction:<8} {r['impl']:<30} {r['ms']:9.3f} ms "
                f"{r['tflops_real']:8.2f} TFLOP/s (real tokens)  x{r['speedup_vs_best_sdpa']}")
        collect(results, rows, on_result)
    return results


def tune_entries(results, arch, source):
    """Measured-dispatch entries (see `tune`) from this benchmark's results: per dtype, head dim
    and causal, and per measured sequence length (the case's keys, `seq_k`), fusedlm's backends
    in order of their forward + backward time (forward-only runs make none). The CUDA C++
    backend stands for the faster of its two kernel families, fusedlm[cuda] (mma.sync) and
    fusedlm[cuda-wgmma] (Hopper), and the entry names that family (`cuda_kernels`); the Triton
    backend, where fusedlm[triton-atomic-dq] was timed too, for the faster of it and
    fusedlm[triton], named likewise (`triton_kernels`: "atomic-dq" or "dq"). The padded BERT
    case, dropout runs (their draws cost what a case without dropout does not) and the other
    variants (fusedlm[triton-tma]) are left out."""
    # implementation -> (backend, kernels field, family)
    families = {"cuda": ("cuda", "cuda_kernels", "mma"),
                "cuda-wgmma": ("cuda", "cuda_kernels", "wgmma"),
                "triton": ("triton", "triton_kernels", "dq"),
                "triton-atomic-dq": ("triton", "triton_kernels", "atomic-dq")}
    per = {}  # (group, seq) -> implementation -> ms
    for r in results:
        impl = fusedlm_backend(r.get("impl", ""))
        if (r.get("op") != "attention" or "case" in r or r.get("direction") != "fwd+bwd"
                or r.get("dropout_p")
                or "ms" not in r or impl not in set(dispatch.BACKENDS) | set(families)):
            continue
        group = (("dtype", r["dtype"]), ("head_dim", r["head_dim"]), ("causal", r["causal"]))
        per.setdefault((group, r["seq"]), {})[impl] = r["ms"]
    timings, kernels = {}, {}
    for key, times in per.items():
        timings[key] = {b: ms for b, ms in times.items() if b not in families}
        for backend in ("cuda", "triton"):
            field = next(f for b, f, _ in families.values() if b == backend)
            timed = {fam: times[impl] for impl, (b, _, fam) in families.items()
                     if b == backend and impl in times}
            if not timed:
                continue
            best = min(timed, key=timed.get)
            timings[key][backend] = timed[best]
            # The Triton backward's choice is named only where both were timed.
            if backend == "cuda" or len(timed) > 1:
                kernels.setdefault(key, {})[field] = best
    return tune.entries("attention", "seq_k", timings, arch, source, kernels)
