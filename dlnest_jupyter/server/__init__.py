"""The jupyter_server extension (REST API under ``/dlnest/api/`` and a dispatcher in the server's event loop)
and ``serve``, the same dispatcher without Jupyter.

Importing this package is cheap on purpose: tornado and jupyter_server are imported only when a server loads
the extension, so ``python -m dlnest_jupyter serve`` needs neither."""
from __future__ import annotations

from typing import Any


def _jupyter_server_extension_points() -> list[dict[str, str]]:
    return [{"module": "dlnest_jupyter.server"}]


def _load_jupyter_server_extension(serverapp: Any) -> None:
    """Register the handlers (the server calls this before its event loop runs)."""
    from .extension import load

    load(serverapp)


async def _start_jupyter_server_extension(serverapp: Any) -> None:
    """Start the dispatcher: called by jupyter_server once its event loop runs."""
    from .extension import start

    await start(serverapp)


def serve(poll_s: float = 1.0) -> int:
    """Dispatch the queue headless until SIGTERM/SIGINT (``python -m dlnest_jupyter serve``)."""
    from .headless import serve as _serve

    return _serve(poll_s)
