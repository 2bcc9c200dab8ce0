"""Placement rules on a real ledger with simulated GPUs. ``launch`` records bookings instead of spawning
supervisors here; tests with real supervisors are in test_tasks.py."""
from __future__ import annotations

import os
import stat
import time
from pathlib import Path

import pytest

from dlnest_jupyter.ledger import MIGRATIONS, Ledger
from dlnest_jupyter.scheduler import Settings, dispatch_once


@pytest.fixture
def ledger(tmp_path: Path, monkeypatch) -> Ledger:
    monkeypatch.setenv("DLNEST_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DLNEST_SIMULATED_GPUS", "16384,16384")
    return Ledger()


def add(ledger: Ledger, task_id: str, memory_mb: int | None = None, cpu: bool = False, priority: int = 0,
        age: float = 0.0, config_hash: str | None = None) -> None:
    with ledger.transaction() as db:
        ledger.insert(db, {"id": task_id, "kind": "train", "status": "queued", "priority": priority,
                           "request": {"cpu": cpu, "memory_mb": memory_mb}, "config_hash": config_hash,
                           "created": time.time() - age})


def dispatch(ledger: Ledger, **settings) -> list[str]:
    return dispatch_once(ledger, launch=lambda _l, _t: None, settings=Settings(**settings))


def placed(ledger: Ledger, task_id: str) -> list[str]:
    return ledger.get(task_id)["placement"]


def test_ledger_is_private_and_in_wal_mode(ledger: Ledger):
    assert stat.S_IMODE(os.stat(ledger.path.parent).st_mode) == 0o700
    assert stat.S_IMODE(os.stat(ledger.path).st_mode) == 0o600
    assert ledger.db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert ledger.db.execute("PRAGMA user_version").fetchone()[0] == len(MIGRATIONS)
    Ledger(ledger.path)  # reopening migrates nothing and loses nothing


def test_memory_fits_and_most_free_device_is_chosen(ledger: Ledger):
    for i, mb in enumerate([10000, 10000, 6000, 6000]):
        add(ledger, f"T_{i}", mb)
    assert dispatch(ledger) == ["T_0", "T_1", "T_2", "T_3"]
    assert placed(ledger, "T_0") != placed(ledger, "T_1")
    per_device: dict[str, int] = {}
    for r in ledger.reservations():
        per_device[r["device"]] = per_device.get(r["device"], 0) + r["memory_mb"]
    assert sorted(per_device.values()) == [16000, 16000]
    add(ledger, "T_4", 1000)
    assert dispatch(ledger) == []  # 384 MiB left on each


def test_finished_task_frees_its_reservation(ledger: Ledger):
    add(ledger, "T_a", 12000)
    add(ledger, "T_b", 12000)
    add(ledger, "T_c", 12000)
    assert dispatch(ledger) == ["T_a", "T_b"]
    ledger.finish("T_a", "done", 0)
    assert dispatch(ledger) == ["T_c"] and placed(ledger, "T_c") == placed(ledger, "T_a")


def test_external_load_counts(ledger: Ledger, monkeypatch):
    monkeypatch.setenv("DLNEST_SIMULATED_GPU_USED", "15000,0")
    add(ledger, "T_a", 1000)
    add(ledger, "T_b", 14000)
    assert dispatch(ledger) == ["T_a", "T_b"]
    assert placed(ledger, "T_a") == placed(ledger, "T_b") == ["SIM-1"]


def test_priority_then_fifo(ledger: Ledger):
    add(ledger, "T_low", 16000)
    add(ledger, "T_high", 16000, priority=5)
    add(ledger, "T_mid", 16000, priority=1)
    assert dispatch(ledger) == ["T_high", "T_mid"]
    assert ledger.get("T_low")["status"] == "queued"


def test_backfill_until_the_waiting_task_starves(ledger: Ledger, monkeypatch):
    monkeypatch.setenv("DLNEST_SIMULATED_GPUS", "16384")
    add(ledger, "T_big_running", 10000)
    assert dispatch(ledger) == ["T_big_running"]
    add(ledger, "T_waits", 8000)
    add(ledger, "T_small", 2000)
    assert dispatch(ledger, starvation_s=600) == ["T_small"]  # backfill: fits, starts ahead
    add(ledger, "T_small2", 2000)
    assert dispatch(ledger, starvation_s=0) == []  # T_waits starves: nothing younger may pass it
    ledger.finish("T_big_running", "done", 0)
    assert dispatch(ledger, starvation_s=0) == ["T_waits", "T_small2"]


def test_never_fitting_task_fails_at_once(ledger: Ledger):
    add(ledger, "T_huge", 20000)
    add(ledger, "T_ok", 1000)
    assert dispatch(ledger) == ["T_ok"]
    row = ledger.get("T_huge")
    assert row["status"] == "failed" and "largest GPU has 16384 MiB" in row["error"]


def test_without_memory_a_task_takes_a_whole_device(ledger: Ledger):
    add(ledger, "T_w1")
    add(ledger, "T_w2")
    add(ledger, "T_w3")
    add(ledger, "T_small", 100)
    assert dispatch(ledger, starvation_s=600) == ["T_w1", "T_w2"]
    assert {r["memory_mb"] for r in ledger.reservations()} == {16384}
    ledger.finish("T_w1", "done", 0)
    assert dispatch(ledger) == ["T_w3"] and placed(ledger, "T_w3") == placed(ledger, "T_w1")


def test_learned_estimate_replaces_the_whole_device(ledger: Ledger):
    ledger.learn("cfg", 3000)
    for i in range(5):
        add(ledger, f"T_{i}", config_hash="cfg")
    assert dispatch(ledger) == [f"T_{i}" for i in range(5)]
    assert {r["memory_mb"] for r in ledger.reservations()} == {3000}


def test_max_tasks_per_device_and_launch_delay(ledger: Ledger):
    for i in range(6):
        add(ledger, f"T_{i}", 100)
    assert dispatch(ledger, max_tasks_per_device=2) == ["T_0", "T_1", "T_2", "T_3"]
    assert dispatch(ledger, max_tasks_per_device=9, launch_delay_s=60) == []
    assert dispatch(ledger, max_tasks_per_device=9) == ["T_4", "T_5"]


def test_cpu_tasks_use_their_own_slots(ledger: Ledger):
    add(ledger, "T_c1", cpu=True)
    add(ledger, "T_c2", cpu=True)
    add(ledger, "T_g", 1000)
    assert dispatch(ledger) == ["T_c1", "T_g"]
    assert dispatch(ledger, cpu_slots=2) == ["T_c2"]
    assert placed(ledger, "T_c1") == []


def test_no_gpu_fails_gpu_tasks_clearly(ledger: Ledger, monkeypatch):
    monkeypatch.delenv("DLNEST_SIMULATED_GPUS")
    add(ledger, "T_g", 1000)
    dispatch(ledger)
    row = ledger.get("T_g")
    if row["status"] == "failed":  # a machine with no NVIDIA driver, as in CI
        assert "no GPU available" in row["error"] and "--cpu" in row["error"]


def test_dead_supervisor_is_detected_and_unclaimed_booking_requeued(ledger: Ledger):
    add(ledger, "T_dead", 1000)
    add(ledger, "T_lost", 1000)
    dispatch(ledger)
    with ledger.transaction() as db:
        ledger.update(db, "T_dead", status="running", supervisor_pid=2**22 + 12345, supervisor_started=1.0,
                      heartbeat=time.time() - 100)
        ledger.update(db, "T_lost", started=time.time() - 100)
    dispatch(ledger, heartbeat_timeout_s=30, start_timeout_s=60)
    dead, lost = ledger.get("T_dead"), ledger.get("T_lost")
    assert dead["status"] == "failed" and "supervisor died" in dead["error"]
    assert lost["status"] in ("queued", "starting")  # requeued, and possibly booked again at once
    assert not [r for r in ledger.reservations() if r["task_id"] == "T_dead"]
