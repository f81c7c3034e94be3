"""mlx-lm's model definitions, imported without running mlx-lm's package `__init__`.

`import mlx_lm` first imports its generation and conversion utilities, and with them transformers (and torch,
wherever torch is installed): ~240 MiB of resident memory and ~4 s of start-up that pudl never uses, since it
needs only `mlx_lm.models`. So the package module is registered un-run; the first attribute read from it (e.g.
`from mlx_lm import load` elsewhere in the process) runs its `__init__` then, and nothing else changes.
"""

from __future__ import annotations

import importlib.util
import sys
import types


class _DeferredPackage(types.ModuleType):
    def __getattr__(self, name):
        run = self.__dict__.pop("_pudl_run_init", None)
        if run is None or name.startswith("__"):
            raise AttributeError(f"module {self.__name__!r} has no attribute {name!r}")
        run(self)
        return getattr(self, name)


def _register_deferred(name: str):
    if name in sys.modules:
        return
    spec = importlib.util.find_spec(name)
    if spec is None or spec.loader is None:
        return  # not installed: the import below fails with Python's own message
    package = importlib.util.module_from_spec(spec)
    package.__class__ = _DeferredPackage
    package._pudl_run_init = spec.loader.exec_module
    sys.modules[name] = package


_register_deferred("mlx_lm")

from mlx_lm.models import cache, llama, qwen2, qwen3  # noqa: E402

__all__ = ["cache", "llama", "qwen2", "qwen3"]
