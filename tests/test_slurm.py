"""The Slurm executor against a real single-node Slurm 22.05 (munged, slurmctld, slurmd on loopback, started by
the session fixture in a private folder and stopped after it), real submitit jobs and real training. Nothing of
Slurm is mocked. Without the Debian packages (or without root) every test here is skipped with the reason."""
from __future__ import annotations

import json
import os
import re
import time
from pathlib import Path

import psutil
import pytest

from conftest import cli, edit_json, metrics, shell
from dlnest_jupyter import api
from dlnest_jupyter.errors import DLNestError
from dlnest_jupyter.scaffold import new_project
from dlnest_jupyter.slurm import options
from slurmcluster import Cluster, SlurmUnavailable


@pytest.fixture(scope="session")
def slurm(tmp_path_factory):
    cluster = Cluster(tmp_path_factory.mktemp("slurm"))
    try:
        cluster.start()
    except SlurmUnavailable as exc:
        pytest.skip(f"no real Slurm here: {exc}")
    old = os.environ.get("SLURM_CONF")
    os.environ["SLURM_CONF"] = cluster.env["SLURM_CONF"]
    yield cluster
    cluster.stop()
    if old is None:
        os.environ.pop("SLURM_CONF", None)
    else:
        os.environ["SLURM_CONF"] = old


def _job_state(cluster: Cluster, job: str) -> str:
    return cluster.run("squeue", "-h", "-t", "all", "-j", job, "-o", "%T").stdout.strip()


def _wait(predicate, timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.1)


def _lines(pkg: Path) -> int:
    path = pkg / "metrics.jsonl"
    return len(path.read_text().splitlines()) if path.exists() else 0


def test_options_are_checked_before_anything_is_created():
    assert options(None) == {"name": "local"}
    assert options({"name": "slurm", "partition": "gpu", "time": "01:30:00"}, nodes=2) == {
        "name": "slurm", "partition": "gpu", "nodes": 2, "time": "01:30:00", "time_min": 90}
    assert options("slurm", name="local") == {"name": "local"}  # --executor local beats the project's default
    assert options("slurm", time="0:30")["time_min"] == 1  # Slurm counts whole minutes
    for default, flags, message in [
        ({"name": "slurm", "partion": "x"}, {}, "unknown key(s) partion"),
        (None, {"partition": "x", "name": "local"}, "--partition goes with --executor slurm"),
        ("pbs", {}, "unknown executor 'pbs'"),
        ({"partition": "gpu"}, {}, 'needs a "name"'),
        ("slurm", {"time": "soon"}, "--time 'soon': use HH:MM:SS"),
        ({"name": "slurm", "nodes": 0}, {}, "nodes must be a positive integer"),
    ]:
        with pytest.raises(DLNestError, match=message.replace("(", r"\(").replace(")", r"\)")):
            options(default, **flags)


def test_slurm_tasks_take_no_local_slot_and_a_lost_submission_fails(tmp_path: Path, monkeypatch):
    """On a real ledger (no Slurm needed): a running Slurm CPU task leaves the local CPU slot free, and one
    booked whose submitter died before sbatch answered is failed, not resubmitted."""
    import dlnest_jupyter.scheduler as scheduler
    from dlnest_jupyter.ledger import Ledger

    monkeypatch.setenv("DLNEST_HOME", str(tmp_path / "home"))
    ledger = Ledger()
    slurm_req = {"cpu": True, "memory_mb": None, "executor": {"name": "slurm"}}
    with ledger.transaction() as db:
        ledger.insert(db, {"id": "T_run", "kind": "train", "status": "running", "request": slurm_req,
                           "created": time.time() - 100, "started": time.time() - 100})
        ledger.insert(db, {"id": "T_lost", "kind": "train", "status": "starting", "request": slurm_req,
                           "created": time.time() - 100, "started": time.time() - 100})
        ledger.insert(db, {"id": "T_local", "kind": "train", "status": "queued", "request": {"cpu": True},
                           "created": time.time()})
    launched = []
    assert scheduler.dispatch_once(ledger, launch=lambda _l, t: launched.append(t["id"]),
                                   settings=scheduler.Settings(cpu_slots=1, start_timeout_s=60)) == ["T_local"]
    assert launched == ["T_local"] and ledger.get("T_run")["status"] == "running"
    lost = ledger.get("T_lost")
    assert lost["status"] == "failed" and lost["error"].startswith("its submission to Slurm never completed")


def test_load_ext_and_listing_import_neither_submitit_nor_torch(env):
    out, _ = shell("""
        ip.run_line_magic('dlnest_tasks', '')
        print(sorted(m for m in ('torch', 'submitit', 'dlnest_jupyter.slurm') if m in sys.modules))
    """, env)
    assert out.strip().splitlines()[-1] == "[]"


def test_daemons_listen_on_loopback_only(slurm):
    listening = [c for pid in slurm.pids.values() for c in psutil.Process(pid).net_connections("inet")
                 if c.status == psutil.CONN_LISTEN]
    assert listening and all(c.laddr.ip == "127.0.0.1" for c in listening), listening


def test_magic_runs_a_gpu_task_as_a_slurm_job_to_done(tmp_path: Path, env, slurm):
    """%dlnest_run --executor slurm --gpus 1: gres gives the job a GPU, output and metrics land in the package,
    the ledger follows the job to done, %dlnest_tasks and the CLI list it with its job id."""
    project = new_project(tmp_path / "mnist", mnist=True)
    out, err = shell(f"""
        t = ip.run_line_magic('dlnest_run', '-c {project}/root_config.json --executor slurm --gpus 1 --set epochs=2')
        print('job', t.slurm_job_id, t.status)
        print('final', t.wait(300))
        ip.run_line_magic('dlnest_tasks', '')
        print(t.output(tail=3))
        from dlnest_jupyter import panels
        p = panels.panel()
        p._refresh_tasks()  # what the panel's pump shows each second
        print('panel', p.tasks.value)
        p.close()
        print(json.dumps(t.row))
    """, env)
    row = json.loads(out.strip().splitlines()[-1])
    job = row["slurm_job_id"]
    assert f"job {job} starting" in out and "final done" in out, (out, err)
    assert row["status"] == "done" and row["error"] is None and row["placement"] == ["localhost"]
    assert row["request"]["executor"] == {"name": "slurm"} and row["request"]["gpus"] == 1
    assert f"slurm:{job}@localhost" in out and "[dlnest] done:" in out
    panel = next(line for line in out.splitlines() if line.startswith("panel "))
    assert re.search(rf'data-task="{row["id"]}" data-status="done"><td>{row["id"]}</td><td>done</td>'
                     rf"<td>slurm:{job}@localhost</td>.*epoch 2/2", panel)
    pkg = Path(row["package"])
    output = (pkg / "_output.txt").read_text()
    assert f"[dlnest] Slurm job {job} (restart 0) on localhost, rank 0/1, GPUs 0" in output
    assert "[dlnest] epoch 2" in output
    assert metrics(pkg)[-1]["epoch"] == 2
    record = json.loads((pkg / "record.json").read_text())
    assert record["status"] == "done" and record["slurm_job_id"] == job
    assert _job_state(slurm, job) == "COMPLETED"
    assert "TresPerNode=gres:gpu:1" in slurm.run("scontrol", "show", "job", job).stdout  # Slurm really allocated a GPU
    listing = cli("tasks").stdout
    assert row["id"] in listing and f"slurm:{job}@localhost" in listing


def test_output_tails_while_running_and_del_scancels_the_job(tmp_path: Path, env, slurm):
    """Output is tailed from the package during the job; %dlnest_del scancels it (every step), waits until
    Slurm has ended it, and records cancelled; no process of it is left (the env fixture checks)."""
    project = new_project(tmp_path / "mnist", mnist=True)
    task = api.submit(project / "root_config.json", executor="slurm", cpu=True, overrides=["epochs=200"])
    pkg = task.package
    _wait(lambda: task.status == "running" and _lines(pkg) >= 5, 120, "training steps in the Slurm job")
    assert "[dlnest] Slurm job" in task.output(tail=50)
    _wait(lambda: "[dlnest] epoch 1" in task.output(tail=5), 120, "a line tailed from the package")
    out, err = shell(f"""
        t = ip.run_line_magic('dlnest_del', {task.id!r})
        print(t.status, t.error)
    """, env)
    assert out.strip().splitlines()[-1] == "cancelled cancelled", (out, err)
    assert _job_state(slurm, task.slurm_job_id) == "CANCELLED"
    record = json.loads((pkg / "record.json").read_text())
    assert record["status"] == "cancelled"
    steps = slurm.run("squeue", "-h", "-s", "-j", task.slurm_job_id, check=False).stdout.strip()
    assert steps == ""


def test_requeue_continues_from_the_checkpoint_bit_identical(tmp_path: Path, env, slurm):
    """`scontrol requeue` mid-training: Slurm ends the job and starts it again; the restarted job continues
    from the newest checkpoint and ends bit-identical to an uninterrupted run (as kill + continue does)."""
    import torch

    from test_continue import _assert_identical

    project = new_project(tmp_path / "mnist", mnist=True)
    common = ["epochs=5"]
    cli("run", "-c", str(project / "root_config.json"), "--cpu", *[a for o in common for a in ("--set", o)])
    (reference,) = [p for p in (project / "Saves").iterdir() if not p.name.startswith(".")]

    task = api.submit(project / "root_config.json", executor="slurm", cpu=True, overrides=common)
    pkg, job = task.package, task.slurm_job_id
    manifest = pkg / "checkpoints" / "manifest.json"
    _wait(lambda: manifest.exists() and _lines(pkg) >= 60, 180, "the first checkpoint and steps past it")
    assert task.status == "running"
    lines_at_requeue = _lines(pkg)
    slurm.run("scontrol", "requeue", job)
    _wait(lambda: task.status == "starting", 30, "the ledger to see the job pending again")
    assert task.wait(300) == "done", task.error
    assert task.slurm_job_id == job and lines_at_requeue < 230  # the same job, stopped before its end

    final = lambda p: torch.load(p / "checkpoints" / "epoch_000005.ckpt", weights_only=False)  # noqa: E731
    a, b = final(reference), final(pkg)
    _assert_identical(a["model"], b["model"], "model")
    _assert_identical(a["life_cycle"], b["life_cycle"])
    assert a["log"] == b["log"] and (a["epoch"], a["iter"]) == (b["epoch"], b["iter"])
    strip = lambda rows: [{k: v for k, v in r.items() if k != "time"} for r in rows]  # noqa: E731
    assert strip(metrics(reference)) == strip(metrics(pkg))
    record = json.loads((pkg / "record.json").read_text())
    assert record["status"] == "done" and len(record["attempts"]) == 2
    assert record["attempts"][0]["status"] in ("cancelled", "interrupted")
    assert record["attempts"][1]["resumed_from"] >= 1
    output = (pkg / "_output.txt").read_text()
    assert f"Slurm job {job} (restart 1)" in output and "[dlnest] continuing from the checkpoint of epoch" in output


def test_unknown_partition_is_one_clear_line_and_a_failed_task(tmp_path: Path, env, slurm):
    project = new_project(tmp_path / "mnist", mnist=True)
    out, err = shell(f"""
        r = ip.run_line_magic('dlnest_run', '-c {project}/root_config.json --executor slurm --partition nope --cpu')
        print('returned', r)
        print(json.dumps([t.row for t in dlnest_jupyter.tasks()]))
    """, env)
    (row,) = json.loads(out.strip().splitlines()[-1])
    assert "returned None" in out
    assert err.strip() == (f"dlnest: error: {row['id']} failed: Slurm refused the job: "
                           "Invalid partition name specified")
    assert row["status"] == "failed" and row["slurm_job_id"] is None
    assert row["error"] == "Slurm refused the job: Invalid partition name specified"
    record = json.loads((Path(row["package"]) / "record.json").read_text())
    assert record["status"] == "failed" and record["error"] == row["error"]
    proc = cli("submit", "-c", str(project / "root_config.json"), "--executor", "slurm", "--cpu", "-m", "100",
               check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == (
        "dlnest_jupyter: error: -m books memory on this machine's GPUs; Slurm allocates whole GPUs: use --gpus N")


def test_project_default_executor_time_limit_and_the_checkpoint_hook(tmp_path: Path, env, slurm):
    """root_config's "executor" block makes Slurm the project's default. Slurm signals the job before its time
    limit; submitit's checkpoint hook stops the worker and requeues the job once (requeue_on_timeout: 1), which
    continues the package; at the second limit the task fails for time, in the ledger and in the record."""
    project = new_project(tmp_path / "mnist", mnist=True)
    edit_json(project / "root_config.json", executor={"name": "slurm", "time": "00:01:00", "signal_delay_s": 10,
                                                      "requeue_on_timeout": 1})
    task = api.submit(project / "root_config.json", cpu=True, overrides=["epochs=100000"])
    assert task.slurm_job_id and task.row["request"]["executor"]["time_min"] == 1
    assert task.wait(400) == "failed"
    assert task.error == f"Slurm job {task.slurm_job_id} was killed at its time limit (00:01:00)"
    record = json.loads((task.package / "record.json").read_text())
    assert (record["status"], record["error"]) == ("failed", task.error) and len(record["attempts"]) == 2
    assert record["attempts"][1]["resumed_from"] >= 1
    output = (task.package / "_output.txt").read_text()
    assert f"Slurm job {task.slurm_job_id} (restart 1)" in output
    assert "[dlnest] continuing from the checkpoint of epoch" in output
    log = (task.package / "slurm" / f"{task.slurm_job_id}_0_log.err").read_text()
    assert log.count("Caught signal SIGUSR2") == 2 and "timed-out too many times" in log


def test_rest_api_submits_lists_tails_and_cancels_slurm_tasks(tmp_path: Path, env, slurm):
    """A project whose root_config names Slurm, driven over a real jupyter server's REST API: the server's
    dispatcher follows the jobs (no kernel anywhere), output comes from the package, cancel scancels."""
    from test_server import Server

    project = new_project(tmp_path / "mnist", mnist=True)
    edit_json(project / "root_config.json", executor={"name": "slurm"})
    srv = Server(tmp_path, env).start()
    try:
        short = srv.post("tasks", {"config": "mnist/root_config.json", "cpu": True, "overrides": ["epochs=1"]})
        long = srv.post("tasks", {"config": "mnist/root_config.json", "cpu": True, "overrides": ["epochs=500"]})
        assert short.status_code == long.status_code == 201, (short.text, long.text)
        short, long = short.json(), long.json()
        assert short["slurm_job_id"] and long["slurm_job_id"] and short["status"] == "starting"
        done = srv.wait_status(short["id"], ("done", "failed", "cancelled"))
        assert done["status"] == "done" and done["placement"] == ["localhost"], done
        out = srv.get(f"tasks/{short['id']}/output").json()
        assert f"[dlnest] Slurm job {short['slurm_job_id']}" in out["text"] and out["complete"]
        srv.wait_status(long["id"], ("running",))
        listed = {t["id"]: t for t in srv.get("tasks").json()["tasks"]}
        assert listed[long["id"]]["slurm_job_id"] == long["slurm_job_id"]
        cancelled = srv.post(f"tasks/{long['id']}/cancel").json()
        assert cancelled["status"] == "cancelled", cancelled
        assert _job_state(slurm, long["slurm_job_id"]) == "CANCELLED"
    finally:
        srv.stop()


def test_cpu_ddp_ranks_are_slurm_tasks_meeting_in_the_package(tmp_path: Path, env, slurm):
    """--ddp --procs 2: two Slurm tasks (srun) on the node, ranks from Slurm's environment, a file store in the
    package for the rendezvous (one node: no port opened), one output file per rank."""
    project = new_project(tmp_path / "mnist", mnist=True)
    task = api.submit(project / "root_config.json", executor="slurm", cpu=True, ddp=True, procs=2,
                      overrides=["epochs=1"])
    assert task.wait(300) == "done", task.error
    record = json.loads((task.package / "record.json").read_text())
    assert record["status"] == "done" and record["world_size"] == 2
    for rank in (0, 1):
        text = (task.package / f"_output{rank}.txt").read_text()
        assert f"[dlnest] Slurm job {task.slurm_job_id} (restart 0) on localhost, rank {rank}/2" in text
        assert f"rank {rank}/2 on cpu" in text
    assert "NumTasks=2" in slurm.run("scontrol", "show", "job", task.slurm_job_id).stdout
    again = api.continue_(task.package, executor="slurm", cpu=True)  # keeps its world size, as a local continue
    assert again.wait(300) == "done", again.error
    assert again.slurm_job_id != task.slurm_job_id and again.row["request"]["procs"] == 2
    record = json.loads((task.package / "record.json").read_text())
    assert [a["resumed_from"] for a in record["attempts"]] == [None, 1]
    assert "[dlnest] continuing from the checkpoint of epoch 1" in (task.package / "_output0.txt").read_text()
