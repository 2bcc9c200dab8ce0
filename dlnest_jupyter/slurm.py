"""The Slurm executor: a task becomes a Slurm batch job (through submitit) that runs the same worker entry point
(``python -m dlnest_jupyter worker``) on the same save package, which must lie on a filesystem the cluster's
nodes share.

Division of labour: Slurm places, starts, signals and requeues the job; the job writes only to the save package
(output, metrics, checkpoints, record); the ledger (local to the submitting machine) learns the job's state from
``squeue`` (accounting may be off, so never ``sacct``) and the package's record, in ``refresh``, which every
dispatcher tick runs. Cancel is ``scancel``. A requeued job (preemption, ``scontrol requeue``, or submitit's
checkpoint hook on Slurm's pre-emption signal) continues from the package's newest checkpoint: bit-exact, as
``continue`` is. submitit and Slurm's commands are only touched when a Slurm task exists."""
from __future__ import annotations

import contextlib
import io
import math
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from pathlib import Path
from typing import Any

from .errors import DLNestError
from .ledger import ACTIVE, FINAL, Ledger
from .package import SavePackage

#: keys of an ``"executor"`` block in root_config (or of ``executor=`` in Python); the flags override them
OPTIONS = ("name", "partition", "gpus", "nodes", "time", "cpus_per_task", "mem_gb", "signal_delay_s",
           "requeue_on_timeout", "additional")
PENDING = ("PENDING", "CONFIGURING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED", "RESV_DEL_HOLD", "SUSPENDED")
RUNNING = ("RUNNING", "COMPLETING", "STAGE_OUT", "SIGNALING", "RESIZING")
TIME_RE = re.compile(r"^(?:(\d+)-)?(?:(\d+):)?(\d+):(\d+)$|^(\d+)$")
SQUEUE_TIMEOUT_S = 30
REFRESH_MIN_S = 1.0
_last_refresh = 0.0


def _minutes(text: str) -> int:
    """Slurm's ``[D-]HH:MM:SS`` (or ``MM:SS``, or minutes) as whole minutes, rounded up (Slurm's own unit)."""
    m = TIME_RE.match(text.strip())
    if not m:
        raise DLNestError(f"--time {text!r}: use HH:MM:SS (or D-HH:MM:SS, MM:SS, or minutes)")
    if m.group(5):
        return max(1, int(m.group(5)))
    days, hours, mins, secs = (int(g or 0) for g in m.group(1, 2, 3, 4))
    if m.group(2) is None:  # MM:SS
        hours, mins, secs = 0, int(m.group(3)), int(m.group(4))
    return max(1, math.ceil((days * 86400 + hours * 3600 + mins * 60 + secs) / 60))


def _positive(name: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise DLNestError(f"executor {name} must be a positive integer, got {value!r}")
    return value


def options(default: Any, **flags: Any) -> dict[str, Any]:
    """The executor of a submission: the project's ``"executor"`` block (a name or a dict), with the command
    line's flags (``name``, ``partition``, ``nodes``, ``time``) over it. ``{"name": "local"}`` when neither
    names one. Unknown keys and bad values are one clear error."""
    if default is None:
        spec: dict[str, Any] = {}
    elif isinstance(default, str):
        spec = {"name": default}
    elif isinstance(default, dict):
        spec = dict(default)
    else:
        raise DLNestError(f'root_config "executor" must be "local", "slurm" or an object, got {default!r}')
    unknown = sorted(set(spec) - set(OPTIONS))
    if unknown:
        raise DLNestError(f'root_config "executor": unknown key(s) {", ".join(unknown)}; known: {", ".join(OPTIONS)}')
    if spec and "name" not in spec:
        raise DLNestError('root_config "executor" needs a "name": "slurm" (or "local")')
    spec.update({k: v for k, v in flags.items() if v is not None})
    name = spec.get("name") or "local"
    if name not in ("local", "slurm"):
        raise DLNestError(f"unknown executor {name!r}: use local or slurm")
    if name == "local":
        given = sorted(k for k, v in flags.items() if v is not None and k != "name")
        if given:
            raise DLNestError(f"--{given[0]} goes with --executor slurm")
        return {"name": "local"}
    out: dict[str, Any] = {"name": "slurm"}
    if spec.get("partition") is not None:
        if not isinstance(spec["partition"], str) or not re.fullmatch(r"[\w.,-]+", spec["partition"]):
            raise DLNestError(f"--partition {spec['partition']!r} is not a partition name")
        out["partition"] = spec["partition"]
    for key in ("gpus", "nodes", "cpus_per_task", "signal_delay_s"):
        if (value := _positive(key, spec.get(key))) is not None:
            out[key] = value
    if spec.get("requeue_on_timeout") is not None:
        value = spec["requeue_on_timeout"]
        if isinstance(value, bool) or not isinstance(value, int) or value < 0:
            raise DLNestError(f"executor requeue_on_timeout must be a whole number >= 0, got {value!r}")
        out["requeue_on_timeout"] = value
    if spec.get("time") is not None:
        out["time"] = str(spec["time"])
        out["time_min"] = _minutes(out["time"])
    if spec.get("mem_gb") is not None:
        if isinstance(spec["mem_gb"], bool) or not isinstance(spec["mem_gb"], (int, float)) or spec["mem_gb"] <= 0:
            raise DLNestError(f"executor mem_gb must be a positive number, got {spec['mem_gb']!r}")
        out["mem_gb"] = spec["mem_gb"]
    if spec.get("additional") is not None:
        if not isinstance(spec["additional"], dict):
            raise DLNestError('executor "additional" must be an object of extra sbatch options')
        out["additional"] = {str(k): v for k, v in spec["additional"].items()}
    return out


def request(cpu: bool, memory_mb: int | None, ddp: bool, gpus: int | None, procs: int | None,
            executor: dict[str, Any], **extra: Any) -> dict[str, Any]:
    """A Slurm task's request: Slurm places it, so only what Slurm is asked for is checked here.

    ``gpus`` is GPUs per node (``--gpus``, else the executor block's, else 1 for a GPU task); with ``ddp``
    each node runs one rank per GPU (``procs`` ranks per node on the CPU)."""
    if memory_mb is not None:
        raise DLNestError("-m books memory on this machine's GPUs; Slurm allocates whole GPUs: use --gpus N")
    if extra.get("attached"):
        raise DLNestError("--attached ties a task to this process; a Slurm job lives on in the cluster")
    if cpu and gpus is not None:
        raise DLNestError("--gpus asks Slurm for GPUs: drop --cpu (or --gpus)")
    if procs is not None and (not (cpu and ddp) or procs < 1):
        raise DLNestError("--procs N (N >= 1) is for CPU DDP: add --cpu --ddp")
    if gpus is not None and gpus < 1:
        raise DLNestError("--gpus N needs N >= 1")
    nodes = executor.get("nodes", 1)
    if nodes > 1 and not ddp:
        raise DLNestError(f"--nodes {nodes} runs ranks on several machines: add --ddp")
    if shutil.which("sbatch") is None:
        raise DLNestError("--executor slurm needs Slurm's commands (sbatch, squeue, scancel) on PATH here")
    per_node = None if cpu else (gpus or executor.get("gpus") or 1)
    return {"cpu": cpu, "memory_mb": None, "ddp": ddp, "gpus": per_node,
            "procs": (procs or 2) if ddp and cpu else None, "executor": executor, **extra}


# -- inside the job ---------------------------------------------------------------------------------------
class SlurmRun:
    """What submitit runs in each Slurm task (one per rank): the worker entry point on the package.

    A restart of the same job (``SLURM_RESTART_COUNT`` > 0: preemption or ``scontrol requeue``, whose SIGTERM
    the worker takes as an interruption) resumes from the newest checkpoint, whatever the first start was.
    ``checkpoint`` is submitit's hook for the signal Slurm sends ``signal_delay_s`` before the time limit: it
    stops the worker (SIGTERM: an in-flight checkpoint still lands) and, while ``requeue_on_timeout`` allows,
    submitit requeues this same callable, which then resumes; past that the job ends, failed for time."""

    def __init__(self, task_id: str, package: str, *, resume: bool, ckpt: int | None, cpu: bool, ddp: bool):
        self.task_id, self.package, self.resume, self.ckpt = task_id, package, resume, ckpt
        self.cpu, self.ddp = cpu, ddp
        self._proc: subprocess.Popen | None = None
        self._ended: threading.Event | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_proc": None, "_ended": None}

    def __call__(self) -> int:
        import submitit

        from .devices import SIMULATED
        from .supervisor import worker_command

        job = submitit.JobEnvironment()
        restarts = int(os.environ.get("SLURM_RESTART_COUNT") or 0)
        world = job.num_tasks if self.ddp else 1
        rank = job.global_rank if self.ddp else 0
        pkg = SavePackage(self.package)
        # DLNEST_SIMULATED_GPUS: Slurm allocates the (fake) GPUs, training runs on the CPU, as on simulated local GPUs
        cpu = self.cpu or os.environ.get(SIMULATED) is not None
        cmd = worker_command(pkg, resume=self.resume or restarts > 0, ckpt=None if restarts else self.ckpt, cpu=cpu)
        env = {**os.environ, "DLNEST_TASK_ID": self.task_id, "PYTHONUNBUFFERED": "1"}
        if world > 1:
            if len(job.hostnames) == 1:  # one node: a file store in the package, no port opened; traffic on loopback
                rendezvous = str(pkg.path / "slurm" / f"rendezvous_{job.job_id}_{restarts}")
                env.update(GLOO_SOCKET_IFNAME="lo", NCCL_SOCKET_IFNAME="lo")
            else:  # several nodes: the first node of the allocation hosts the TCP store
                rendezvous = f"tcp://{job.hostnames[0]}:{20000 + int(job.job_id) % 20000}"
            cmd += ["--rank", str(rank), "--world-size", str(world), "--local-rank", str(job.local_rank),
                    "--rendezvous", rendezvous]
            if cpu and "OMP_NUM_THREADS" not in os.environ:
                env["OMP_NUM_THREADS"] = str(max(1, int(os.environ.get("SLURM_CPUS_ON_NODE") or os.cpu_count() or 1)
                                                 // max(1, world // len(job.hostnames))))
        output = pkg.output_path(rank, world)
        with open(output, "ab") as out:
            gpus = os.environ.get("CUDA_VISIBLE_DEVICES")
            node = os.environ.get("SLURMD_NODENAME") or job.hostname
            out.write(f"[dlnest] Slurm job {job.job_id} (restart {restarts}) on {node}, rank {rank}/{world}"
                      f"{f', GPUs {gpus}' if gpus else ''}\n".encode())
            out.flush()
            # Slurm sends its time-limit warning (USR2, sbatch --signal) to every process of the step: the worker
            # ignores it, and this process (submitit's handler, then ``checkpoint``) stops the worker cleanly
            self._proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT,
                                          env=env, cwd=pkg.path,
                                          preexec_fn=lambda: signal.signal(signal.SIGUSR2, signal.SIG_IGN))
        # a thread reaps the worker; this (main) thread only waits on an event, so submitit's signal handler,
        # which runs here and calls ``checkpoint``, never meets a Popen.wait holding the waitpid lock
        self._ended = threading.Event()
        threading.Thread(target=lambda: (self._proc.wait(), self._ended.set()), daemon=True).start()
        try:
            while not self._ended.wait(1.0):
                pass
        finally:
            self._stop_worker()
        code = self._proc.returncode
        if code != 0:
            raise RuntimeError(f"the worker exited with status {code}")
        return code

    def _stop_worker(self) -> None:
        if self._proc is not None and self._ended is not None and not self._ended.is_set():
            self._proc.terminate()
            if not self._ended.wait(60):
                self._proc.kill()
                self._ended.wait()

    def checkpoint(self) -> Any:
        """submitit's hook: stop the worker, requeue a run that resumes from the newest checkpoint."""
        import submitit

        self._stop_worker()
        return submitit.helpers.DelayedSubmission(
            SlurmRun(self.task_id, self.package, resume=True, ckpt=None, cpu=self.cpu, ddp=self.ddp))


# -- on the submitting machine ----------------------------------------------------------------------------
def _slurm_folder(pkg: SavePackage) -> Path:
    return pkg.path / "slurm"


def submit(ledger: Ledger, task: dict[str, Any]) -> str:
    """sbatch the task (status ``starting`` until Slurm runs it); returns the job id.

    A refusal (unknown partition, a limit, sbatch missing) is a ``DLNestError`` with Slurm's own reason."""
    import submitit

    req, pkg = task["request"], SavePackage(task["package"])
    ex = req["executor"]
    nodes = ex.get("nodes", 1)
    per_node = (req.get("gpus") or 1) if not req.get("cpu") else (req.get("procs") or 1)
    params: dict[str, Any] = {"job_name": f"dlnest-{task['id']}", "nodes": nodes,
                              "ntasks_per_node": per_node if req.get("ddp") else 1,
                              "signal_delay_s": ex.get("signal_delay_s", 90)}
    if ex.get("partition"):
        params["partition"] = ex["partition"]
    # submitit writes --time=5 unless told: no --time means the partition's limit, which submitit must also know
    # to tell a time-limit signal from a pre-emption
    time_min = ex.get("time_min") or _partition_minutes(ex.get("partition"))
    params["time"] = time_min
    if not req.get("cpu"):
        params["gpus_per_node"] = req["gpus"]
    if ex.get("cpus_per_task"):
        params["cpus_per_task"] = ex["cpus_per_task"]
    if ex.get("mem_gb"):
        params["mem"] = ex["mem_gb"]
    if ex.get("additional"):
        params["additional_parameters"] = ex["additional"]
    # a time limit ends the task (failed for time) unless requeue_on_timeout lets submitit requeue it
    executor = submitit.SlurmExecutor(folder=_slurm_folder(pkg), max_num_timeout=ex.get("requeue_on_timeout", 0))
    run = SlurmRun(task["id"], str(pkg.path), resume=task["kind"] == "continue", ckpt=req.get("ckpt"),
                   cpu=bool(req.get("cpu")), ddp=bool(req.get("ddp")))
    try:
        executor.update_parameters(**params)
        with contextlib.redirect_stderr(io.StringIO()):  # submitit echoes sbatch's stderr; the error says it once
            job = executor.submit(run)
    except ValueError as exc:
        error = f"bad Slurm option: {str(exc).splitlines()[0]}"
    except Exception as exc:  # submitit's FailedJobError carries sbatch's stderr
        error = f"Slurm refused the job: {_sbatch_reason(str(exc))}"
    else:
        error = None
    if error is not None:
        pkg.update_record(status="failed", error=error)  # the package tells the same story as the ledger
        raise DLNestError(error)
    with ledger.transaction() as db:
        ledger.update(db, task["id"], slurm_job_id=str(job.job_id))
        cancelled = ledger.get(task["id"], db)["cancel_requested"]
    pkg.update_record(slurm_job_id=str(job.job_id), slurm_time_min=time_min)
    if cancelled:  # del came while sbatch ran
        _scancel(str(job.job_id))
    return str(job.job_id)


def _scancel(job: str) -> None:
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):  # a job Slurm no longer knows is ended anyway
        subprocess.run(["scancel", job], capture_output=True, text=True, timeout=SQUEUE_TIMEOUT_S)


def _partition_minutes(partition: str | None) -> int | None:
    """The time limit Slurm gives a job of ``partition`` (else the default partition) without ``--time``:
    its DefaultTime, else its MaxTime; None when unlimited or unknown (sbatch then says why)."""
    try:
        out = subprocess.run(["sinfo", "-h", "-o", "%P|%L|%l"], capture_output=True, text=True,
                             timeout=SQUEUE_TIMEOUT_S).stdout
    except (OSError, subprocess.TimeoutExpired):
        return None
    for line in out.splitlines():
        name, default, maximum = (line.strip().split("|") + ["", ""])[:3]
        if (partition and name.rstrip("*") == partition) or (not partition and name.endswith("*")):
            limit = default if default not in ("", "n/a", "NONE") else maximum
            try:
                return _minutes(limit)
            except DLNestError:  # "infinite"
                return None
    return None


def _sbatch_reason(stderr: str) -> str:
    """The line of sbatch's complaint that says why ("Invalid partition name specified")."""
    lines = [ln.strip() for ln in stderr.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):
        m = re.match(r"sbatch: error: (?:Batch job submission failed: )?(.*)", ln)
        if m:
            return m.group(1)
    return lines[-1] if lines else "sbatch failed"


def _squeue() -> dict[str, tuple[str, str, str]] | None:
    """{job id: (state, reason, nodes)} for this user's jobs that Slurm still knows; None if squeue failed."""
    try:
        out = subprocess.run(["squeue", "-h", "-t", "all", "-u", str(os.getuid()), "-o", "%i|%T|%r|%N"],
                             capture_output=True, text=True, timeout=SQUEUE_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired):
        return None
    if out.returncode != 0:
        return None
    jobs = {}
    for line in out.stdout.splitlines():
        parts = line.strip().split("|")
        if len(parts) == 4:
            jobs[parts[0]] = (parts[1], parts[2], parts[3])
    return jobs


def _log_says_timeout(pkg: SavePackage, job_id: str) -> bool:
    log = _slurm_folder(pkg) / f"{job_id}_0_log.err"
    try:
        return "timed-out too many times" in log.read_text(errors="replace")
    except OSError:
        return False


def _log_error(pkg: SavePackage, job_id: str) -> str | None:
    """The last line of an exception submitit logged (the job died before or around the worker)."""
    log = _slurm_folder(pkg) / f"{job_id}_0_log.err"
    try:
        lines = [ln for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
    except OSError:
        return None
    errors = [ln.strip() for ln in lines if re.match(r"^\w+(\.\w+)*(Error|Exception): ", ln.strip())
              or ln.startswith("slurmstepd")]
    return errors[-1] if errors else None


def _verdict(task: dict[str, Any], state: str | None, reason: str) -> tuple[str, str | None]:
    """Final (status, error) of a task whose job has ended (``state`` None: Slurm forgot the job)."""
    pkg, job = SavePackage(task["package"]), task["slurm_job_id"]
    try:
        record = pkg.record()
    except DLNestError:
        record = {}
    limit = (task["request"].get("executor") or {}).get("time") or (
        f"the partition's {record['slurm_time_min']} min" if record.get("slurm_time_min") else "the partition's")
    if record.get("status") == "done" and state in (None, "COMPLETED", "COMPLETING"):
        return "done", None
    if task["cancel_requested"]:
        return "cancelled", "cancelled"
    if state == "TIMEOUT" or (state == "FAILED" and _log_says_timeout(pkg, job)):
        return "failed", f"Slurm job {job} was killed at its time limit ({limit})"
    if state == "CANCELLED":
        return "cancelled", f"Slurm job {job} was cancelled outside dlnest (scancel or an administrator)"
    if record.get("status") == "failed" and record.get("error"):
        return "failed", record["error"]
    if state in ("COMPLETED", None) and record.get("status") != "done":
        return "failed", record.get("error") or f"Slurm job {job} ended without finishing the training"
    detail = _log_error(pkg, job)
    return "failed", f"Slurm job {job} {state}" + (f" ({reason})" if reason and reason != "None" else "") + (
        f": {detail}" if detail else "")


def refresh(ledger: Ledger, force: bool = False) -> None:
    """Bring the ledger's Slurm tasks up to date with squeue and their packages (at most once a second)."""
    global _last_refresh
    now = time.monotonic()
    if not force and now - _last_refresh < REFRESH_MIN_S:
        return
    tasks = [t for t in ledger.tasks(ACTIVE) if t["slurm_job_id"]]
    if not tasks:
        return
    _last_refresh = now
    jobs = _squeue()
    if jobs is None:  # slurmctld unreachable for now: nothing is known to have changed
        return
    for t in tasks:
        state, reason, nodes = jobs.get(t["slurm_job_id"], (None, "", ""))
        if state in PENDING:
            if t["status"] != "starting":
                with ledger.transaction() as db:
                    ledger.update(db, t["id"], status="starting", placement=[])
        elif state in RUNNING:
            if state == "RUNNING" and (t["status"] != "running" or t["placement"] != [nodes]):
                with ledger.transaction() as db:
                    ledger.update(db, t["id"], status="running", placement=[nodes], heartbeat=time.time())
        else:
            status, error = _verdict(t, state, reason)
            if ledger.finish(t["id"], status, error=error):
                with contextlib.suppress(DLNestError, OSError):
                    SavePackage(t["package"]).settle(status, error)


def cancel(ledger: Ledger, task_id: str, timeout: float) -> None:
    """scancel the task's job (all its steps) and wait until Slurm has ended every process of it.

    ``cancel_requested`` is already set: a submission still in flight scancels its job itself once sbatch
    answers (``submit``); one whose submitter died is failed by the dispatcher."""
    deadline = time.monotonic() + timeout
    sent = None
    while time.monotonic() < deadline:
        row = ledger.get(task_id)
        if row["status"] in FINAL:
            return
        if row["status"] == "queued" and ledger.finish(task_id, "cancelled", error="cancelled while queued"):
            return
        if row["slurm_job_id"] and row["slurm_job_id"] != sent:
            sent = row["slurm_job_id"]
            _scancel(sent)
        refresh(ledger, force=True)
        time.sleep(0.2)
    ledger.finish(task_id, "cancelled",
                  error=f"cancelled (scancel {sent}: Slurm did not confirm within {timeout:.0f} s)")
