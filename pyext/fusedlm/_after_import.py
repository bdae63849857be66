"""Run a function once a module is imported, now if it already is: how `import fusedlm`
registers its attention with transformers without importing transformers itself."""
import importlib.abc
import importlib.util
import sys
import warnings


def _safely(fn, module_name):
    try:
        fn()
    except Exception as e:  # never break the user's import of the other library
        warnings.warn(f"fusedlm: could not hook into {module_name} ({type(e).__name__}: {e}); "
                      "call fusedlm.integrations.hf.register() to see why", RuntimeWarning)


class _Hook(importlib.abc.MetaPathFinder):
    def __init__(self, name, fn):
        self.name, self.fn = name, fn

    def find_spec(self, fullname, path=None, target=None):
        if fullname != self.name:
            return None
        sys.meta_path.remove(self)  # once; the other finders locate the module
        spec = importlib.util.find_spec(fullname)
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        spec.loader = _ThenCall(spec.loader, self.fn, self.name)
        return spec


class _ThenCall:
    """The module's own loader, calling fn after it executes the module; the module is left
    with its own loader (tracebacks, get_source, resources see no difference)."""

    def __init__(self, loader, fn, name):
        self._loader, self._fn, self._name = loader, fn, name

    def __getattr__(self, attr):
        return getattr(self._loader, attr)

    def create_module(self, spec):
        return self._loader.create_module(spec)

    def exec_module(self, module):
        module.__loader__ = module.__spec__.loader = self._loader
        self._loader.exec_module(module)
        _safely(self._fn, self._name)


def call_after_import(name: str, fn):
    """fn() once module `name` has been imported (at once if it already is)."""
    if name in sys.modules:
        _safely(fn, name)
    else:
        sys.meta_path.insert(0, _Hook(name, fn))
