"""The save package: one folder per run holding everything needed to resume or analyse it."""
from __future__ import annotations

import datetime as _dt
import json
import platform
import uuid
from pathlib import Path
from typing import Any

from .config import ProjectConfig
from .errors import DLNestError
from .fsutil import atomic_write_json
from .snapshot import snapshot

RECORD = "record.json"


def now_iso() -> str:
    return _dt.datetime.now().astimezone().isoformat(timespec="seconds")


class SavePackage:
    """Paths and record of one save package (``Saves/<YYYY-MM-DD_HH-MM-SS>_<id>/``)."""

    def __init__(self, path: str | Path):
        self.path = Path(path).expanduser().resolve()

    record_path = property(lambda self: self.path / RECORD)
    config_path = property(lambda self: self.path / "config.json")
    code_dir = property(lambda self: self.path / "code")
    env_dir = property(lambda self: self.path / "env")
    checkpoints_dir = property(lambda self: self.path / "checkpoints")
    metrics_path = property(lambda self: self.path / "metrics.jsonl")
    progress_path = property(lambda self: self.path / "_progress.json")  #: where training is, for the panel

    def output_path(self, rank: int = 0, world_size: int = 1) -> Path:
        return self.path / ("_output.txt" if world_size == 1 else f"_output{rank}.txt")

    def __repr__(self) -> str:
        return f"SavePackage({str(self.path)!r})"

    @classmethod
    def create(cls, cfg: ProjectConfig, *, command: list[str], description: str = "",
               kind: str = "train") -> "SavePackage":
        """Make the folder, snapshot the code and write config + record (status ``created``)."""
        short = uuid.uuid4().hex[:6]
        stamp = _dt.datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
        cfg.save_root.mkdir(parents=True, exist_ok=True)
        pkg = cls(cfg.save_root / f"{stamp}_{short}")
        pkg.path.mkdir()
        pkg.checkpoints_dir.mkdir()
        excluded = [Path(cfg.args["data_root"])] if isinstance(cfg.args.get("data_root"), str) else []  # absolute
        tree = snapshot(cfg.project_dir, cfg.save_root, cfg.listed_files(), excluded, pkg.code_dir)
        atomic_write_json(pkg.config_path, cfg.args)
        pkg.write_record({
            "id": short,
            "kind": kind,
            "status": "created",
            "created": now_iso(),
            "description": description,
            "command": command,
            "project_dir": str(cfg.project_dir),
            "root_config": cfg.root_path.relative_to(cfg.project_dir).as_posix(),
            "code_tree": tree,
            "host": platform.node(),
            "parent": None,
            "attempts": [],
        })
        return pkg

    @classmethod
    def open(cls, path: str | Path) -> "SavePackage":
        """An existing package; a folder without a readable record.json is a clear error."""
        pkg = cls(path)
        if pkg.path.name == RECORD:
            pkg = cls(pkg.path.parent)
        if not pkg.record_path.is_file():
            raise DLNestError(f"not a save package (no {RECORD}): {pkg.path}")
        pkg.record()  # validates
        if not pkg.code_dir.is_dir():
            raise DLNestError(f"{pkg.path}: its code snapshot is missing (code/ must point into the save root's "
                              f".dlnest_store; copy packages with their save root, or with `cp -rL`)")
        return pkg

    def record(self) -> dict[str, Any]:
        try:
            return json.loads(self.record_path.read_text())
        except (OSError, ValueError) as exc:
            raise DLNestError(f"{self.record_path}: unreadable record ({exc})") from None

    def write_record(self, record: dict[str, Any]) -> None:
        """Replaced atomically (never half-written); not fsynced: checkpoints carry the durable state."""
        atomic_write_json(self.record_path, record, durable=False)

    def update_record(self, **changes: Any) -> dict[str, Any]:
        record = {**self.record(), **changes}
        self.write_record(record)
        return record

    def settle(self, status: str, error: str | None) -> None:
        """Make the record say the scheduler's final verdict: the worker may have been killed before it could
        write its own, or have taken a del's stop for a failure."""
        if self.record().get("status") != status:
            self.update_record(status=status, error=error)

    def config(self) -> ProjectConfig:
        """The merged config the run used, rooted in the code snapshot (so file paths point into it)."""
        try:
            args = json.loads(self.config_path.read_text())
        except (OSError, ValueError) as exc:
            raise DLNestError(f"{self.config_path}: unreadable config ({exc})") from None
        return ProjectConfig(args=args, root_path=self.code_dir / self.record()["root_config"])

