"""Incremental readers of the files a task grows: its output, its metrics and its progress.

Tasks write files, never pipes (they outlive kernels), so every live view (``%dlnest_watch``, the panel)
follows them by reading only what was appended since the last look."""
from __future__ import annotations

import collections
import json
import math
from pathlib import Path
from typing import Any


def output_file(package: Path, task_id: str, rank: int = 0) -> Path:
    """The file a task's (rank's) output goes to: ``_output.txt``, ``_output<rank>.txt`` under DDP, and a
    session's own log for analyzer sessions (``A_...``)."""
    if task_id.startswith("A_"):
        return package / f"_session_{task_id}.txt"
    ranked = package / f"_output{rank}.txt"
    return ranked if ranked.exists() or rank else package / "_output.txt"


class _Appended:
    """What a file gained since the last read; starts over when the file is replaced by a shorter one."""

    def __init__(self, path: Path):
        self.path, self.offset = path, 0

    def read(self, limit: int | None = None) -> tuple[bytes, bool]:
        """The appended bytes, at most the last ``limit`` of them; and whether older ones were skipped."""
        skipped = False
        try:
            with open(self.path, "rb") as fh:
                size = fh.seek(0, 2)
                if size < self.offset:  # rewritten (a continue truncates metrics): read it again whole
                    self.offset = 0
                    self.restarted()
                if limit is not None and size - self.offset > limit:
                    self.offset, skipped = size - limit, True
                fh.seek(self.offset)
                data = fh.read(size - self.offset)
        except FileNotFoundError:
            return b"", False
        self.offset += len(data)
        return data, skipped

    def restarted(self) -> None:
        """Forget what was read from the old file."""


class OutputTail(_Appended):
    """The last ``lines`` lines of an output file. A progress bar's carriage-return redraws keep only their
    last state, and the line being written stays visible."""

    def __init__(self, path: Path, lines: int = 40):
        super().__init__(path)
        self.limit = max(65536, 200 * lines)  #: a task printing flat out costs a bounded read per look
        self.lines: collections.deque[str] = collections.deque(maxlen=lines)
        self.partial = ""

    def restarted(self) -> None:
        self.lines.clear()
        self.partial = ""

    def update(self) -> bool:
        """Read what was appended; True if anything was."""
        data, skipped = self.read(self.limit)
        if not data:
            return False
        text = data.decode("utf-8", errors="replace").replace("\r\n", "\n")
        if skipped:  # the read began mid-line: drop that fragment and the lines it replaced
            self.lines.clear()
            text = text.partition("\n")[2]
        else:
            text = self.partial + text
        *complete, self.partial = text.split("\n")
        self.lines.extend(line.rsplit("\r", 1)[-1] for line in complete)
        return True

    def text(self) -> str:
        return "\n".join([*self.lines, *([self.partial.rsplit("\r", 1)[-1]] if self.partial else [])])


class MetricsTail(_Appended):
    """The series of a package's ``metrics.jsonl``: name -> ([iter], [value])."""

    def __init__(self, path: Path):
        super().__init__(path)
        self.series: dict[str, tuple[list[int], list[float]]] = {}
        self._partial = b""

    def restarted(self) -> None:
        self.series.clear()
        self._partial = b""

    def update(self) -> bool:
        data, _ = self.read()
        if not data:
            return False
        *complete, self._partial = (self._partial + data).split(b"\n")
        for line in complete:
            try:
                row = json.loads(line)
            except ValueError:  # a line cut short by a kill
                continue
            for key, value in row.items():
                if key not in ("iter", "epoch", "time") and isinstance(value, (int, float)) \
                        and not isinstance(value, bool) and math.isfinite(value):
                    xs, ys = self.series.setdefault(key, ([], []))
                    xs.append(row.get("iter", len(xs)))
                    ys.append(float(value))
        return bool(complete)

    def latest(self) -> dict[str, float]:
        return {key: ys[-1] for key, (_, ys) in self.series.items()}


def read_progress(package: Path) -> dict[str, Any] | None:
    """Where a training stands (``_progress.json``), with ``fraction`` done and ``eta`` seconds when known."""
    try:
        p = json.loads((package / "_progress.json").read_text())
    except (OSError, ValueError):
        return None
    steps, epochs, rate = p.get("steps"), p.get("epochs"), p.get("steps_per_second")
    p["fraction"] = p["eta"] = None
    if steps and epochs:
        total = steps * epochs
        done = min(total, p["epoch"] * steps + p["step"])
        p["fraction"] = done / total
        p["eta"] = (total - done) / rate if rate else None
    elif steps:
        p["fraction"] = min(1.0, p["step"] / steps)
    return p
