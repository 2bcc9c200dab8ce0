"""Shared fixtures: real processes running ``python -m dlnest_jupyter`` on real projects in temp folders."""
from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any, Iterator

import psutil
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


@pytest.fixture
def env(tmp_path: Path, monkeypatch) -> dict[str, str]:
    """A private ledger and two simulated 16 GiB GPUs; at the end no task and no process may be left."""
    values = {"DLNEST_HOME": str(tmp_path / "home"), "DLNEST_SIMULATED_GPUS": "16384,16384",
              "DLNEST_KILL_GRACE_S": "5"}
    for k, v in values.items():
        monkeypatch.setenv(k, v)
    yield {**os.environ, **values}
    from dlnest_jupyter import api

    for t in api.tasks(active_only=True):
        api.cancel(t.id, timeout=20)
    # a supervisor records its task's end a moment before it exits: give processes time to end by themselves
    _, leftovers = psutil.wait_procs(processes_mentioning(str(tmp_path)), timeout=15)
    names = []
    for p in leftovers:
        try:
            names.append(p.cmdline())
            p.kill()
        except psutil.Error:
            pass
    assert not names, f"processes left behind: {names}"


def processes_mentioning(text: str) -> list[psutil.Process]:
    """Live processes whose command line or working folder mentions ``text`` (a test's temp folder)."""
    found = []
    for p in psutil.process_iter(["cmdline", "cwd"]):
        try:
            if p.pid != os.getpid() and (text in " ".join(p.info["cmdline"] or []) or text in (p.info["cwd"] or "")):
                found.append(p)
        except psutil.Error:
            pass
    return found


def shell(script: str, env: dict[str, str], timeout: float = 600, wait: bool = True):
    """Run ``script`` in a fresh process holding a real IPython shell with the extension loaded (``ip``)."""
    prelude = ("from IPython.core.interactiveshell import InteractiveShell\n"
               "import json, sys, time, dlnest_jupyter\n"
               "ip = InteractiveShell.instance()\n"
               "ip.run_line_magic('load_ext', 'dlnest_jupyter')\n")
    proc = subprocess.Popen([sys.executable, "-c", prelude + textwrap.dedent(script)], env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    if not wait:
        return proc
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err
    return out, err




@contextlib.contextmanager
def kernel_client(env: dict[str, str], cwd: Path) -> Iterator[Any]:
    """A real IPython kernel (the venv's python3 kernelspec) and a ready client on it; shut down after."""
    from jupyter_client import KernelManager

    km = KernelManager(kernel_name="python3")
    km.start_kernel(env=env, cwd=str(cwd))
    kc = km.client()
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=120)
        yield kc
    finally:
        kc.stop_channels()
        km.shutdown_kernel(now=True)
