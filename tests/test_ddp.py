"""DDP on the CPU (gloo) and on simulated GPUs: real rank processes under a real supervisor."""
from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path

import psutil
import torch

from conftest import metrics, processes_mentioning
from dlnest_jupyter import api
from dlnest_jupyter.scaffold import new_project


def _wait_running(task, files=()) -> None:
    deadline = time.monotonic() + 180
    while task.status != "running" or not all(f() for f in files):
        assert time.monotonic() < deadline and task.status in ("queued", "starting", "running"), task
        time.sleep(0.01)


def _ranks(task) -> list[psutil.Process]:
    return [psutil.Process(pid) for pid, _ in task.row["rank_pids"]]


def test_two_cpu_ranks_converge_like_one(tmp_path: Path, env):
    project = new_project(tmp_path / "mnist", mnist=True)
    one = api.submit(project / "root_config.json", cpu=True, overrides=["epochs=4"])
    two = api.submit(project / "root_config.json", cpu=True, ddp=True, procs=2, overrides=["epochs=4"])
    assert one.wait(300) == "done" and two.wait(300) == "done", (one.error, two.error)
    acc_one = [r["acc"] for r in metrics(one.package) if "acc" in r]
    acc_two = [r["acc"] for r in metrics(two.package) if "acc" in r]
    assert acc_one[-1] >= 0.9 and acc_two[-1] >= 0.9 and abs(acc_one[-1] - acc_two[-1]) < 0.05
    steps = [r["iter"] for r in metrics(two.package) if "loss" in r]
    assert steps[-1] == 4 * 23  # each rank sees half of the 1437 training digits: 23 batches an epoch
    assert json.loads(two.record_path.read_text())["world_size"] == 2
    for rank in (0, 1):
        assert "[dlnest] done:" in (two.package / f"_output{rank}.txt").read_text()
    assert not (two.package / "_output.txt").exists()


def test_one_rank_killed_ends_the_others_and_fails_the_task(tmp_path: Path, env):
    project = new_project(tmp_path / "mnist", mnist=True)
    task = api.submit(project / "root_config.json", cpu=True, ddp=True, procs=2, overrides=["epochs=40"])
    _wait_running(task, [lambda: (task.package / "metrics.jsonl").exists()])
    ranks = _ranks(task)
    os.kill(ranks[1].pid, signal.SIGKILL)
    assert task.wait(60) == "failed"
    assert task.error.startswith("rank 1:"), task.error
    gone, alive = psutil.wait_procs(ranks, timeout=10)
    assert not alive and not processes_mentioning(str(task.package))


def test_del_during_a_checkpoint_write_ends_every_rank(tmp_path: Path, env):
    project = new_project(tmp_path / "mnist", mnist=True)
    task = api.submit(project / "root_config.json", cpu=True, ddp=True, procs=2,
                      overrides=["epochs=30", "model.hidden=2048", "dataset.num_workers=1"])
    folder = task.package / "checkpoints"
    _wait_running(task, [lambda: any(folder.glob(".epoch_*.tmp"))])
    tree = [p for r in _ranks(task) for p in [r, *r.children(recursive=True)]]
    api.cancel(task.id)
    assert task.status == "cancelled"
    gone, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive and not processes_mentioning(str(task.package))


def test_ddp_on_simulated_gpus_continues_bit_exactly(tmp_path: Path, env):
    project = new_project(tmp_path / "mnist", mnist=True)
    common = dict(ddp=True, gpus=2, memory_mb=4000, overrides=["epochs=4"])
    reference = api.submit(project / "root_config.json", **common)
    assert reference.wait(300) == "done", reference.error
    assert sorted(reference.devices) == ["SIM-0", "SIM-1"]

    victim = api.submit(project / "root_config.json", **common)
    manifest = victim.package / "checkpoints" / "manifest.json"
    _wait_running(victim, [manifest.exists])
    api.cancel(victim.id)
    again = api.continue_(victim.package, memory_mb=4000)  # keeps the package's world size
    assert again.wait(300) == "done", again.error
    assert again.row["request"]["gpus"] == 2
    a = torch.load(reference.package / "checkpoints" / "epoch_000004.ckpt", weights_only=False)
    b = torch.load(victim.package / "checkpoints" / "epoch_000004.ckpt", weights_only=False)
    for name in a["model"]["net"]:
        assert torch.equal(a["model"]["net"][name], b["model"]["net"][name]), name
    assert a["log"] == b["log"] and len(b["rng"]["per_rank"]) == 2
