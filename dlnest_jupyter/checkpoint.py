"""Checkpoint files, their manifest and retention.

A checkpoint is written to a temp file, fsynced and renamed; only then does the manifest (itself replaced
atomically) name it. A crash at any moment therefore leaves the manifest pointing at a complete file.

Retention follows the seed's three tracks; a checkpoint stays while any track holds it:
- fast: the newest ``max_ckpt_in_fast_track`` checkpoints;
- slow: checkpoints of epochs divisible by ``dilation_in_slow_track``, the newest ``max_ckpt_in_slow_track``;
- kept: checkpoints ``LifeCycle.hold_checkpoint`` asked for, the newest ``max_ckpt_in_consistent_track``.
"""
from __future__ import annotations

import copy
import json
import shutil
import threading
import time
from pathlib import Path
from typing import Any

from .errors import DLNestError
from .fsutil import atomic_write, atomic_write_json

MANIFEST = "manifest.json"
TRACK_LIMITS = {"fast": "max_ckpt_in_fast_track", "slow": "max_ckpt_in_slow_track",
                "kept": "max_ckpt_in_consistent_track"}


def file_name(epoch: int) -> str:
    return f"epoch_{epoch:06d}.ckpt"


def to_host(state: Any) -> Any:
    """A deep copy whose tensors live in host memory: what a background save may write while training goes on.

    ``deepcopy`` keeps container types (OrderedDict, a state dict's ``_metadata``); the memo hands it a host
    copy of each tensor. Tensors sharing a storage (tied weights) keep sharing one copy, as in ``torch.save``."""
    import torch

    memo: dict[int, Any] = {}
    storages: dict[tuple[int, str], Any] = {}

    def host(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        key = (storage.data_ptr(), str(t.device))
        if key not in storages:
            storages[key] = storage.clone() if t.device.type == "cpu" else storage.cpu()
        return torch.empty(0, dtype=t.dtype).set_(storages[key], t.storage_offset(), t.size(), t.stride())

    def collect(obj: Any) -> None:
        if isinstance(obj, torch.Tensor):
            if id(obj) not in memo:
                memo[id(obj)] = host(obj.detach())
        elif isinstance(obj, dict):
            for value in obj.values():
                collect(value)
        elif isinstance(obj, (list, tuple)):
            for value in obj:
                collect(value)

    collect(state)
    return copy.deepcopy(state, memo)


class Checkpoints:
    """The ``checkpoints/`` folder of one package."""

    def __init__(self, folder: Path, policy: dict[str, int]):
        self.folder = folder
        self.policy = policy
        self._writer: threading.Thread | None = None
        self._error: BaseException | None = None

    def save_in_background(self, state: dict[str, Any], epoch: int, iter: int, hold: bool = False) -> None:
        """Copy ``state`` to host memory, then write it on a thread while training continues.

        Training stalls only for the copy (and for a previous save still in flight)."""
        self.wait()
        host = to_host(state)

        def write() -> None:
            try:
                self.save(host, epoch, iter, hold)
            except BaseException as exc:  # surfaced by the next wait(), in the training thread
                self._error = exc

        self._writer = threading.Thread(target=write, name=f"dlnest-checkpoint-{epoch}", daemon=True)
        self._writer.start()

    def wait(self, raise_errors: bool = True) -> None:
        """Block until the background save (if any) is on disk; re-raise its failure."""
        if self._writer is not None:
            self._writer.join()
            self._writer = None
        if self._error is not None and raise_errors:
            error, self._error = self._error, None
            raise error

    def clean_partial(self) -> None:
        """Remove temp files a killed writer left behind (only one attempt writes a package at a time)."""
        if self.folder.is_dir():
            for path in self.folder.glob(".*.tmp"):
                path.unlink(missing_ok=True)

    def entries(self) -> list[dict[str, Any]]:
        path = self.folder / MANIFEST
        if not path.exists():
            return []
        try:
            return json.loads(path.read_text())["checkpoints"]
        except (OSError, ValueError, KeyError) as exc:
            raise DLNestError(f"{path}: unreadable checkpoint manifest ({exc})") from None

    def epochs(self) -> list[int]:
        return [e["epoch"] for e in self.entries()]

    def _write_manifest(self, entries: list[dict[str, Any]]) -> None:
        latest = entries[-1]["epoch"] if entries else None
        atomic_write_json(self.folder / MANIFEST, {"latest": latest, "checkpoints": entries})

    def _tracks(self, epoch: int, hold: bool) -> list[str]:
        p = self.policy
        tracks = ["fast"] if p["max_ckpt_in_fast_track"] > 0 else []
        if p["max_ckpt_in_slow_track"] > 0 and p["dilation_in_slow_track"] > 0 and epoch % p["dilation_in_slow_track"] == 0:
            tracks.append("slow")
        if hold and p["max_ckpt_in_consistent_track"] > 0:
            tracks.append("kept")
        return tracks

    def _retain(self, entries: list[dict[str, Any]]) -> list[dict[str, Any]]:
        for track, key in TRACK_LIMITS.items():
            holders = [e for e in entries if track in e["tracks"]]
            for e in holders[: max(0, len(holders) - self.policy[key])]:
                e["tracks"].remove(track)
        return [e for e in entries if e["tracks"]]

    def save(self, state: dict[str, Any], epoch: int, iter: int, hold: bool = False) -> None:
        """Write ``state`` as the checkpoint of ``epoch``, update the manifest, then apply retention."""
        import torch

        self.folder.mkdir(parents=True, exist_ok=True)
        name = file_name(epoch)
        atomic_write(self.folder / name, lambda fh: torch.save(state, fh))
        old = [e for e in self.entries() if e["epoch"] < epoch]
        for e in old:  # "latest" only protects the newest checkpoint; a newer one takes it over
            e["tracks"] = [t for t in e["tracks"] if t != "latest"]
        entry = {"epoch": epoch, "iter": iter, "file": name, "time": time.time(), "tracks": self._tracks(epoch, hold)}
        entries = self._retain(old + [entry])
        if entry not in entries:  # no track wants it, yet a resumable run needs its newest state
            entries.append({**entry, "tracks": ["latest"]})
        self._write_manifest(entries)
        self._remove_unlisted(entries)

    def _remove_unlisted(self, entries: list[dict[str, Any]]) -> None:
        keep = {e["file"] for e in entries} | {MANIFEST}
        for path in self.folder.iterdir():
            if path.is_file() and path.name not in keep and path.name.endswith(".ckpt"):
                path.unlink(missing_ok=True)

    def _entry(self, epoch: int | None) -> dict[str, Any]:
        entries = self.entries()
        if not entries:
            raise DLNestError(f"{self.folder.parent}: no complete checkpoint to load")
        if epoch is None:
            return entries[-1]
        for e in entries:
            if e["epoch"] == epoch:
                return e
        raise DLNestError(f"{self.folder.parent}: no checkpoint for epoch {epoch} "
                          f"(available: {', '.join(map(str, self.epochs()))})")

    def load(self, epoch: int | None = None, map_location: Any = "cpu") -> dict[str, Any]:
        """Load the newest (or the given epoch's) checkpoint.

        ``weights_only=False`` is deliberate: a package's checkpoints are as trusted as its code, which
        loading it executes anyway, and user state (life cycle, log) may hold any picklable value."""
        import torch

        entry = self._entry(epoch)
        path = self.folder / entry["file"]
        try:
            return torch.load(path, map_location=map_location, weights_only=False)
        except FileNotFoundError:
            raise DLNestError(f"{path}: checkpoint file is missing") from None
        except Exception as exc:  # torch raises many types for a damaged file
            raise DLNestError(f"{path}: checkpoint is unreadable ({type(exc).__name__}: {exc})") from None

    def rewind(self, epoch: int, attempt: int) -> None:
        """Continue from ``epoch``: move newer checkpoints aside so they are never taken for the latest."""
        self._entry(epoch)
        entries = self.entries()
        newer = [e for e in entries if e["epoch"] > epoch]
        if not newer:
            return
        aside = self.folder / "abandoned" / f"attempt_{attempt}"
        aside.mkdir(parents=True, exist_ok=True)
        self._write_manifest([e for e in entries if e["epoch"] <= epoch])
        for e in newer:
            src = self.folder / e["file"]
            if src.exists():
                shutil.move(str(src), aside / e["file"])
