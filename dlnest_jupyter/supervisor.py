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


def _on_cpu(task: dict) -> bool:
    return bool(task["request"].get("cpu") or not task["placement"] or os.environ.get(SIMULATED) is not None)


def _worker_command(task: dict) -> tuple[list[str], Path]:
    """The process the task runs, and the file its output goes to."""
    req, package = task["request"], SavePackage(task["package"])
    if task["kind"] == "analyze":
        connection = session_dir(task["id"]) / f"{task['id']}.json"
        ckpt = "-" if req.get("ckpt") is None else str(req["ckpt"])
        cmd = [sys.executable, "-m", "dlnest_jupyter.session_kernel", str(connection), str(package.path), ckpt]
        return cmd + (["--cpu"] if _on_cpu(task) else []), package.path / f"_session_{task['id']}.txt"
    cmd = [sys.executable, "-m", "dlnest_jupyter", "worker", "--package", str(package.path)]
    if task["kind"] == "continue":
        cmd.append("--resume")
        if req.get("ckpt") is not None:
            cmd += ["--ckpt", str(req["ckpt"])]
    return cmd + (["--cpu"] if _on_cpu(task) else []), package.output_path()


def _worker_env(task: dict) -> dict[str, str]:
    env = {**os.environ, "DLNEST_TASK_ID": task["id"], "CUDA_DEVICE_ORDER": "PCI_BUS_ID",
           "PYTHONUNBUFFERED": "1"}
    real_gpus = task["placement"] and os.environ.get(SIMULATED) is None
    env["CUDA_VISIBLE_DEVICES"] = ",".join(task["placement"]) if real_gpus else ""
    return env


def supervise(task_id: str, ledger: Ledger) -> int:
    task = ledger.get(task_id)
    if task is None or task["status"] != "starting":
        return 1
    me = psutil.Process()
    stop = threading.Event()
    wake = threading.Event()  # set by a signal or by the worker's exit: either ends the heartbeat wait at once

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
    command, output = _worker_command(task)
    with open(output, "ab") as out:
        worker = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                  env=_worker_env(task), cwd=package.path, start_new_session=True)
    wproc = psutil.Process(worker.pid)
    threading.Thread(target=lambda: (worker.wait(), wake.set()), daemon=True).start()
    with ledger.transaction() as db:
        ledger.update(db, task_id, worker_pid=worker.pid, worker_started=wproc.create_time())
    owner = task["request"].get("attached")
    cancelled = False
    endpoint = Path(command[3]) if task["kind"] == "analyze" else None
    while worker.poll() is None:
        if endpoint is not None and endpoint.exists():  # the session's kernel is listening: clients may connect
            with ledger.transaction() as db:
                ledger.update(db, task_id, endpoint=str(endpoint))
            endpoint = None
        wake.wait(HEARTBEAT_S)
        wake.clear()
        if stop.is_set():
            cancelled = True
        elif worker.poll() is None:
            with ledger.transaction() as db:
                ledger.update(db, task_id, heartbeat=time.time())
                row = ledger.get(task_id, db)
            cancelled = bool(row and row["cancel_requested"])
            if owner and not process_alive(owner["pid"], owner["started"]):
                cancelled = True  # --attached: the kernel that owned it is gone
        if cancelled:
            kill_tree(wproc)
            worker.wait()
            break
    code = worker.returncode
    if task["kind"] == "analyze":
        shutil.rmtree(session_dir(task_id), ignore_errors=True)
        return _finish_session(ledger, task_id, cancelled, code, output)
    record = package.record()
    if cancelled:
        status, error = "cancelled", "cancelled" if not owner else "cancelled (attached kernel ended or del)"
    elif code == 0:
        status, error = "done", None
    else:
        status, error = "failed", record.get("error") or f"worker exited with status {code}"
    if record.get("status") in ("running", "created"):  # the worker was killed before it could say so
        package.update_record(status=status, error=error)
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
