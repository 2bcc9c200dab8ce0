"""The Python face of the scheduler: submit, inspect and cancel tasks. Magics and the CLI call these.

Everything here reads and writes the ledger; a ``Task`` holds only an id, so handles stay true across
kernels and restarts."""
from __future__ import annotations

import contextlib
import hashlib
import json
import os
import signal
import time
import uuid
from pathlib import Path
from typing import Any, Iterable

from . import devices
from .config import load_config
from .errors import DLNestError
from .ledger import ACTIVE, FINAL, Ledger
from .package import SavePackage

_ledger: Ledger | None = None
_wake = None  # set by a live dispatcher in this process, so a submission starts without waiting for a poll


def ledger() -> Ledger:
    """This user's ledger, opened once per process."""
    global _ledger
    if _ledger is None or str(_ledger.path) != str(Ledger.default_path()):
        _ledger = Ledger()
    return _ledger


def set_waker(wake: Any) -> None:
    global _wake
    _wake = wake


def _kick() -> None:
    """Get new work looked at now: wake this process's dispatcher, or (a script, a terminal) dispatch once."""
    if _wake is not None:
        _wake()
    else:
        from .scheduler import dispatch_once

        dispatch_once(ledger())


def _config_hash(args: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(args, sort_keys=True, default=str).encode()).hexdigest()[:16]


def _request(cpu: bool, memory_mb: int | None, ddp: bool = False, gpus: int | None = None,
             procs: int | None = None, executor: dict[str, Any] | None = None, **extra: Any) -> dict[str, Any]:
    """Validate a placement request and refuse now what the dispatcher could never place (one clear line,
    nothing created). A Slurm task's request is Slurm's to place: ``slurm.request`` checks it."""
    if executor is not None and executor["name"] == "slurm":
        from . import slurm

        return slurm.request(cpu, memory_mb, ddp, gpus, procs, executor, **extra)
    if memory_mb is not None and memory_mb <= 0:
        raise DLNestError(f"-m must be a positive number of MiB, got {memory_mb}")
    if (gpus is not None or procs is not None) and not ddp:
        raise DLNestError("--gpus and --procs go with --ddp")
    if procs is not None and (not cpu or procs < 1):
        raise DLNestError("--procs N (N >= 1) is for CPU DDP: add --cpu")
    if gpus is not None and (cpu or gpus < 1):
        raise DLNestError("--gpus N (N >= 1) is for GPU DDP; on the CPU use --procs N")
    request = {"cpu": cpu, "memory_mb": memory_mb, "ddp": ddp, "gpus": gpus, "procs": (procs or 2) if ddp and cpu
               else None, **extra}
    if cpu:
        return request
    found = devices.gpus()
    if not found:
        raise DLNestError(devices.no_gpu_message())
    largest = max(g.total_mb for g in found)
    if gpus is not None and gpus > len(found):
        raise DLNestError(f"--gpus {gpus} can never fit: this machine has {len(found)} GPUs")
    capacity = sum(g.total_mb for g in found) if ddp and gpus is None else largest
    if memory_mb and memory_mb > capacity:
        raise DLNestError(f"-m {memory_mb} MiB can never fit: the largest GPU has {largest} MiB"
                          + (f" ({capacity} MiB on all of them)" if ddp and gpus is None else ""))
    return request


def _executor(default: Any, executor: str | dict[str, Any] | None, partition: str | None, nodes: int | None,
              time_limit: str | None) -> dict[str, Any] | None:
    """The project's ``"executor"`` block, under ``executor`` (a name, or a block from Python), under the flags;
    None for this machine's own scheduler."""
    from . import slurm

    if isinstance(executor, dict):
        default = {**(default if isinstance(default, dict) else {"name": default} if default else {}), **executor}
        executor = None
    spec = slurm.options(default, name=executor, partition=partition, nodes=nodes, time=time_limit)
    return spec if spec["name"] != "local" else None


def _owner(attached: bool) -> dict[str, Any] | None:
    if not attached:
        return None
    import psutil

    me = psutil.Process()
    return {"pid": me.pid, "started": me.create_time()}


def _enqueue(kind: str, package: SavePackage, request: dict[str, Any], *, priority: int, config_hash: str | None,
             description: str, command: list[str]) -> "Task":
    record = package.record()
    prefix = "A_" if kind == "analyze" else "T_"
    task_id = prefix + (record["id"] if kind == "train" else uuid.uuid4().hex[:6])
    with ledger().transaction() as db:
        ledger().insert(db, {
            "id": task_id, "kind": kind, "status": "queued", "priority": priority,
            "project": record.get("project_dir"), "package": str(package.path), "config_hash": config_hash,
            "request": request, "description": description, "command": command, "created": time.time(),
        })
    if kind == "train":
        package.update_record(task_id=task_id)
    _kick()
    if request.get("executor"):
        _await_submission(task_id)
    return Task(task_id)


def _await_submission(task_id: str, timeout: float = 60.0) -> None:
    """A task for another engine is submitted at once: its refusal (say, Slurm's "Invalid partition name")
    becomes this call's one-line error, while the task's record says failed with the same reason."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        row = ledger().get(task_id)
        if row["status"] == "failed":
            raise DLNestError(f"{task_id} failed: {row['error']}")
        if row["slurm_job_id"] or row["status"] in FINAL:
            return
        time.sleep(0.02)


def submit(config: str | Path, *, freq: str | Path | None = None, overrides: Iterable[str] = (),
           description: str = "", cpu: bool = False, memory_mb: int | None = None, priority: int = 0,
           attached: bool = False, ddp: bool = False, gpus: int | None = None, procs: int | None = None,
           executor: str | dict[str, Any] | None = None, partition: str | None = None, nodes: int | None = None,
           time: str | None = None, command: list[str] | None = None) -> "Task":
    """Queue a training task: its code snapshot is taken now; it starts when a device (or CPU slot) is free.

    ``ddp``: several GPUs (``gpus`` of them, each with ``memory_mb`` free; or as few as hold ``memory_mb``
    together), or ``procs`` CPU ranks with ``cpu``. ``executor="slurm"`` (or the root config's ``"executor"``
    block) submits it as a Slurm job instead (``partition``, ``nodes``, ``time`` as ``HH:MM:SS``, ``gpus``
    per node); Slurm's refusal raises at once, the task then recorded as failed."""
    cfg = load_config(config, freq, list(overrides))
    request = _request(cpu, memory_mb, ddp, gpus, procs,
                       executor=_executor(cfg.args.get("executor"), executor, partition, nodes, time),
                       attached=_owner(attached))
    package = SavePackage.create(cfg, command=command or ["submit", str(config)], description=description)
    return _enqueue("train", package, request, priority=priority, config_hash=_config_hash(cfg.args),
                    description=description, command=command or [])


def continue_(record_path: str | Path, *, cpu: bool = False, memory_mb: int | None = None, ckpt: int | None = None,
              priority: int = 0, attached: bool = False, ddp: bool = False, gpus: int | None = None,
              procs: int | None = None, executor: str | dict[str, Any] | None = None, partition: str | None = None,
              nodes: int | None = None, time: str | None = None, command: list[str] | None = None) -> "Task":
    """Queue a ``continue`` of a package (with its own code) from its newest or ``ckpt``'s checkpoint.

    A DDP package continues with its own world size unless told otherwise (an exact resume needs it). The
    executor defaults to the package's config's ``"executor"`` block, as for ``submit``."""
    package = SavePackage.open(record_path)
    busy = [t for t in ledger().tasks(ACTIVE) if t["package"] == str(package.path)]
    if busy:
        raise DLNestError(f"{busy[0]['id']} is still {busy[0]['status']} on this package; del it first")
    world = int(package.record().get("world_size") or 1)
    if world > 1 and not ddp:
        ddp, gpus, procs = True, (None if cpu else world), (world if cpu else None)
    args = json.loads(package.config_path.read_text())
    request = _request(cpu, memory_mb, ddp, gpus, procs,
                       executor=_executor(args.get("executor"), executor, partition, nodes, time),
                       ckpt=ckpt, attached=_owner(attached))
    return _enqueue("continue", package, request, priority=priority, config_hash=_config_hash(args),
                    description=package.record().get("description", ""), command=command or [])


def analyze_session(record_path: str | Path, *, ckpt: int | None = None, cpu: bool = False,
                    memory_mb: int | None = None, attached: bool = False, command: list[str] | None = None) -> "Task":
    """Queue an analyzer session (``A_...``): a resident kernel with the package loaded, placed like any task."""
    package = SavePackage.open(record_path)
    request = _request(cpu, memory_mb, ckpt=ckpt, attached=_owner(attached))
    return _enqueue("analyze", package, request, priority=0, config_hash=None,
                    description=package.record().get("description", ""), command=command or [])


def _resolve(task_id: str) -> dict[str, Any]:
    row = ledger().get(task_id)
    if row is None:
        raise DLNestError(f"unknown task id {task_id!r} (see %dlnest_tasks)")
    return row


def cancel(task_id: str, timeout: float = 30.0) -> "Task":
    """Stop a task: a queued one never starts; a running one's whole process tree ends (status cancelled)."""
    from .scheduler import process_alive
    from .supervisor import kill_tree

    row = _resolve(task_id)
    if row["status"] in FINAL:
        return Task(task_id)
    if row["status"] == "queued" and ledger().finish(task_id, "cancelled", error="cancelled while queued"):
        return Task(task_id)
    with ledger().transaction() as db:
        ledger().update(db, task_id, cancel_requested=1)
    row = ledger().get(task_id)
    from .scheduler import executor

    if executor(row) == "slurm":
        from . import slurm

        slurm.cancel(ledger(), task_id, max(timeout, 60.0))  # Slurm's KillWait (30 s by default) comes first
        return Task(task_id)
    if process_alive(row["supervisor_pid"], row["supervisor_started"]):
        os.kill(row["supervisor_pid"], signal.SIGTERM)
    task = Task(task_id)
    if task.wait(timeout, raise_on_timeout=False) not in FINAL:
        # the supervisor is gone or stuck: end the worker's tree from here and record it ourselves
        import psutil

        row = ledger().get(task_id)
        for pid, started in row["rank_pids"] or [[row["worker_pid"], row["worker_started"]]]:
            if process_alive(pid, started):
                kill_tree(psutil.Process(pid))
        if ledger().finish(task_id, "cancelled", error="cancelled (supervisor did not answer)"):
            with contextlib.suppress(DLNestError, OSError):
                SavePackage(row["package"]).settle("cancelled", "cancelled (supervisor did not answer)")
    return task


def task(task_id: str) -> "Task":
    _resolve(task_id)
    return Task(task_id)


def tasks(active_only: bool = False) -> list["Task"]:
    """This user's tasks (every kernel's), newest first."""
    return [Task(r["id"]) for r in ledger().tasks(ACTIVE if active_only else None)]


class Task:
    """A handle on one task; every property reads the ledger, so it is never stale."""

    def __init__(self, task_id: str):
        self.id = task_id

    @property
    def row(self) -> dict[str, Any]:
        from .scheduler import refresh_external

        refresh_external(ledger())  # a Slurm task's state comes from squeue (at most once a second)
        return _resolve(self.id)

    status = property(lambda self: self.row["status"])
    devices = property(lambda self: self.row["placement"] or [])
    error = property(lambda self: self.row["error"])
    slurm_job_id = property(lambda self: self.row["slurm_job_id"])

    @property
    def record_path(self) -> Path:
        return Path(self.row["package"]) / "record.json"

    @property
    def package(self) -> Path:
        return Path(self.row["package"])

    def wait(self, timeout: float | None = None, raise_on_timeout: bool = True) -> str:
        """Block until the task ends; returns its final status."""
        deadline = None if timeout is None else time.monotonic() + timeout
        while (status := self.status) not in FINAL:
            if deadline is not None and time.monotonic() > deadline:
                if raise_on_timeout:
                    raise TimeoutError(f"{self.id} still {status} after {timeout} s")
                return status
            time.sleep(0.1)
        return status

    def output(self, tail: int | None = None) -> str:
        path = SavePackage(self.package).output_path()
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-tail:]) if tail else text

    def cancel(self) -> "Task":
        return cancel(self.id)

    def __repr__(self) -> str:
        row = self.row
        where = ",".join(row["placement"] or []) or ("cpu" if row["request"].get("cpu") else "-")
        if row["slurm_job_id"]:
            where = f"slurm job {row['slurm_job_id']}" + (f" ({where})" if where != "-" else "")
        extra = f" error={row['error']!r}" if row["status"] == "failed" and row["error"] else ""
        return f"<Task {self.id} {row['kind']} {row['status']} on {where} package={row['package']}{extra}>"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Task) and other.id == self.id

    def __hash__(self) -> int:
        return hash(self.id)
