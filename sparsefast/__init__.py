"""sparsefast: prune LLMs fast (Wanda, SparseGPT, LLM-Pruner) and run the pruned models fast.

The public idioms are `model, tok = sparsefast.load(path)` and `sparsefast.prune(model, config, calib)`
(sparsefast.api). Importing the package imports neither torch nor transformers: `load` and `prune` are resolved on
first use, so `sparsefast --help` answers at once.
"""

from __future__ import annotations

import sys
import types

__version__ = "0.1.0"
__all__ = ["load", "prune", "__version__"]

_API = frozenset({"load", "prune"})


class _Package(types.ModuleType):
    """The package module. The import system binds each imported subpackage as an attribute of its parent; for the
    subpackage `sparsefast.prune` that would hide the function `sparsefast.prune`, so that binding is skipped (the
    subpackage stays importable by its dotted path: `from sparsefast.prune.wanda import ...`)."""

    def __setattr__(self, name: str, value: object) -> None:
        if name in _API and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)

    def __getattr__(self, name: str) -> object:
        if name not in _API:
            raise AttributeError(f"module 'sparsefast' has no attribute {name!r}")
        from sparsefast import api

        value = getattr(api, name)
        self.__dict__[name] = value
        return value


sys.modules[__name__].__class__ = _Package
