"""Which source tree a carried fusedlm wheel was built from.

The GPU machine gets a wheel built here (benchmarks/build_wheel.sh) to save the CUDA build there.
A wheel left over from an older tree would run the old kernels *and* the old Python package
under the new tree's tests and benchmarks, silently. So the build writes the fingerprint of
everything that goes into the wheel beside it, and benchmarks/gpu_run.sh installs the wheel only
if the tree it runs in has the same fingerprint (otherwise it builds from source).

    python3 benchmarks/wheel_fingerprint.py [ROOT]            print ROOT's fingerprint
    python3 benchmarks/wheel_fingerprint.py --check FILE [ROOT]
        exit 0 if FILE holds ROOT's fingerprint, 1 (saying why) if not

The fingerprint is a SHA-256 over the relative path and bytes of every file under the wheel's
inputs (INPUTS), in sorted order, leaving out what .gitignore leaves out there (bytecode, built
modules), which the GPU machine's copy of the tree does not have: a change to any of them, a file
added, removed or renamed, changes it; timestamps and anything else in the tree do not.
"""
import argparse
import hashlib
import os
import sys

# What the wheel is built from: the compiled core, the Triton kernels, the Python package and
# the build's own description.
INPUTS = ("CMakeLists.txt", "pyproject.toml", "csrc", "kernels", "pyext")
_SKIP_DIRS = {"__pycache__", "build", "dist"}
_SKIP_SUFFIXES = (".pyc", ".pyo", ".so", ".egg-info")


def _files(root):
    for top in INPUTS:
        path = os.path.join(root, top)
        if os.path.isfile(path):
            yield top
            continue
        for dirpath, dirnames, filenames in os.walk(path):
            dirnames[:] = sorted(d for d in dirnames
                                 if d not in _SKIP_DIRS and not d.endswith(_SKIP_SUFFIXES))
            for name in sorted(filenames):
                if not name.endswith(_SKIP_SUFFIXES):
                    yield os.path.relpath(os.path.join(dirpath, name), root).replace(os.sep, "/")


def fingerprint(root="."):
    """Hex SHA-256 of the wheel's inputs under `root`."""
    missing = [top for top in INPUTS if not os.path.exists(os.path.join(root, top))]
    if missing:
        raise FileNotFoundError(f"root {root!r} is not a fusedlm source tree: no {', '.join(missing)}")
    h = hashlib.sha256()
    for rel in sorted(_files(root)):
        with open(os.path.join(root, rel), "rb") as f:
            data = f.read()
        # Length-prefixed, so that no two different trees hash the same byte stream.
        h.update(f"{len(rel)}:{rel}:{len(data)}:".encode())
        h.update(data)
    return h.hexdigest()


def check(record, root="."):
    """None if the file `record` holds root's fingerprint, else why not."""
    try:
        with open(record) as f:
            recorded = f.read().strip()
    except OSError as e:
        return f"no fingerprint beside the wheel ({e.strerror}: {record})"
    current = fingerprint(root)
    if recorded != current:
        return (f"the wheel was built from another source tree (fingerprint {recorded[:12]}, "
                f"this tree {current[:12]})")
    return None


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("root", nargs="?", default=".", help="the source tree (default: .)")
    p.add_argument("--check", metavar="FILE", help="compare with the fingerprint in FILE")
    args = p.parse_args(argv)
    if args.check is None:
        print(fingerprint(args.root))
        return 0
    why = check(args.check, args.root)
    if why is not None:
        print(why)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
