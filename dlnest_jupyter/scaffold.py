"""``new``: a fresh project from the clean template or the complete MNIST example."""
from __future__ import annotations

import shutil
from importlib import resources
from pathlib import Path

from .errors import DLNestError


def new_project(directory: str | Path, mnist: bool = False) -> Path:
    """Copy a template into ``directory`` (created if needed); a non-empty folder is never overwritten."""
    dest = Path(directory).expanduser().resolve()
    if dest.exists() and (not dest.is_dir() or any(dest.iterdir())):
        raise DLNestError(f"{dest} exists and is not empty; choose a new folder")
    template = resources.files("dlnest_jupyter") / "templates" / ("mnist" if mnist else "clean")
    with resources.as_file(template) as src:
        shutil.copytree(src, dest, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    return dest
