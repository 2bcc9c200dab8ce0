"""``%dlnest_watch``: a task's output followed live in one display of the cell that asked for it.

The follower is a thread that tails the output file (files, not pipes: the task may outlive this kernel)
and updates the display at most every ``interval`` seconds, whatever the task prints. It runs in a copy of
the cell's context, so its messages carry that cell's parent header (ipykernel 7 routes by it)."""
from __future__ import annotations

import contextvars
import threading
import time

from . import api
from .ledger import FINAL
from .tails import OutputTail, output_file

_current: "Watch | None" = None


class Watch:
    def __init__(self, task_id: str, lines: int = 40, interval: float = 0.5, rank: int = 0):
        self.task = api.task(task_id)
        self.path = output_file(self.task.package, self.task.id, rank)
        self.interval = interval
        self._tail = OutputTail(self.path, lines)
        self._stop = threading.Event()
        self._handle = None
        self._thread: threading.Thread | None = None

    def text(self, status: str | None = None) -> str:
        return f"[{self.task.id} {status or self.task.status}] {self.path}\n{self._tail.text()}".rstrip("\n")

    def start(self) -> "Watch":
        from IPython.display import display

        self._tail.update()
        self._handle = display({"text/plain": self.text()}, raw=True, display_id=True)
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._follow,),
                                         name=f"dlnest-watch-{self.task.id}", daemon=True)
        self._thread.start()
        return self

    def _follow(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                status = self.task.status
                if self._tail.update() or status in FINAL:
                    self._handle.update({"text/plain": self.text(status)}, raw=True)
                if status in FINAL:
                    return
            except Exception as exc:  # a vanished file or a busy ledger must not kill the kernel's thread
                self._handle.update({"text/plain": self.text() + f"\n[watch error: {exc}]"}, raw=True)
                time.sleep(self.interval)

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(5)


def watch(task_id: str, lines: int = 40, rank: int = 0) -> Watch:
    """Follow a task's (or session's, or a DDP rank's) output here; replaces this kernel's previous watch."""
    global _current
    withdraw()
    _current = Watch(task_id, lines, rank=rank).start()
    return _current


def withdraw() -> None:
    """Stop following (the task keeps running)."""
    global _current
    if _current is not None:
        _current.stop()
        _current = None
