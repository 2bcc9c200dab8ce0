"""The supervisor: one detached process per started task.

It runs the task's worker (the engine's training on the save package) in a process group of its own with
output appended to the package, heartbeats into the ledger, ends the worker's whole process tree on cancel
(SIGTERM, a grace period, SIGKILL), records the exit, and dispatches the next queued task at once.

Usage (by the scheduler only): ``python -m dlnest_jupyter.supervisor TASK_ID LEDGER_PATH``."""
from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import psutil

from .devices import SIMULATED
from .ledger import Ledger, dlnest_home
from .package import SavePackage
from .scheduler import dispatch_once, process_alive

HEARTBEAT_S = 2.0
KILL_GRACE_S = float(os.environ.get("DLNEST_KILL_GRACE_S", "10"))


def kill_tree(root: psutil.Process, grace: float = KILL_GRACE_S) -> None:
    """End ``root`` and every descendant, also those that left its process group or session."""
    try:
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return
    for p in procs:
        try:
            p.send_signal(signal.SIGTERM)
        except psutil.Error:
            pass
    _, alive = psutil.wait_procs(procs, timeout=grace)
    for p in alive:  # whatever ignored SIGTERM, plus anything spawned meanwhile
        try:
            procs_now = [p, *p.children(recursive=True)]
        except psutil.Error:
            procs_now = [p]
        for q in procs_now:
            try:
                q.kill()
            except psutil.Error:
                pass
    psutil.wait_procs(alive, timeout=5)


def session_dir(task_id: str) -> Path:
    """Private folder (0700) of an analyzer session: its connection file and ipc sockets."""
    folder = dlnest_home() / "sessions" / task_id
    folder.mkdir(mode=0o700, parents=True, exist_ok=True)
    return folder


def connection_file(task_id: str) -> Path:
    """Where an analyzer session's kernel writes its connection file (the endpoint clients read)."""
    return session_dir(task_id) / f"{task_id}.json"


def _on_cpu(task: dict) -> bool:
    return bool(task["request"].get("cpu") or not task["placement"] or os.environ.get(SIMULATED) is not None)


def _worker_command(task: dict) -> tuple[list[str], Path]:
    """The process the task runs, and the file its output goes to."""
    req, package = task["request"], SavePackage(task["package"])
    if task["kind"] == "analyze":
        connection = connection_file(task["id"])
        ckpt = "-" if req.get("ckpt") is None else str(req["ckpt"])
        cmd = [sys.executable, "-m", "dlnest_jupyter.session_kernel", str(connection), str(package.path), ckpt]
        return cmd + (["--cpu"] if _on_cpu(task) else []), package.path / f"_session_{task['id']}.txt"
    cmd = worker_command(package, resume=task["kind"] == "continue", ckpt=req.get("ckpt"), cpu=_on_cpu(task))
    return cmd, package.output_path()


def worker_command(package: SavePackage, *, resume: bool, ckpt: int | None, cpu: bool) -> list[str]:
    """The training entry point every executor runs (here under a supervisor; in a Slurm job, by submitit)."""
    cmd = [sys.executable, "-m", "dlnest_jupyter", "worker", "--package", str(package.path)]
    if resume:
        cmd.append("--resume")
        if ckpt is not None:
            cmd += ["--ckpt", str(ckpt)]
    return cmd + (["--cpu"] if cpu else [])


def world_size(task: dict) -> int:
    """Ranks a task runs: one per placed GPU under DDP, ``procs`` for CPU DDP, else one."""
    req = task["request"]
    if not req.get("ddp") or task["kind"] == "analyze":
        return 1
    return len(task["placement"]) if task["placement"] else int(req.get("procs") or 1)


def _worker_env(task: dict) -> dict[str, str]:
    env = {**os.environ, "DLNEST_TASK_ID": task["id"], "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
           "PYTHONUNBUFFERED": "1", "GLOO_SOCKET_IFNAME": "lo", "NCCL_SOCKET_IFNAME": "lo"}
    world = world_size(task)
    if world > 1 and _on_cpu(task) and "OMP_NUM_THREADS" not in os.environ:
        # CPU ranks share the cores: each with torch's default thread count oversubscribes them (2.6-4.2x slower)
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // world))
    real_gpus = task["placement"] and os.environ.get(SIMULATED) is None
    env["CUDA_VISIBLE_DEVICES"] = ",".join(task["placement"]) if real_gpus else ""
    return env


def _start_ranks(task: dict, package: SavePackage) -> tuple[list[subprocess.Popen], list[Path]]:
    """Start the task's process(es): one worker, or one per DDP rank meeting at a private FileStore."""
    command, output = _worker_command(task)
    world = world_size(task)
    commands, outputs = [command], [output]
    if world > 1:
        store = dlnest_home() / "rendezvous" / task["id"]
        store.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
        store.unlink(missing_ok=True)  # a FileStore must start empty
        commands = [command + ["--rank", str(r), "--world-size", str(world), "--rendezvous", str(store)]
                    for r in range(world)]
        outputs = [package.output_path(r, world) for r in range(world)]
    procs = []
    for cmd, out_path in zip(commands, outputs):
        with open(out_path, "ab") as out:
            procs.append(subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                          env=_worker_env(task), cwd=package.path, start_new_session=True))
    return procs, outputs


def _last_line(path: Path) -> str | None:
    lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
    return lines[-1] if lines else None


def supervise(task_id: str, ledger: Ledger) -> int:
    task = ledger.get(task_id)
    if task is None or task["status"] != "starting":
        return 1
    me = psutil.Process()
    stop = threading.Event()
    wake = threading.Event()  # set by a signal or by a rank's exit: either ends the heartbeat wait at once

    def on_signal(*_: object) -> None:
        stop.set()
        wake.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    package = SavePackage(task["package"])
    with ledger.transaction() as db:
        if ledger.get(task_id, db)["cancel_requested"]:
            ledger.update(db, task_id, status="cancelled", ended=time.time(), error="cancelled before it started")
            db.execute("DELETE FROM reservations WHERE task_id = ?", (task_id,))
            return 0
        ledger.update(db, task_id, status="running", supervisor_pid=me.pid, supervisor_started=me.create_time(),
                      heartbeat=time.time())
    ranks, outputs = _start_ranks(task, package)
    trees = [psutil.Process(p.pid) for p in ranks]
    for proc in ranks:
        threading.Thread(target=lambda p=proc: (p.wait(), wake.set()), daemon=True).start()
    with ledger.transaction() as db:
        ledger.update(db, task_id, worker_pid=ranks[0].pid, worker_started=trees[0].create_time(),
                      rank_pids=[[t.pid, t.create_time()] for t in trees])
    owner = task["request"].get("attached")
    cancelled = failed_rank = None
    endpoint = connection_file(task_id) if task["kind"] == "analyze" else None
    while any(p.poll() is None for p in ranks):
        if endpoint is not None and endpoint.exists():  # the session's kernel is listening: clients may connect
            with ledger.transaction() as db:
                ledger.update(db, task_id, endpoint=str(endpoint))
            endpoint = None
        wake.wait(HEARTBEAT_S if endpoint is None else 0.1)  # a session's clients wait for its endpoint
        wake.clear()
        failed_rank = next((r for r, p in enumerate(ranks) if p.poll() not in (None, 0)), None)
        if stop.is_set():
            cancelled = True
        elif failed_rank is None and any(p.poll() is None for p in ranks):
            with ledger.transaction() as db:
                ledger.update(db, task_id, heartbeat=time.time())
                row = ledger.get(task_id, db)
            cancelled = bool(row and row["cancel_requested"])
            if owner and not process_alive(owner["pid"], owner["started"]):
                cancelled = True  # --attached: the kernel that owned it is gone
        if cancelled or failed_rank is not None:  # one rank down means its peers would wait for it forever
            for tree, proc in zip(trees, ranks):
                if proc.poll() is None:
                    kill_tree(tree)
            for proc in ranks:
                proc.wait()
            break
    code = ranks[0].returncode if failed_rank is None else ranks[failed_rank].returncode
    if task["kind"] == "analyze":
        shutil.rmtree(session_dir(task_id), ignore_errors=True)
        return _finish_session(ledger, task_id, bool(cancelled), code, outputs[0])
    if len(ranks) > 1:
        (dlnest_home() / "rendezvous" / task_id).unlink(missing_ok=True)
    record = package.record()
    if record.get("status") == "done":  # a rank that aborts while exiting after "done" did not fail training
        status, error = "done", None
    elif cancelled:
        status, error = "cancelled", "cancelled" if not owner else "cancelled (attached kernel ended or del)"
    elif failed_rank is None and code == 0:
        status, error = "failed", record.get("error") or "the worker exited without finishing"
    else:
        bad = failed_rank or 0
        where = f"rank {bad}: " if len(ranks) > 1 else ""
        status = "failed"
        error = where + (record.get("error") or _last_line(outputs[bad]) or f"exited with status {code}")
    package.settle(status, error)
    ledger.finish(task_id, status, exit_code=code, error=error)
    peak = record.get("peak_gpu_mb")
    if status == "done" and peak and task["config_hash"]:
        ledger.learn(task["config_hash"], int(peak))
    dispatch_once(ledger)  # hand the freed device to the next queued task now, not at the next poll
    return 0


def _finish_session(ledger: Ledger, task_id: str, cancelled: bool, code: int | None, output: Path) -> int:
    """A session ends only by del (cancelled); any other exit is a failure, with its last words as the error."""
    if cancelled:
        ledger.finish(task_id, "cancelled", exit_code=code, error="session ended by del")
    else:
        lines = output.read_text(errors="replace").strip().splitlines() if output.exists() else []
        ledger.finish(task_id, "failed", exit_code=code, error=lines[-1] if lines else f"exited with status {code}")
    dispatch_once(ledger)
    return 0


def main(argv: list[str]) -> int:
    task_id, ledger_path = argv
    if os.fork() > 0:  # the scheduler waits for this first process only; the supervisor lives on, reparented
        os._exit(0)
    os.setsid()
    devnull = os.open(os.devnull, os.O_RDWR)
    for fd in (0, 1):
        os.dup2(devnull, fd)
    log = Path(ledger_path).parent / "supervisors.log"
    fd = os.open(log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 2)
    ledger = Ledger(ledger_path)
    try:
        return supervise(task_id, ledger)
    except BaseException as exc:
        ledger.finish(task_id, "failed", error=f"supervisor error: {type(exc).__name__}: {exc}")
        raise


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
