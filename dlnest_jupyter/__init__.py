"""dlnest_jupyter: DLNest-style deep-learning experiments from Jupyter and the shell.

Importing this package stays cheap: torch is imported only when a torch-backed name is first used."""
from __future__ import annotations

from typing import Any

from .errors import DLNestError

__version__ = "0.1.0"
__all__ = ["Model", "Dataset", "LifeCycle", "DLNestError", "load", "analyze", "new_project"]

_LAZY = {
    "Model": ".model",
    "Dataset": ".dataset",
    "LifeCycle": ".lifecycle",
    "load": ".analysis",
    "analyze": ".analysis",
    "new_project": ".scaffold",
}


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        value = getattr(importlib.import_module(_LAZY[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
