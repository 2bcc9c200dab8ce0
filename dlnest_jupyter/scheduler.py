"""Placement: which queued task starts now, on which devices. Any number of processes may dispatch at once.

``dispatch_once`` reads the queue, the devices and the reservations and books what fits inside one ledger
transaction that holds the write lock, so two dispatchers never book the same memory. Supervisors are spawned
after the commit, keeping the lock short.

Rules, in order:
- Queue order is priority (higher first), then FIFO.
- A GPU task with ``-m MB`` needs MB free on one device (a DDP task with ``--gpus N``: on each of N devices;
  without ``--gpus``: an equal share on each of the fewest devices that hold MB together): total minus the driver's used memory minus, for each
  task placed there, what its reservation exceeds its measured use (a reservation counts until the task's
  real usage shows up; then the larger of the two counts). Without ``-m`` it takes the learned estimate of the
  same config, or else a whole device nobody else uses. Among fitting devices it takes the one with most free.
- ``max_tasks_per_device`` and ``launch_delay_s`` (between two launches on one device) bound each device.
- Backfill: a task that fits may start ahead of an older one that does not, unless that older one has waited
  longer than ``starvation_s``; from then on no younger GPU task starts until it has (so it cannot starve).
- A task needing more memory than the largest device has fails at once.
- CPU tasks (``--cpu``) use ``cpu_slots`` slots and never wait for, or block, GPU tasks; CPU analyzer
  sessions (idle most of the time) take no slot.
- A supervisor that stopped heartbeating and whose process (pid + create time) is gone marks its task failed;
  a task booked but never picked up by its supervisor goes back to the queue.

Executors: a task's request names who runs it. ``local`` (the default): the rules above, a supervisor on this
machine. ``slurm``: Slurm places it, so it is booked at once, with no device and no CPU slot here, and handed
to ``slurm.submit`` (sbatch through submitit); every tick ``slurm.refresh`` brings such tasks' status from
squeue and their packages (see ``dlnest_jupyter/slurm.py``).
"""
from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, fields
from typing import Any, Callable

from . import devices as devmod
from .errors import DLNestError
from .ledger import Ledger

DAEMONIZED_TIMEOUT_S = 30


@dataclass
class Settings:
    """Scheduling knobs, read from ``DLNEST_<NAME>`` environment variables (e.g. ``DLNEST_CPU_SLOTS=2``)."""

    max_tasks_per_device: int = 4
    launch_delay_s: float = 0.0
    cpu_slots: int = 1
    starvation_s: float = 600.0
    heartbeat_timeout_s: float = 30.0
    start_timeout_s: float = 60.0

    @classmethod
    def from_env(cls) -> "Settings":
        values = {}
        for f in fields(cls):
            raw = os.environ.get(f"DLNEST_{f.name.upper()}")
            if raw is not None:
                values[f.name] = type(f.default)(raw)
        return cls(**values)


def process_alive(pid: int | None, started: float | None) -> bool:
    """Is this exact process still there? (pid + create time, so a reused pid is not mistaken for it)."""
    if not pid:
        return False
    import psutil

    try:
        proc = psutil.Process(pid)
        return proc.status() != psutil.STATUS_ZOMBIE and (started is None or abs(proc.create_time() - started) < 1)
    except psutil.Error:
        return False


def _free_memory(gpus: list[devmod.GPU], reservations: list[dict], tasks: dict[str, dict]) -> dict[str, int]:
    free = {g.uuid: g.total_mb - g.used_mb for g in gpus}
    by_uuid = {g.uuid: g for g in gpus}
    for r in reservations:
        gpu = by_uuid.get(r["device"])
        if gpu is None:
            continue
        task = tasks.get(r["task_id"], {})
        measured = sum(mb for pid, mb in gpu.process_mb.items() if pid in (task.get("worker_pid"), task.get("supervisor_pid")))
        free[gpu.uuid] -= max(0, r["memory_mb"] - measured)
    return free


def executor(task: dict) -> str:
    """Who runs the task: ``local`` (a supervisor here) or ``slurm``."""
    return ((task.get("request") or {}).get("executor") or {}).get("name") or "local"


def start_external(ledger: Ledger, task: dict) -> None:
    """Hand a booked non-local task to its engine (a refusal raises; the caller fails the task with it)."""
    from . import slurm

    slurm.submit(ledger, task)


def refresh_external(ledger: Ledger) -> None:
    """Bring tasks run by another engine (Slurm) up to date; free when there are none."""
    row = ledger.db.execute("SELECT 1 FROM tasks WHERE slurm_job_id IS NOT NULL AND status IN "
                            "('starting', 'running') LIMIT 1").fetchone()
    if row is not None:
        from . import slurm

        slurm.refresh(ledger)


def reconcile(ledger: Ledger, settings: Settings, db: Any) -> None:
    """Fail tasks whose supervisor died silently; requeue tasks booked but never started (local tasks only:
    ``refresh_external`` follows the others)."""
    now = time.time()
    for t in ledger.tasks(("starting", "running"), db=db):
        if executor(t) != "local":
            lost = t["status"] == "starting" and not t["slurm_job_id"]
            if lost and now - (t["started"] or now) > settings.start_timeout_s:
                # booked, but whoever was submitting it ended before sbatch answered: requeueing could submit twice
                ledger.update(db, t["id"], status="failed", ended=now, error="its submission to Slurm never "
                              "completed (the submitting process ended first)")
            continue
        if t["status"] == "running" and now - (t["heartbeat"] or 0) > settings.heartbeat_timeout_s:
            if not process_alive(t["supervisor_pid"], t["supervisor_started"]):
                ledger.update(db, t["id"], status="failed", ended=now, error="the task's supervisor died")
                db.execute("DELETE FROM reservations WHERE task_id = ?", (t["id"],))
        elif t["status"] == "starting" and now - (t["started"] or now) > settings.start_timeout_s:
            ledger.update(db, t["id"], status="queued", placement=None, started=None)
            db.execute("DELETE FROM reservations WHERE task_id = ?", (t["id"],))


def reconcile_at_startup(ledger: Ledger) -> list[str]:
    """Fail now every running task whose supervisor process is gone (a reboot, a kill -9); returns their ids.

    ``dispatch_once`` does this too, but only after ``heartbeat_timeout_s`` of silence; a dispatcher that
    just started has no reason to wait: the process check (pid + create time) alone is conclusive. A task
    still "starting" is left to ``dispatch_once`` (its supervisor may be about to write its pid)."""
    settings = dataclasses.replace(Settings.from_env(), heartbeat_timeout_s=0.0)
    running = [t["id"] for t in ledger.tasks(("running",))]
    with ledger.transaction() as db:
        reconcile(ledger, settings, db)
    return [i for i in running if (row := ledger.get(i)) is not None and row["status"] == "failed"]


def dispatch_once(ledger: Ledger, launch: Callable[[Ledger, dict], None] | None = None,
                  settings: Settings | None = None) -> list[str]:
    """Start every queued task that fits now; returns their ids."""
    settings = settings or Settings.from_env()
    local_launch = launch or spawn_supervisor
    refresh_external(ledger)
    now = time.time()
    booked: list[dict] = []
    with ledger.transaction() as db:
        reconcile(ledger, settings, db)
        queued = ledger.tasks(("queued",), db=db, order="priority DESC, seq ASC")
        if not queued:
            return []
        active = {t["id"]: t for t in ledger.tasks(("starting", "running"), db=db) if executor(t) == "local"}
        gpus = devmod.gpus() if any(not t["request"].get("cpu") and executor(t) == "local" for t in queued) else []
        free = _free_memory(gpus, ledger.reservations(db), active)
        count = {g.uuid: 0 for g in gpus}
        for t in active.values():
            for uuid in t["placement"] or []:
                if uuid in count:
                    count[uuid] += 1
        last = {r["device"]: r["at"] for r in db.execute("SELECT * FROM launches")}
        # analyzer sessions idle most of the time: they do not hold one of the CPU training slots
        cpu_busy = sum(1 for t in active.values() if t["request"].get("cpu") and t["kind"] != "analyze")
        largest = max((g.total_mb for g in gpus), default=0)
        starving = False
        for task in queued:
            req = task["request"]
            if executor(task) != "local":  # its engine places it
                booked.append(_book(ledger, db, task, {}, now))
                continue
            if req.get("cpu"):
                if task["kind"] == "analyze":
                    booked.append(_book(ledger, db, task, {}, now))
                elif cpu_busy < settings.cpu_slots:
                    cpu_busy += 1
                    booked.append(_book(ledger, db, task, {}, now))
                continue
            need = req.get("memory_mb") or ledger.estimate(task["config_hash"], db)
            if not gpus:
                _fail(ledger, db, task, devmod.no_gpu_message(), now)
                continue
            auto = bool(req.get("ddp")) and not req.get("gpus") and bool(need)
            capacity = sum(g.total_mb for g in gpus) if auto else largest
            if (need and need > capacity) or (req.get("gpus") or 1) > len(gpus):
                _fail(ledger, db, task, f"needs {need} MiB on {req.get('gpus') or 1} GPU(s) but the largest GPU "
                      f"has {largest} MiB (and there are {len(gpus)})", now)
                continue
            if starving:
                continue
            eligible = [g for g in gpus if count[g.uuid] < settings.max_tasks_per_device
                        and now - last.get(g.uuid, 0) >= settings.launch_delay_s]
            choice = _choose(eligible, free, count, need, req.get("gpus") or 1, auto)
            if choice is None:
                starving = now - task["created"] > settings.starvation_s
                continue
            for uuid, amount in choice.items():
                free[uuid] -= amount
                count[uuid] += 1
                last[uuid] = now
                db.execute("INSERT INTO launches VALUES (?, ?) ON CONFLICT (device) DO UPDATE SET at = excluded.at",
                           (uuid, now))
            booked.append(_book(ledger, db, task, choice, now))
    for task in booked:
        try:
            (local_launch if executor(task) == "local" else start_external)(ledger, task)
        except DLNestError as exc:  # the executor's own clear reason (e.g. Slurm refused the job)
            ledger.finish(task["id"], "failed", error=str(exc))
        except Exception as exc:  # the task must not stay "starting" with nobody running it
            ledger.finish(task["id"], "failed", error=f"could not start its supervisor: {exc}")
    return [t["id"] for t in booked]


def _choose(eligible: list[devmod.GPU], free: dict[str, int], count: dict[str, int], need: int | None, n: int,
            auto: bool) -> dict[str, int] | None:
    """Devices (uuid -> MiB to reserve) for one task, most free first; None if it does not fit now.

    ``n`` devices each with ``need`` free (or each wholly unused when ``need`` is unknown); with ``auto`` (DDP
    without ``--gpus``) the fewest devices that can each hold an equal share of ``need``."""
    order = sorted(eligible, key=lambda g: free[g.uuid], reverse=True)
    if auto:
        for k in range(1, len(order) + 1):
            share = -(-need // k)
            if all(free[g.uuid] >= share for g in order[:k]):
                return {g.uuid: share for g in order[:k]}
        return None
    fitting = [g for g in order if (free[g.uuid] >= need if need else count[g.uuid] == 0 and free[g.uuid] > 0.9 * g.total_mb)]
    if len(fitting) < n:
        return None
    return {g.uuid: need or free[g.uuid] for g in fitting[:n]}


def _book(ledger: Ledger, db: Any, task: dict, memory: dict[str, int], now: float) -> dict:
    for uuid, mb in memory.items():
        db.execute("INSERT INTO reservations VALUES (?, ?, ?, ?)", (task["id"], uuid, mb, now))
    ledger.update(db, task["id"], status="starting", placement=list(memory), started=now)
    return {**task, "placement": list(memory)}


def _fail(ledger: Ledger, db: Any, task: dict, error: str, now: float) -> None:
    ledger.update(db, task["id"], status="failed", error=error, ended=now)


def spawn_supervisor(ledger: Ledger, task: dict) -> None:
    """Start the task's supervisor detached (own session, no stdin), never as a fork of this process:
    Jupyter signals the kernel's process group and reaps its children."""
    proc = subprocess.Popen([sys.executable, "-m", "dlnest_jupyter.supervisor", task["id"], str(ledger.path)],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True, close_fds=True)
    proc.wait(DAEMONIZED_TIMEOUT_S)  # the supervisor forks and its first process exits: nothing to reap later


class Dispatcher:
    """A kernel's (or server's) dispatch loop on a daemon thread: woken by ``wake()`` or every ``poll_s``."""

    def __init__(self, ledger: Ledger, poll_s: float = 1.0):
        self.ledger, self.poll_s = ledger, poll_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self.last_error: str | None = None
        self._thread = threading.Thread(target=self._loop, name="dlnest-dispatcher", daemon=True)
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(5)

    def _loop(self) -> None:
        try:  # a kernel just loaded: fail the tasks whose supervisor is gone now, not after the heartbeat timeout
            reconcile_at_startup(self.ledger)
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
        while not self._stop.is_set():
            try:
                dispatch_once(self.ledger)
                self.last_error = None
            except Exception as exc:  # a bad moment (disk full, locked too long) must not end the loop
                self.last_error = f"{type(exc).__name__}: {exc}"
            self._wake.wait(self.poll_s)
            self._wake.clear()
