"""``%dlnest_watch``: a task's output followed live in one display of the cell that asked for it.

The follower is a thread that tails the output file (files, not pipes: the task may outlive this kernel)
and updates the display at most every ``interval`` seconds, whatever the task prints. It runs in a copy of
the cell's context, so its messages carry that cell's parent header (ipykernel 7 routes by it)."""
from __future__ import annotations

import collections
import contextvars
import threading
import time
from pathlib import Path

from . import api
from .ledger import FINAL

_current: "Watch | None" = None


def output_file(task: api.Task, rank: int = 0) -> Path:
    """The file a task's (rank's) output goes to: ``_output.txt``, ``_output<rank>.txt`` under DDP."""
    if task.id.startswith("A_"):
        return task.package / f"_session_{task.id}.txt"
    ranked = task.package / f"_output{rank}.txt"
    return ranked if ranked.exists() or rank else task.package / "_output.txt"


class Watch:
    def __init__(self, task_id: str, lines: int = 40, interval: float = 0.5, rank: int = 0):
        self.task = api.task(task_id)
        self.path = output_file(self.task, rank)
        self.lines, self.interval = lines, interval
        self._tail: collections.deque[str] = collections.deque(maxlen=lines)
        self._offset = max(0, self.path.stat().st_size - 64 * lines * 200) if self.path.exists() else 0
        self._partial = ""
        self._stop = threading.Event()
        self._handle = None
        self._thread: threading.Thread | None = None

    def _read(self) -> bool:
        """Append what the file gained since the last read to the bounded tail; True if anything did."""
        if not self.path.exists():
            return False
        with open(self.path, "rb") as fh:
            fh.seek(self._offset)
            data = fh.read()
        if not data:
            return False
        self._offset += len(data)
        text = self._partial + data.decode("utf-8", errors="replace").replace("\r\n", "\n")
        *complete, self._partial = text.split("\n")
        self._tail.extend(line.rsplit("\r", 1)[-1] for line in complete)  # a progress bar's last state
        return True

    def text(self, status: str | None = None) -> str:
        head = f"[{self.task.id} {status or self.task.status}] {self.path}"
        return "\n".join([head, *self._tail, *([self._partial] if self._partial else [])])

    def start(self) -> "Watch":
        from IPython.display import display

        self._read()
        self._handle = display({"text/plain": self.text()}, raw=True, display_id=True)
        self._thread = threading.Thread(target=contextvars.copy_context().run, args=(self._follow,),
                                         name=f"dlnest-watch-{self.task.id}", daemon=True)
        self._thread.start()
        return self

    def _follow(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                status = self.task.status
                if self._read() or status in FINAL:
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
