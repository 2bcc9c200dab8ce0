"""Submission-to-first-step latency: the Slurm executor vs the local one, on the same machine, side by side.

Set-up: a real single-node Slurm 22.05 (munged, slurmctld, slurmd on loopback; tests/slurmcluster.py, the
test suite's fixture, started here in a temporary folder and stopped at the end; needs root and Debian's
slurmctld slurmd munge slurm-client), a private DLNEST_HOME, the MNIST example. Each round submits the same
CPU task (``--cpu --set epochs=1``) once locally and once through Slurm, alternating which goes first, one at
a time (the machine has 2 cores: nothing else of ours runs meanwhile). Both run the same worker entry point.

Per task:
  submit returns    wall time of ``dlnest_jupyter.run(...)`` (local: ledger + dispatch + supervisor fork;
                    Slurm: ledger + sbatch through submitit, until Slurm gave a job id)
  first step        the ``time`` of metrics.jsonl's first line (written right after step 1) minus the moment
                    before ``run(...)`` was called
Both include the code snapshot of the project (same for both). Slurm adds: its scheduler noticing the job,
slurmd launching the batch script, srun launching the step, submitit's interpreter loading the pickled callable.
Wall-clock figures on a noisy 2-core machine: read them as orders of magnitude."""
from __future__ import annotations

import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROUNDS = int(os.environ.get("ROUNDS", "5"))
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def first_step_time(pkg: Path, timeout: float = 300) -> float:
    deadline = time.monotonic() + timeout
    path = pkg / "metrics.jsonl"
    while time.monotonic() < deadline:
        if path.exists():
            for line in path.read_text().splitlines():
                try:
                    row = json.loads(line)
                except ValueError:
                    continue
                if row.get("iter") == 1:
                    return row["time"]
        time.sleep(0.02)
    raise TimeoutError(f"no first step in {pkg}")


def slurm_wait(job: str) -> str:
    """Seconds the job waited in Slurm's queue (StartTime - SubmitTime: whole seconds, Slurm's resolution)."""
    import datetime as dt
    import re
    import subprocess

    out = subprocess.run(["scontrol", "show", "job", job], capture_output=True, text=True).stdout
    times = dict(re.findall(r"(SubmitTime|StartTime)=(\S+)", out))
    try:
        start, submit = (dt.datetime.fromisoformat(times[k]) for k in ("StartTime", "SubmitTime"))
    except (KeyError, ValueError):
        return "?"
    return f"{(start - submit).total_seconds():.0f} s"


def one(config: Path, executor: str) -> tuple[float, float, str]:
    import dlnest_jupyter

    t0 = time.time()
    task = dlnest_jupyter.run(config, cpu=True, overrides=["epochs=1"], executor=executor)
    returned = time.time() - t0
    first = first_step_time(task.package) - t0
    status = task.wait(300)
    assert status == "done", (executor, status, task.error)
    return returned, first, (f", queued in Slurm {slurm_wait(task.slurm_job_id)}" if task.slurm_job_id else "")


def main() -> int:
    from slurmcluster import Cluster, SlurmUnavailable

    with tempfile.TemporaryDirectory(prefix="dlnest-bench-slurm-") as tmp:
        tmp_path = Path(tmp)
        os.environ["DLNEST_HOME"] = str(tmp_path / "home")
        os.environ.pop("DLNEST_SIMULATED_GPUS", None)
        cluster = Cluster(tmp_path / "slurm")
        try:
            started = time.monotonic()
            cluster.start()
        except SlurmUnavailable as exc:
            print(f"no real Slurm here: {exc}")
            return 1
        print(f"Slurm up (node idle) in {time.monotonic() - started:.2f} s")
        os.environ.update(cluster.env)
        try:
            from dlnest_jupyter.scaffold import new_project

            config = new_project(tmp_path / "mnist", mnist=True) / "root_config.json"
            one(config, "local")  # warm the page cache and the code store: not counted
            results: dict[str, list[tuple[float, float, str]]] = {"local": [], "slurm": []}
            for r in range(ROUNDS):
                for executor in (("local", "slurm") if r % 2 == 0 else ("slurm", "local")):
                    results[executor].append(one(config, executor))
                    ret, first, note = results[executor][-1]
                    print(f"round {r + 1} {executor:5s}: submit returned {ret * 1000:7.1f} ms, first step after "
                          f"{first:6.2f} s{note}")
        finally:
            cluster.stop()
    med = {k: (statistics.median(x[0] for x in v), statistics.median(x[1] for x in v)) for k, v in results.items()}
    print(f"\nmedians over {ROUNDS} rounds (CPU task, MNIST example, 1 epoch):")
    for k, (ret, first) in med.items():
        print(f"  {k:5s}  submit returns in {ret * 1000:7.1f} ms   first step {first:6.2f} s after submission")
    print(f"  Slurm / local: submit {med['slurm'][0] / med['local'][0]:.2f}x, first step "
          f"{med['slurm'][1] / med['local'][1]:.2f}x (+{med['slurm'][1] - med['local'][1]:.2f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
