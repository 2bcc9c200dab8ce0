"""kill -9 at any moment, then ``continue``: the result is bit-identical to an uninterrupted run."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from conftest import cli, metrics, packages
from dlnest_jupyter.checkpoint import Checkpoints


def _start(project: Path, *extra: str) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "dlnest_jupyter", "run", "-c", str(project / "root_config.json"),
                             "--cpu", *extra], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)


def _wait_for(proc: subprocess.Popen, ready, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert proc.poll() is None, "the run ended before the kill point"
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.001)


def _kill(proc: subprocess.Popen) -> None:
    """SIGKILL the run's whole process group (data-loader workers included)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _start_and_kill(project: Path, extra: list[str], before: list[Path], kill_point) -> Path:
    """Start a run, wait for its package, kill it once ``kill_point(pkg)`` holds; return the package."""
    proc = _start(project, *extra)
    try:
        _wait_for(proc, lambda: len(packages(project)) > len(before))
        (pkg,) = [p for p in packages(project) if p not in before]
        _wait_for(proc, lambda: kill_point(pkg))
    finally:
        _kill(proc)
    return pkg


def _lines(pkg: Path) -> int:
    path = pkg / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def _final(pkg: Path) -> dict:
    return torch.load(pkg / "checkpoints" / "epoch_000004.ckpt", weights_only=False)


def _assert_identical(a: dict, b: dict, path: str = "") -> None:
    assert type(a) is type(b), path
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for k in a:
            _assert_identical(a[k], b[k], f"{path}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _assert_identical(x, y, f"{path}[{i}]")
    else:
        assert a == b, path


@pytest.mark.parametrize("workers", [0, 2])
def test_kill_at_a_random_moment_then_continue_is_bit_identical(mnist: Path, workers: int):
    common = ["--set", "epochs=4", "--set", f"dataset.num_workers={workers}"]
    cli("run", "-c", str(mnist / "root_config.json"), "--cpu", *common)
    (reference,) = packages(mnist)

    kill_at = random.Random().randint(2, 170)  # of 184 metric lines (180 steps + 4 validations)
    victim = _start_and_kill(mnist, common, [reference], lambda pkg: _lines(pkg) >= kill_at)

    out = cli("continue", "-r", str(victim), "--cpu")
    assert ("continuing from the checkpoint" in out.stdout) or ("no checkpoint yet" in out.stdout)
    a, b = _final(reference), _final(victim)
    _assert_identical(a["model"], b["model"], f"model (killed after {kill_at} lines)")
    _assert_identical(a["life_cycle"], b["life_cycle"])
    assert a["log"] == b["log"] and (a["epoch"], a["iter"]) == (b["epoch"], b["iter"]) == (4, 180)
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]  # noqa: E731
    assert strip(metrics(reference)) == strip(metrics(victim))

    record = json.loads((victim / "record.json").read_text())
    assert record["status"] == "done"
    assert [x["status"] for x in record["attempts"]] == ["interrupted", "done"]
    output = (victim / "_output.txt").read_text()
    assert output.count("[dlnest] save package:") == 2 and "[dlnest] epoch 4" in output


def test_kill_during_a_checkpoint_write_keeps_the_previous_one(mnist: Path):
    big = ["--set", "epochs=3", "--set", "model.hidden=2048"]  # ~25 MB checkpoints: writes take a while
    mid_write = lambda pkg: (pkg / "checkpoints" / "manifest.json").exists() and any(  # noqa: E731
        (pkg / "checkpoints").glob(".epoch_*.tmp"))
    pkg = _start_and_kill(mnist, big, [], mid_write)
    folder = pkg / "checkpoints"
    assert list(folder.glob(".epoch_*.tmp")), "the kill did not land mid-write"
    ck = Checkpoints(folder, {})
    epochs = ck.epochs()
    assert epochs and ck.load()["epoch"] == epochs[-1]  # the manifest names a complete, loadable file

    out = cli("continue", "-r", str(pkg), "--cpu")
    assert f"continuing from the checkpoint of epoch {epochs[-1]}" in out.stdout
    assert ck.epochs()[-1] == 3 and not list(folder.glob(".*.tmp"))


def test_continue_from_an_older_checkpoint_never_returns_to_newer_ones(mnist: Path):
    cli("run", "-c", str(mnist / "root_config.json"), "--cpu", "--set", "epochs=3",
        "--set", "checkpoint_args.max_ckpt_in_fast_track=3")
    (pkg,) = packages(mnist)
    first = _lines(pkg)
    out = cli("continue", "-r", str(pkg), "--cpu", "--ckpt", "1")
    assert "continuing from the checkpoint of epoch 1" in out.stdout
    assert sorted(p.name for p in (pkg / "checkpoints" / "abandoned" / "attempt_2").iterdir()) == [
        "epoch_000002.ckpt", "epoch_000003.ckpt"]
    assert Checkpoints(pkg / "checkpoints", {}).epochs() == [1, 2, 3]
    assert _lines(pkg) == first  # replayed epochs replaced their metric lines, not duplicated them


def test_continue_errors_are_clear(tmp_path: Path, mnist: Path):
    proc = cli("continue", "-r", str(tmp_path), "--cpu", check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == f"dlnest_jupyter: error: not a save package (no record.json): {tmp_path}"
    cli("run", "-c", str(mnist / "root_config.json"), "--cpu", "--set", "epochs=1")
    (pkg,) = packages(mnist)
    proc = cli("continue", "-r", str(pkg), "--cpu", "--ckpt", "9", check=False)
    assert proc.returncode == 2 and "no checkpoint for epoch 9 (available: 1)" in proc.stderr
