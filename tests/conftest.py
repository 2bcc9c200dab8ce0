"""Shared fixtures: real processes running ``python -m dlnest_jupyter`` on real projects in temp folders."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from dlnest_jupyter.scaffold import new_project

#: Few epochs keep the suite quick; the example's own default (8) is exercised by the end-to-end test.
FAST = ["--set", "epochs=3"]


def cli(*args: str, cwd: Path | None = None, check: bool = True, timeout: float = 300,
        env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter, as a user would."""
    proc = subprocess.run([sys.executable, "-m", "dlnest_jupyter", *args], cwd=cwd, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    if check and proc.returncode != 0:
        raise AssertionError(f"exit {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def packages(project: Path) -> list[Path]:
    saves = project / "Saves"
    return sorted(p for p in saves.iterdir() if p.is_dir() and not p.name.startswith(".")) if saves.exists() else []


def only_package(project: Path) -> Path:
    pkgs = packages(project)
    assert len(pkgs) == 1, pkgs
    return pkgs[0]


def metrics(pkg: Path) -> list[dict]:
    return [json.loads(line) for line in (pkg / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def mnist(tmp_path: Path) -> Path:
    return new_project(tmp_path / "mnist", mnist=True)


def edit_json(path: Path, **changes) -> None:
    data = json.loads(path.read_text())
    data.update(changes)
    path.write_text(json.dumps(data))
