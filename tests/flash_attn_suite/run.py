"""Run flash-attention's own test suite against fusedlm.flash_attn_interface.

flash-attention's tests (its tests/test_flash_attn.py; not in this repository: bring your own
copy of the version you want to check against) import `flash_attn`; this runner puts the shim
in ./shim first on sys.path, so they call fusedlm. On a machine without a GPU every tensor the
tests place on "cuda" is made on the CPU instead (a torch function mode rewrites the device) and
the CUDA queries they make at import answer as an H100/H200 would; fusedlm's dispatch then runs
its CPU paths: the reference (torch backend), or with --backend triton the Triton kernels
under the interpreter (float16; bfloat16 has no interpreter and takes the reference). With
--device cuda nothing is rewritten.

The full grid is about half a million cases; --per-test N runs a seeded random sample of N cases
of each test function (0: all), --max-seqlen and --max-headdim skip cases whose sequence-length
or head-dim parameters exceed them (the CPU reference and the interpreter are slow there). Each case ends as one of:
  passed;
  refused  -- fusedlm raised its own ValueError/TypeError naming a feature it does not have
              (reported as a skip with the message: the contract is "a clear error, never a
              different answer");
  failed   -- an assertion of the suite (accuracy, determinism, dropout rate) or any other
              exception: a bug in fusedlm or in the shim;
  not applicable -- tests of flash-attn's internals (its C++ entry points), and on a CPU its
              GPU race hunt (INTERNAL, INTERNAL_ON_CPU below).
The summary (counts, each refusal message with its count, each failure) is printed and, with
--json, written after every case ("finished": false until the run ends). Exit status 1 when
anything failed.

    python tests/flash_attn_suite/run.py --suite /path/to/flash-attention/tests/test_flash_attn.py \\
        --per-test 20 --max-seqlen 512 --json summary.json
"""
import argparse
import collections
import contextlib
import json
import os
import random
import sys
import traceback

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SHIM = os.path.join(HERE, "shim")


class _CudaOnCpu:
    """Tensors asked for on "cuda" are made on the CPU; the CUDA queries the suite makes answer
    as a Hopper GPU's (so none of its architecture skips fire)."""

    def __init__(self):
        import torch
        from torch.overrides import TorchFunctionMode

        def cpu(device):
            if isinstance(device, torch.device):
                return torch.device("cpu") if device.type == "cuda" else device
            if isinstance(device, str) and device.startswith("cuda"):
                return "cpu"
            return device

        class Mode(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                kwargs = dict(kwargs or {})
                if "device" in kwargs:
                    kwargs["device"] = cpu(kwargs["device"])
                if func in (torch.Tensor.to, torch.Tensor.cuda):
                    if func is torch.Tensor.cuda:
                        return args[0]
                    args = tuple(cpu(a) for a in args)
                return func(*args, **kwargs)

        class Properties:
            name, major, minor = "cpu standing in for sm_90", 9, 0
            total_memory = 16 * 2 ** 30  # the suite skips its largest references below this
            multi_processor_count = 132

        self.mode = Mode()
        self.saved = {}
        self.replacements = {
            "get_device_capability": lambda *a, **k: (9, 0),
            "get_device_properties": lambda *a, **k: Properties(),
            "synchronize": lambda *a, **k: None,
            "empty_cache": lambda *a, **k: None,
        }

    def __enter__(self):
        import torch
        for name, fn in self.replacements.items():
            self.saved[name] = getattr(torch.cuda, name)
            setattr(torch.cuda, name, fn)
        self.mode.__enter__()
        return self

    def __exit__(self, *exc):
        import torch
        self.mode.__exit__(*exc)
        for name, fn in self.saved.items():
            setattr(torch.cuda, name, fn)


def _fusedlm_refusal(excinfo):
    """The message when the exception is fusedlm's (or the shim's) own ValueError/TypeError,
    raised in its code (not an error in the suite's own code)."""
    if not isinstance(excinfo.value, (ValueError, TypeError)):
        return None
    import fusedlm
    ours = (os.path.dirname(os.path.abspath(fusedlm.__file__)), SHIM)
    frames = traceback.extract_tb(excinfo.tb)
    if frames and os.path.abspath(frames[-1].filename).startswith(ours):
        return f"{type(excinfo.value).__name__}: {excinfo.value}"
    return None


# Tests of flash-attn's internals rather than its API: not run (counted as "not applicable").
INTERNAL = {
    "test_flash_attn_generator_arg_must_be_none": "calls flash-attn's C++ extension (flash_attn_gpu)",
    "test_flash_attn_varlen_paged_kv_num_splits": "calls flash-attn's private _flash_attn_varlen_forward",
}


# On a CPU only: a GPU race hunt (nothing races on a CPU, and the interpreter would take hours).
INTERNAL_ON_CPU = {
    "test_flash_attn_race_condition": "repeats a batch-60 call 250 times to catch GPU races",
}


class Plugin:
    def __init__(self, per_test, max_seqlen, seed, keyword_seqlens=("seqlen", "seqlen_q", "seqlen_k"),
                 progress=None, internal=INTERNAL, max_headdim=0):
        self.per_test, self.max_seqlen, self.seed = per_test, max_seqlen, seed
        self.max_headdim = max_headdim
        self.internal = internal
        self.progress = progress  # a function given the summary after every case (a run cut short keeps it)
        self.keyword_seqlens = keyword_seqlens
        self.outcomes = collections.Counter()
        self.per_function = collections.defaultdict(collections.Counter)
        self.refusals = collections.Counter()
        self.failures = []
        self.collected = 0
        self.running = None

    def pytest_collection_modifyitems(self, session, config, items):
        self.collected = len(items)
        by_function = collections.defaultdict(list)
        for item in items:
            if item.originalname in self.internal:
                why = self.internal[item.originalname]
                item.add_marker(pytest.mark.skip(reason=f"not applicable: {why}"))
                by_function[item.originalname].append(item)
                continue
            params = getattr(getattr(item, "callspec", None), "params", {})
            lengths = [v for k, v in params.items() if k in self.keyword_seqlens]
            if self.max_seqlen and any(n > self.max_seqlen for n in lengths):
                continue
            if self.max_headdim and params.get("d", 0) > self.max_headdim:
                continue
            by_function[item.originalname].append(item)
        rng = random.Random(self.seed)
        kept = []
        for name in sorted(by_function):
            group = by_function[name]
            if self.per_test and len(group) > self.per_test:
                group = sorted(rng.sample(group, self.per_test), key=items.index)
            kept += group
        deselected = [i for i in items if i not in set(kept)]
        config.hook.pytest_deselected(items=deselected)
        items[:] = kept

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_makereport(self, item, call):
        report = (yield).get_result()
        outcome = None
        if report.skipped:  # the suite's own skips (pytest.skip in a test counts here too)
            outcome = "not applicable" if item.originalname in self.internal else "skipped by the suite"
        elif report.passed:
            outcome = "passed" if call.when == "call" else None
        elif call.when == "call" and _fusedlm_refusal(call.excinfo) is not None:
            why = _fusedlm_refusal(call.excinfo)
            outcome = "refused"
            self.refusals[why.splitlines()[0]] += 1
            report.outcome = "skipped"
            report.longrepr = (str(item.path), item.location[1] or 0, f"refused by fusedlm: {why}")
        else:
            outcome = "failed"
            self._fail(item, call)
        if outcome is not None:
            self.outcomes[outcome] += 1
            self.per_function[item.originalname][outcome] += 1
        if self.progress is not None and call.when == "teardown":
            self.progress(self.summary())

    def pytest_runtest_logstart(self, nodeid, location):
        # Written before each case: a run cut short by a time limit says which case it was in.
        self.running = nodeid.split("::", 1)[-1]
        if self.progress is not None:
            self.progress(self.summary())

    def _fail(self, item, call):
        text = call.excinfo.exconly() if call.excinfo else "failed"
        self.failures.append({"test": item.nodeid.split("::", 1)[-1], "when": call.when,
                              "error": text.splitlines()[0][:400]})

    def summary(self):
        return {"collected": self.collected, "running": self.running, "outcomes": dict(self.outcomes),
                "per_function": {k: dict(v) for k, v in sorted(self.per_function.items())},
                "refusals": dict(self.refusals.most_common()), "failures": self.failures}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--suite", required=True, help="flash-attention's tests/test_flash_attn.py")
    ap.add_argument("--device", choices=("cpu", "cuda"), default=None,
                    help="where the suite's 'cuda' tensors live (default: cuda if present)")
    ap.add_argument("--per-test", type=int, default=20, help="cases sampled per test function (0: all)")
    ap.add_argument("--max-seqlen", type=int, default=0, help="skip cases with a longer sequence (0: none)")
    ap.add_argument("--max-headdim", type=int, default=0, help="skip cases with a larger head dim (0: none)")
    ap.add_argument("--seed", type=int, default=0, help="seed of the case sample")
    ap.add_argument("--backend", choices=("auto", "torch", "triton", "cuda"), default="auto",
                    help="fusedlm's backend (FUSEDLM_BACKEND): auto runs the reference off a GPU; "
                         "triton there runs the Triton kernels in the interpreter (float16; "
                         "bfloat16 falls back to the reference)")
    ap.add_argument("--json", help="write the summary here")
    ap.add_argument("pytest_args", nargs="*", help="passed to pytest (after --), e.g. -k output")
    args = ap.parse_args(argv)

    import torch
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cpu":
        os.environ.setdefault("TRITON_INTERPRET", "1")  # before fusedlm imports triton
    if args.backend != "auto":
        os.environ["FUSEDLM_BACKEND"] = args.backend
    sys.path.insert(0, SHIM)
    import fusedlm  # noqa: F401  (the shim's target; imported before the mode is on)
    suite = os.path.abspath(args.suite)
    about = dict(device=device, backend=args.backend, suite=suite, per_test=args.per_test,
                 max_seqlen=args.max_seqlen, max_headdim=args.max_headdim,
                 seed=args.seed, fusedlm=fusedlm.__version__, torch=torch.__version__)

    def write(summary, finished=False):
        if args.json:
            with open(args.json, "w") as fh:
                json.dump(dict(summary, **about, finished=finished), fh, indent=1)
    internal = dict(INTERNAL, **(INTERNAL_ON_CPU if device == "cpu" else {}))
    plugin = Plugin(args.per_test, args.max_seqlen, args.seed, progress=write, internal=internal,
                    max_headdim=args.max_headdim)
    # -c /dev/null: none of this repository's pytest settings; -p no:cacheprovider: no cache
    # written next to the suite's file.
    pytest_args = [suite, "-q", "-p", "no:cacheprovider", "-c", os.devnull,
                   "--rootdir", os.path.dirname(suite), *args.pytest_args]
    with _CudaOnCpu() if device == "cpu" else contextlib.nullcontext():
        pytest.main(pytest_args, plugins=[plugin])
    plugin.running = None
    summary = plugin.summary()
    write(summary, finished=True)
    print(json.dumps({k: summary[k] for k in ("collected", "outcomes", "refusals")}, indent=1))
    for f in summary["failures"]:
        print(f"FAILED {f['test']} ({f['when']}): {f['error']}")
    return 1 if summary["failures"] else 0


if __name__ == "__main__":
    sys.exit(main())
