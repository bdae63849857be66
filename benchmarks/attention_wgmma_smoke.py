"""Triage for the Hopper CUDA C++ kernels (csrc/attention/attention_hopper.cu) on a GPU: which
kernels ran and how far each case's output and gradients are from the float64 reference, with
cases built to point at the part that is wrong when one is (the backward's products reuse the
forward's operand forms: a case wrong in both points at the shared part):

- first, the primitives alone (fusedlm.ops.attention_kernels.probe_wgmma, one 64-row tile at head
  dims 64 and 128, both dtypes): where TMA's 128-byte swizzle puts a tile in shared memory, Q K^T
  from K-major descriptors, P V from A fragments and an MN-major V, each against its own
  reference; the CPU emulator was written from the same documents as the kernels, so this is
  where a shared misreading shows;
- q = 0 makes every probability equal, so the output is the mean of V's rows: only the P V
  product (V's tensor map, the MN-major descriptor, P's register fragments) is tested;
- k = q with one-hot rows makes S diagonal-dominant: the Q K^T product and the softmax;
- one key block against several: the ring of stages and its barrier phases;
- head dims 64 and 128 (one 64-column slab or two), causal, a padding mask, packed sequences.

Each case runs in a worker process, forward then backward, with CUDA_LAUNCH_BLOCKING=1 so that
a kernel's fault is reported at its own launch ("wgmma attention dK/dV launch: ..."). A case
that faults (the kernels trap when a barrier has waited 10 s) or outlives --case-timeout is
reported with the stage it reached and its worker's last lines, and a fresh worker takes up the
next case: one broken case costs seconds, not the whole run.

Then, if every case passed, forward and forward+backward times (ms, and TFLOP/s counting
4 b h s^2 d forward flops, halved for causal, and 2.5x that for the backward) for the wgmma
kernels beside the mma.sync ones, the Triton kernels and cuDNN's SDPA, at a few BERT/GPT shapes.

    python benchmarks/attention_wgmma_smoke.py [--no-time] [--wrap "compute-sanitizer --tool memcheck"]
                                               [--match "d128 s512"]   # the cases named so

With --emulated, the same cases run the same kernels on the CPU emulator's compute capability
9.0 device (fusedlm._C built with FUSEDLM_CUDA=EMU; slow, and no timing): a rehearsal of the GPU
run that checks the kernels' logic and this script together.
"""
import argparse
import collections
import os
import select
import shlex
import subprocess
import sys
import time

MATCH = ""  # --match: the cases run are those whose name contains it
MARK = "@@ "  # worker -> supervisor protocol lines: "@@ case i", "@@ stage name", "@@ ok i", "@@ fail i"
# --cpu (a check of this script itself, for CI): the same cases and checks on the CPU through
# the torch backend, where no kernel's name is asked for. --emulated: on the CPU through the
# emulated CUDA kernels, which must be the wgmma ones as on the GPU.
DEVICE, BACKEND = "cuda", "cuda"


def _emit(*words):
    print(MARK + " ".join(str(w) for w in words), flush=True)


# ---------------------------------------------------------------------------------------------
# Supervisor: runs the cases in worker processes, one fresh worker after any that dies or hangs.

def supervise(worker_argv, n_cases, case_timeout, env=None, log=print):
    """worker_argv(start) -> the command that runs cases start, start + 1, ... and speaks the
    protocol above (in environment `env`). Returns {case index: "ok" | "fail" | "hang" |
    "crash" | "not run"}; a case missing from it never reported."""
    status = {}
    start = 0
    while start < n_cases:
        proc = subprocess.Popen(worker_argv(start), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, env=env)
        current, stage, pending = None, "start-up", b""
        tail = collections.deque(maxlen=12)
        deadline = time.monotonic() + case_timeout
        ended = None
        while ended is None:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([proc.stdout], [], [], left)[0]:
                proc.kill()
                proc.wait()
                ended = "hang"
                break
            chunk = os.read(proc.stdout.fileno(), 65536)
            if not chunk:
                ended = "crash" if proc.wait() != 0 else "exit"
                break
            pending += chunk
            *lines, pending = pending.split(b"\n")
            for raw in lines:
                line = raw.decode(errors="replace")
                if not line.startswith(MARK):
                    log(line)
                    tail.append(line)
                    continue
                word, _, arg = line[len(MARK):].partition(" ")
                if word == "case":
                    current, stage = int(arg), "forward"
                    deadline = time.monotonic() + case_timeout
                    tail.clear()
                elif word == "stage":
                    stage = arg
                elif word in ("ok", "fail"):
                    status[int(arg)] = word
                    stage = "its end (after its result)"
        if ended == "exit" and current is None:
            ended = "crash"  # a worker that ran nothing and said nothing
        if ended == "exit":
            start = (current + 1) if current is not None else n_cases
            continue
        at = "before its first case" if current is None else f"in case {current} at {stage}"
        log(f"!! worker {'hung (no line for %d s)' % case_timeout if ended == 'hang' else 'died'} {at}; "
            "its last lines:")
        for line in tail:
            log(f"!!   {line}")
        if current is None:  # nothing will run: say so for every case left
            for i in range(start, n_cases):
                status.setdefault(i, "not run")
            break
        status[current] = ended  # even after it reported: compute-sanitizer's error exit code, say
        start = current + 1
    return status


# ---------------------------------------------------------------------------------------------
# Worker: the cases.

def _cases():
    """[(name, build)], build(rnd) -> (q, k, v, kwargs) for fusedlm.attention, or
    (q, k, v, (cu, max_len)) for fusedlm.attention_varlen."""
    import torch

    def zeros(*s):
        return torch.zeros(*s, device=DEVICE, dtype=torch.bfloat16)

    def one_hot(s, d):
        x = zeros(1, s, 2, d)
        x[0, torch.arange(s), :, torch.arange(s) % d] = 8.0
        return x

    cases = [(f"probe d{d} {dtype}", ("probe", d, dtype)) for d in (64, 128) for dtype in ("bfloat16", "float16")]
    for d in (64, 128):
        for s in (128, 512):
            cases += [
                (f"d{d} s{s} q=0 (P V only)", lambda r, s=s, d=d: (zeros(1, s, 2, d), r(1, s, 2, d), r(1, s, 2, d), {})),
                (f"d{d} s{s} k=q one-hot (Q K^T)", lambda r, s=s, d=d: (one_hot(s, d), one_hot(s, d), r(1, s, 2, d), {})),
                (f"d{d} s{s} random gqa", lambda r, s=s, d=d: (r(2, s, 4, d), r(2, s, 2, d), r(2, s, 2, d), {})),
                (f"d{d} s{s} random gqa causal",
                 lambda r, s=s, d=d: (r(2, s, 4, d), r(2, s, 2, d), r(2, s, 2, d), {"causal": True})),
            ]

        def padded(r, d=d):
            mask = torch.arange(300, device=DEVICE)[None, :] < torch.tensor([[300], [131]], device=DEVICE)
            return r(2, 300, 4, d), r(2, 300, 4, d), r(2, 300, 4, d), {"attention_mask": mask}

        def packed(r, d=d):
            lens = [1, 127, 128, 129, 300, 64]
            cu = torch.tensor([0] + lens, device=DEVICE).cumsum(0).to(torch.int32)
            n = sum(lens)
            return r(n, 4, d), r(n, 2, d), r(n, 2, d), (cu, max(lens))

        cases += [
            (f"d{d} s300 padding mask", padded),
            (f"d{d} sq200 sk700 causal",
             lambda r, d=d: (r(2, 200, 4, d), r(2, 700, 4, d), r(2, 700, 4, d), {"causal": True})),
            (f"d{d} packed lengths 1..300 gqa", packed),
        ]
    return cases


def _run_probe(name, d, dtype):
    """The primitives' probe: exact swizzle placement, and both wgmma forms within fp32
    accumulation of float64 (errors relative to the reference's largest magnitude)."""
    import torch
    from fusedlm.ops import attention_kernels
    if BACKEND == "torch":
        print(f"{name:<34} (no probe on the torch backend)", flush=True)
        return True
    e = attention_kernels.probe_wgmma(d, getattr(torch, dtype), DEVICE)
    ok = e["tma_swizzle"] == 0.0 and max(e["wgmma_ss"], e["wgmma_ss_n128"], e["wgmma_rs"]) < 1e-4
    print(f"{name:<34} TMA swizzle {'exact' if e['tma_swizzle'] == 0.0 else 'WRONG (max |diff| %.2e)' % e['tma_swizzle']}"
          f"  wgmma SS (Q K^T) n64 {e['wgmma_ss']:.2e} n128 {e['wgmma_ss_n128']:.2e}"
          f"  RS (P V, V MN-major) {e['wgmma_rs']:.2e}"
          + ("" if ok else "  <- the first wrong one is what the kernels misread"), flush=True)
    return ok


def _run_case(i, name, build):
    import torch
    import fusedlm
    from fusedlm import reference
    from fusedlm.ops import attention_kernels

    if isinstance(build, tuple):
        return _run_probe(name, *build[1:])
    g = torch.Generator(device=DEVICE).manual_seed(1000 + i)
    q, k, v, kw = build(lambda *s: torch.randn(*s, device=DEVICE, generator=g).to(torch.bfloat16))
    q, k, v = (t.detach().requires_grad_() for t in (q, k, v))
    attention_kernels.cuda_kernels = "wgmma"
    if isinstance(kw, tuple):  # packed sequences
        cu, max_len = kw
        out = fusedlm.attention_varlen(q, k, v, cu, cu, max_len, max_len, backend=BACKEND)
    else:
        out = fusedlm.attention(q, k, v, backend=BACKEND, **kw)
    _sync()
    _emit("stage", f"backward (the forward ran {attention_kernels.last_cuda_forward_kernel})")
    do = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), do)
    _sync()
    _emit("stage", "checking")
    ran = f"{attention_kernels.last_cuda_forward_kernel}/{attention_kernels.last_cuda_backward_kernel}"
    f64 = [t.detach().double().requires_grad_() for t in (q, k, v)]
    if isinstance(kw, tuple):
        ref = reference.attention_varlen(*f64, cu, cu)[0]
    else:
        ref = reference.attention(*f64, causal=kw.get("causal", False), key_mask=kw.get("attention_mask"))[0]
    want = torch.autograd.grad(ref, f64, do.double())

    def rel(a, r):
        return ((a.double() - r).norm() / r.norm().clamp_min(1e-30)).item()

    errs = [rel(out, ref)] + [rel(a, r) for a, r in zip(grads, want)]
    # The bound: 2e-2, or twice PyTorch's own error in the same precision where that is larger
    # (as the GPU suite bounds errors). Some cases are ill-conditioned for a gradient: with
    # one-hot keys repeated every d rows, dQ is nearly zero and dominated by delta = rowsum(dO O)
    # taken from the rounded output, which every fused kernel (and SDPA's) does.
    peer = [0.0] * 4 if isinstance(kw, tuple) else [rel(a, r) for a, r in zip(_sdpa(q, k, v, do, kw), (ref, *want))]
    bounds = [max(2e-2, 2 * e) for e in peer]
    nan = int(sum(torch.isnan(t).sum() for t in (out, *grads)))
    print(f"{name:<34} {ran:<12} rel err out {errs[0]:.2e} dq {errs[1]:.2e} dk {errs[2]:.2e} "
          f"dv {errs[3]:.2e}  max|out err| {(out.double() - ref).abs().max().item():.2e}  nan {nan}"
          + (f"  (bounds {' '.join(f'{b:.1e}' for b in bounds)})" if max(bounds) > 2e-2 else ""), flush=True)
    return all(e < b for e, b in zip(errs, bounds)) and nan == 0 and (ran == "wgmma/wgmma" or BACKEND == "torch")


def _sdpa(q, k, v, do, kw):
    """PyTorch's scaled_dot_product_attention on the same inputs in their dtype: the output and
    the gradients of q, k, v (grouped heads repeated, their gradients summed back; fusedlm's
    causal mask, aligned to the last key, and key mask as an explicit boolean mask)."""
    import torch
    import torch.nn.functional as F
    b, sq, h, d = q.shape
    sk, hk = k.shape[1], k.shape[2]
    allowed = torch.ones(b, 1, sq, sk, dtype=torch.bool, device=q.device)
    if kw.get("causal"):
        allowed &= torch.ones(sq, sk, dtype=torch.bool, device=q.device).tril(sk - sq)
    if kw.get("attention_mask") is not None:
        allowed &= kw["attention_mask"].bool()[:, None, None, :]
    qt, kt, vt = (t.detach().transpose(1, 2).requires_grad_() for t in (q, k, v))
    out = F.scaled_dot_product_attention(qt, kt.repeat_interleave(h // hk, 1), vt.repeat_interleave(h // hk, 1),
                                         attn_mask=allowed)
    grads = torch.autograd.grad(out, (qt, kt, vt), do.transpose(1, 2))
    return [t.transpose(1, 2) for t in (out, *grads)]


def _sync():
    import torch
    if DEVICE == "cuda":
        torch.cuda.synchronize()


def worker(start):
    import torch
    import fusedlm
    name = (torch.cuda.get_device_name() if DEVICE == "cuda" else "cpu (a check of this script)" if BACKEND == "torch"
            else "cpu (the CPU emulator's compute capability 9.0 device)")
    print(f"device: {name}  fusedlm build: {fusedlm.build_info()}", flush=True)
    cases = _cases()
    for i in range(start, len(cases)):
        name, build = cases[i]
        if MATCH not in name:
            continue
        _emit("case", i)
        _emit("ok" if _run_case(i, name, build) else "fail", i)


# ---------------------------------------------------------------------------------------------
# Timing (one process; only after every case passed).

def _time(fn, iters=20):
    import torch
    for _ in range(3):
        fn()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(iters):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / iters


def timing():
    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel
    import fusedlm
    from fusedlm.ops import attention_kernels

    print(f"\n{'shape':<30} {'impl':<20} {'fwd ms':>8} {'TFLOP/s':>8} {'fwd+bwd ms':>10} {'TFLOP/s':>8}")
    for b, s, h, d, causal in [(32, 512, 12, 64, False), (8, 2048, 16, 128, False), (8, 2048, 16, 128, True),
                               (2, 8192, 16, 128, True), (4, 4096, 32, 64, False)]:
        q, k, v = (torch.randn(b, s, h, d, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
        do = torch.randn_like(q)
        flops = 4 * b * h * s * s * d / (2 if causal else 1)  # forward; the backward is 2.5x
        impls = {}
        for kern in ("wgmma", "mma"):
            def run(kern=kern):
                with attention_kernels.using_cuda_kernels(kern):
                    return fusedlm.attention(q, k, v, causal=causal, backend="cuda")
            impls[f"fusedlm[cuda:{kern}]"] = run
        impls["fusedlm[triton]"] = lambda: fusedlm.attention(q, k, v, causal=causal, backend="triton")

        def cudnn():
            with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
                qt, kt, vt = (t.transpose(1, 2) for t in (q, k, v))
                return F.scaled_dot_product_attention(qt, kt, vt, is_causal=causal).transpose(1, 2)
        impls["sdpa[cudnn]"] = cudnn
        label = f"b{b} s{s} h{h} d{d}" + (" causal" if causal else "")
        for name, fn in impls.items():
            try:
                with torch.no_grad():
                    fwd = _time(fn)
                both = _time(lambda: torch.autograd.grad(fn(), (q, k, v), do))
                print(f"{label:<30} {name:<20} {fwd:8.3f} {flops / fwd / 1e9:8.1f} {both:10.3f} "
                      f"{3.5 * flops / both / 1e9:8.1f}", flush=True)
            except Exception as e:  # noqa: BLE001 - report and go on to the next peer
                print(f"{label:<30} {name:<20} failed: {type(e).__name__}: {str(e)[:120]}", flush=True)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--no-time", action="store_true", help="the cases only")
    ap.add_argument("--wrap", default="", help="a command to run each worker under, e.g. compute-sanitizer")
    ap.add_argument("--case-timeout", type=float, default=60.0, help="seconds a case may go without a line")
    ap.add_argument("--match", default="", help="only the cases whose name contains this text")
    ap.add_argument("--cpu", action="store_true", help="check this script on the CPU (torch backend)")
    ap.add_argument("--emulated", action="store_true",
                    help="run the cases on the CPU emulator's sm_90 device (an emulated build of fusedlm._C)")
    ap.add_argument("--worker", type=int, default=None, help=argparse.SUPPRESS)
    args = ap.parse_args()
    global DEVICE, BACKEND, MATCH
    MATCH = args.match
    if args.cpu:
        DEVICE, BACKEND = "cpu", "torch"
    if args.emulated:
        DEVICE = "cpu"
    if args.worker is not None:
        worker(args.worker)
        return 0
    # Building nothing: the supervisor never touches the GPU. The case numbers stay the full
    # list's, so a case is named alike with or without --match.
    names = [name for name, _ in _cases()]
    chosen = [i for i, name in enumerate(names) if args.match in name]
    env = dict(os.environ, CUDA_LAUNCH_BLOCKING="1", **({"FUSEDLM_EMU_ARCH": "90"} if args.emulated else {}))
    status = supervise(
        lambda start: [*shlex.split(args.wrap), sys.executable, os.path.abspath(__file__), "--worker", str(start),
                       "--match", args.match, *(["--cpu"] if args.cpu else []),
                       *(["--emulated"] if args.emulated else [])],
        max(chosen) + 1 if chosen else 0, args.case_timeout, env=env, log=lambda line: print(line, flush=True))
    status = {i: s for i, s in status.items() if i in chosen}
    names = {i: names[i] for i in chosen}
    bad = {i: s for i, s in status.items() if s != "ok"}
    missing = [i for i in chosen if i not in status]
    print(f"\ncases: {sum(s == 'ok' for s in status.values())} of {len(names)} passed")
    for i, s in sorted(bad.items()):
        print(f"  {s:<8} {names[i]}")
    for i in missing:
        print(f"  no result {names[i]}")
    ok = not bad and not missing
    if ok and not args.no_time and DEVICE == "cuda":
        timing()
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
