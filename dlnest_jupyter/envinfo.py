"""What a run ran on: interpreter, libraries, devices and the project's git state, written to ``env/``."""
from __future__ import annotations

import importlib.metadata
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any

from .fsutil import atomic_write_json, atomic_write_text


def _git(project_dir: Path, *args: str) -> str | None:
    try:
        out = subprocess.run(
            ["git", "-C", str(project_dir), *args], capture_output=True, text=True, timeout=20, check=True
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout


def _torch_info() -> dict[str, Any]:
    import torch

    info: dict[str, Any] = {"torch": torch.__version__, "cuda": torch.version.cuda,
                            "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    if torch.cuda.is_available():
        info["gpus"] = [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
        try:
            import pynvml

            pynvml.nvmlInit()
            info["driver"] = pynvml.nvmlSystemGetDriverVersion()
        except Exception:  # NVML is optional here: the CUDA runtime already told us the devices
            info["driver"] = None
    return info


def capture_env(env_dir: Path, project_dir: Path) -> dict[str, Any]:
    """Write env.json, pip-freeze.txt and, for a git project, git.json + git-diff.patch. Returns env.json's data."""
    env_dir.mkdir(parents=True, exist_ok=True)
    info: dict[str, Any] = {
        "python": sys.version,
        "executable": sys.executable,
        "platform": platform.platform(),
        "host": platform.node(),
        **_torch_info(),
    }
    atomic_write_json(env_dir / "env.json", info, durable=False)
    dists = sorted(
        {f"{d.metadata['Name']}=={d.version}" for d in importlib.metadata.distributions() if d.metadata["Name"]},
        key=str.lower,
    )
    atomic_write_text(env_dir / "pip-freeze.txt", "\n".join(dists) + "\n")
    commit = _git(project_dir, "rev-parse", "HEAD")
    if commit:
        status = _git(project_dir, "status", "--porcelain") or ""
        atomic_write_json(env_dir / "git.json", {"commit": commit.strip(), "dirty": bool(status.strip()),
                                                 "status": status.splitlines()}, durable=False)
        atomic_write_text(env_dir / "git-diff.patch", _git(project_dir, "diff", "HEAD") or "")
    return info
