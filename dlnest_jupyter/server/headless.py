"""The dispatcher without Jupyter (``python -m dlnest_jupyter serve``), and the start-up reconcile it shares
with the server extension.

A machine without a notebook server still needs something that starts queued tasks when nothing else is
dispatching (no kernel open, no supervisor finishing). Any number of dispatchers may run at once: placement
is decided inside one ledger transaction (see scheduler.py), so this loop never double-books a device."""
from __future__ import annotations

import os
import signal
import sys
import threading
from typing import Any

from .. import api
from ..errors import DLNestError
from ..scheduler import dispatch_once, reconcile_at_startup


def serve(poll_s: float = 1.0) -> int:
    """Reconcile, then ``dispatch_once`` every ``poll_s`` seconds until SIGTERM or SIGINT; returns 0."""
    if not poll_s > 0:
        raise DLNestError(f"the poll interval must be a positive number of seconds, got {poll_s}")
    ledger = api.ledger()
    stop, wake = threading.Event(), threading.Event()

    def on_signal(*_: Any) -> None:
        stop.set()
        wake.set()

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGTERM, signal.SIGINT)}
    api.set_waker(wake.set)  # a submission made in this process (none today) is looked at at once
    try:
        print(f"dlnest_jupyter: dispatching the queue of {ledger.path} (pid {os.getpid()}); "
              f"SIGTERM or Ctrl-C stops", flush=True)
        for task_id in reconcile_at_startup(ledger):
            print(f"dlnest_jupyter: {task_id} failed: its supervisor died", flush=True)
        last_error = None
        while not stop.is_set():
            try:
                for task_id in dispatch_once(ledger):
                    print(f"dlnest_jupyter: started {task_id}", flush=True)
                last_error = None
            except Exception as exc:  # a locked or full disk must not end the loop; say it once
                message = f"{type(exc).__name__}: {exc}"
                if message != last_error:
                    print(f"dlnest_jupyter: dispatch error: {message}", file=sys.stderr, flush=True)
                last_error = message
            wake.wait(poll_s)
            wake.clear()
    finally:
        api.set_waker(None)
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("dlnest_jupyter: stopped (running tasks keep running)", flush=True)
    return 0
