"""Old module names kept for one release after a rename, each warning once where it is imported."""
import importlib
import sys
import warnings


def moved(old: str, *new: str):
    """Make module `old` read its attributes from the modules `new` (first that has it), after a
    DeprecationWarning naming where they went. Reads only: assigning to the old module does not
    reach the new ones."""
    warnings.warn(f"{old} is deprecated and will be removed in the next release: use "
                  f"{' / '.join(new)}", DeprecationWarning, stacklevel=3)
    targets = [importlib.import_module(n) for n in new]
    module = sys.modules[old]

    def __getattr__(name):
        for t in targets:
            if hasattr(t, name):
                return getattr(t, name)
        raise AttributeError(f"module {old!r} has no attribute {name!r}")

    module.__getattr__ = __getattr__
