"""dlnest_jupyter: DLNest-style deep-learning experiments from Jupyter and the shell.

Importing this package stays cheap: torch is imported only when a torch-backed name is first used."""
from __future__ import annotations

from typing import Any

from .errors import DLNestError

__version__ = "0.1.0"
__all__ = ["Model", "Dataset", "LifeCycle", "DLNestError", "load", "analyze", "new_project", "run", "continue_",
           "cancel", "task", "tasks", "Task", "panel", "load_ipython_extension"]

_LAZY = {
    "run": (".api", "submit"),
    "continue_": (".api", "continue_"),
    "cancel": (".api", "cancel"),
    "task": (".api", "task"),
    "tasks": (".api", "tasks"),
    "Task": (".api", "Task"),
    "Model": (".model", "Model"),
    "Dataset": (".dataset", "Dataset"),
    "LifeCycle": (".lifecycle", "LifeCycle"),
    "load": (".analysis", "load"),
    "analyze": (".analysis", "analyze"),
    "new_project": (".scaffold", "new_project"),
    "panel": (".panels", "panel"),
}


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    """``jupyter server`` finds the REST API and the dispatcher here (enabled by the installed config file)."""
    return [{"module": "dlnest_jupyter.server"}]


def load_ipython_extension(ipython: Any) -> None:
    """``%load_ext dlnest_jupyter``: the magics and this kernel's dispatcher (torch stays unimported)."""
    from .magics import load

    load(ipython)


def unload_ipython_extension(ipython: Any) -> None:
    from .magics import unload

    unload(ipython)


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(module, __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
