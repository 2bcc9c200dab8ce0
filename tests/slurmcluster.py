"""A real single-node Slurm (munged, slurmctld, slurmd) in a private folder, on loopback only.

Used by tests/test_slurm.py (a session fixture) and benchmarks/slurm.py. Nothing is faked: Debian's Slurm 22.05
daemons run with their own config, state, spool, logs and munge key/socket in ``root``; ``SLURM_CONF`` points
the client commands (sbatch, squeue, scancel, scontrol) at them. GPUs for gres are character device nodes
(``mknod c 1 3``, /dev/null's numbers): Slurm accepts them, and nothing ever opens them. ``stop()`` ends every
daemon and every job, so no process outlives the session."""
from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import psutil

DAEMONS = ("munged", "slurmctld", "slurmd")
PACKAGES = "slurmctld slurmd munge slurm-client"


class SlurmUnavailable(Exception):
    """Why a real Slurm cannot run here (the tests are skipped with this reason)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _pid(path: Path, timeout: float = 15.0) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            return int(path.read_text().strip())
        except (OSError, ValueError):
            time.sleep(0.05)
    raise SlurmUnavailable(f"{path.name} never appeared")


class Cluster:
    """Start with ``Cluster(root).start()``; ``env`` holds what client commands need; ``stop()`` ends it all."""

    PARTITION = "debug"

    def __init__(self, root: Path, cpus: int = 2, gpus: int = 2):
        self.root, self.cpus, self.gpus = Path(root), cpus, gpus
        self.conf = self.root / "slurm.conf"
        self.env = {"SLURM_CONF": str(self.conf)}
        self.pids: dict[str, int] = {}

    def _log_tail(self, name: str) -> str:
        path = self.root / f"{name}.log"
        lines = path.read_text(errors="replace").strip().splitlines() if path.exists() else []
        return lines[-1] if lines else "(no log)"

    def check(self) -> None:
        """Raise ``SlurmUnavailable`` (with the exact reason) when the daemons cannot run here."""
        missing = [d for d in ("munged", "slurmctld", "slurmd", "sbatch", "squeue") if shutil.which(d) is None
                   and not Path("/usr/sbin", d).exists()]
        if missing:
            raise SlurmUnavailable(f"Slurm is not installed ({', '.join(missing)} missing): "
                                   f"apt-get install -y {PACKAGES}")
        if os.geteuid() != 0:
            raise SlurmUnavailable("starting slurmd (it launches jobs as their users) and mknod need root")

    def _write_config(self) -> None:
        r = self.root
        for sub in ("state", "spool", "gpus"):
            (r / sub).mkdir(parents=True, exist_ok=True)
        for i in range(self.gpus):
            dev = r / "gpus" / f"nvidia{i}"
            if not dev.exists():
                os.mknod(dev, 0o666 | 0o020000, os.makedev(1, 3))  # a character device, like /dev/nvidiaN
        key = r / "munge.key"
        key.write_bytes(os.urandom(1024))
        key.chmod(0o400)
        gres = f"Gres=gpu:{self.gpus} " if self.gpus else ""
        self.conf.write_text(f"""\
ClusterName=dlnest-test
SlurmctldHost=localhost(127.0.0.1)
SlurmctldPort={_free_port()}
SlurmdPort={_free_port()}
CommunicationParameters=NoInAddrAny,NoCtldInAddrAny
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket={r / 'munge.sock'},cred_expire=5
SlurmUser=root
SlurmdUser=root
StateSaveLocation={r / 'state'}
SlurmdSpoolDir={r / 'spool'}
SlurmctldPidFile={r / 'slurmctld.pid'}
SlurmdPidFile={r / 'slurmd.pid'}
SlurmctldLogFile={r / 'slurmctld.log'}
SlurmdLogFile={r / 'slurmd.log'}
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_min_interval=0,sched_interval=1,bf_interval=1
MpiDefault=none
SwitchType=switch/none
ReturnToService=2
JobRequeue=1
KillWait=5
MinJobAge=600
InactiveLimit=0
Waittime=0
SlurmdTimeout=300
GresTypes=gpu
NodeName=localhost NodeAddr=127.0.0.1 CPUs={self.cpus} RealMemory=2048 {gres}State=UNKNOWN
PartitionName={self.PARTITION} Nodes=localhost Default=YES MaxTime=INFINITE State=UP
""")
        (r / "gres.conf").write_text(
            f"NodeName=localhost Name=gpu File={r / 'gpus'}/nvidia[0-{self.gpus - 1}]\n" if self.gpus else "")

    def start(self, timeout: float = 60.0) -> "Cluster":
        self.check()
        self._write_config()
        r = self.root
        try:
            subprocess.run(["munged", "--force", f"--key-file={r / 'munge.key'}", f"--socket={r / 'munge.sock'}",
                            f"--pid-file={r / 'munged.pid'}", f"--log-file={r / 'munged.log'}",
                            f"--seed-file={r / 'munged.seed'}"], check=True, capture_output=True, text=True)
            self.pids["munged"] = _pid(r / "munged.pid")
            env = {**os.environ, **self.env}
            subprocess.run(["slurmctld", "-i"], env=env, check=True, capture_output=True, text=True)
            self.pids["slurmctld"] = _pid(r / "slurmctld.pid")
            subprocess.run(["slurmd", "-N", "localhost"], env=env, check=True, capture_output=True, text=True)
            self.pids["slurmd"] = _pid(r / "slurmd.pid")
        except subprocess.CalledProcessError as exc:
            self.stop()
            name = Path(exc.cmd[0]).name
            raise SlurmUnavailable(f"{name} did not start: {(exc.stderr or '').strip() or self._log_tail(name)}")
        except SlurmUnavailable as exc:
            self.stop()
            raise SlurmUnavailable(f"{exc}: {self._log_tail('slurmctld')}") from None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            out = subprocess.run(["sinfo", "-h", "-o", "%t"], env=env, capture_output=True, text=True)
            if out.stdout.strip() == "idle":
                return self
            time.sleep(0.2)
        state = out.stdout.strip() or out.stderr.strip()
        self.stop()
        raise SlurmUnavailable(f"the node never became idle (sinfo: {state!r}; slurmd: {self._log_tail('slurmd')})")

    def run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess:
        """A Slurm client command (``scontrol``, ``squeue``...) against this cluster."""
        return subprocess.run(list(args), env={**os.environ, **self.env}, capture_output=True, text=True,
                              check=check, timeout=60)

    def stop(self) -> None:
        """Cancel every job, then end slurmd (and the slurmstepd's it left), slurmctld and munged."""
        if "slurmctld" in self.pids:
            self.run("scancel", "--full", "-u", str(os.getuid()), check=False)
            deadline = time.monotonic() + 30
            while time.monotonic() < deadline and self.run("squeue", "-h", check=False).stdout.strip():
                time.sleep(0.2)
        procs = []
        for name in reversed(DAEMONS):
            pid = self.pids.pop(name, None)
            if pid is None:
                continue
            try:
                proc = psutil.Process(pid)
                procs.append(proc)
                proc.send_signal(signal.SIGTERM)
            except psutil.Error:
                pass
        _, alive = psutil.wait_procs(procs, timeout=15)
        for p in alive:
            try:
                p.kill()
            except psutil.Error:
                pass
