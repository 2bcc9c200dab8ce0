"""Background tasks end to end: real IPython shells in separate processes, real supervisors and workers on
simulated GPUs, a real ledger. Every test ends its processes (the fixture scans for leftovers)."""
from __future__ import annotations

import json
import os
import time
from pathlib import Path

import psutil
import pytest

from conftest import processes_mentioning, shell
from dlnest_jupyter.scaffold import new_project


def test_two_shells_never_overcommit_a_device(tmp_path: Path, env):
    project = new_project(tmp_path / "proj")
    go = tmp_path / "go"
    script = f"""
        import os
        while not os.path.exists({str(go)!r}):
            time.sleep(0.01)
        ids = [ip.run_line_magic('dlnest_run', '-c {project}/root_config.json -m 6000').id for _ in range(20)]
        for i in ids:
            dlnest_jupyter.task(i).wait(900)
        print(json.dumps(ids))
    """
    procs = [shell(script, env, wait=False) for _ in range(2)]
    time.sleep(2)
    go.touch()
    ids = []
    for p in procs:
        out, err = p.communicate(timeout=1200)
        assert p.returncode == 0, err
        ids += json.loads(out.strip().splitlines()[-1])
    from dlnest_jupyter.api import ledger

    rows = [ledger().get(i) for i in ids]
    assert len(set(ids)) == 40 and all(r["status"] == "done" for r in rows), [r["error"] for r in rows]
    peak = {}
    for r in rows:  # at each booking instant, the memory booked on that device must fit its 16384 MiB
        (device,) = r["placement"]
        booked = sum(6000 for o in rows if o["placement"] == [device] and o["started"] <= r["started"] < o["ended"])
        assert booked <= 16384, (device, booked)
        peak[device] = max(peak.get(device, 0), booked)
    assert set(peak) == {"SIM-0", "SIM-1"} and max(peak.values()) == 12000  # both used, two at a time
    assert ledger().reservations() == []


def test_task_outlives_its_shell_and_a_new_shell_sees_it_finish(tmp_path: Path, env):
    project = new_project(tmp_path / "mnist", mnist=True)
    out, _ = shell(f"""
        t = ip.run_line_magic('dlnest_run', '-c {project}/root_config.json -m 2000 --set epochs=6')
        while t.status != 'running':
            time.sleep(0.05)
        print(t.id)
    """, env)
    task_id = out.split()[-1]
    out, _ = shell(f"""
        t = dlnest_jupyter.task({task_id!r})
        print('seen:', t.status)
        ip.run_line_magic('dlnest_tasks', '')
        print('final:', t.wait(300))
        print(t.output(tail=2))
    """, env)
    assert "seen: running" in out and task_id in out
    assert "final: done" in out and "[dlnest] done:" in out


def test_attached_task_ends_with_its_shell(tmp_path: Path, env):
    project = new_project(tmp_path / "mnist", mnist=True)
    out, _ = shell(f"""
        t = ip.run_line_magic('dlnest_run', '-c {project}/root_config.json --attached -m 2000 --set epochs=50')
        while t.status != 'running':
            time.sleep(0.05)
        print(t.id)
    """, env)
    from dlnest_jupyter import api

    task = api.task(out.split()[-1])
    assert task.wait(60) == "cancelled"
    assert not processes_mentioning(str(task.package))


def _tree(task) -> list[psutil.Process]:
    row = task.row
    procs = [psutil.Process(row["supervisor_pid"]), psutil.Process(row["worker_pid"])]
    return procs + procs[1].children(recursive=True)


def test_del_during_training_ends_every_process_and_continue_works(tmp_path: Path, env):
    from dlnest_jupyter import api

    project = new_project(tmp_path / "mnist", mnist=True)
    task = api.submit(project / "root_config.json", memory_mb=2000,
                      overrides=["epochs=8", "dataset.num_workers=2"])
    deadline = time.monotonic() + 120
    while not (task.package / "metrics.jsonl").exists() or task.status != "running":
        assert time.monotonic() < deadline and task.status in ("queued", "starting", "running"), task
        time.sleep(0.05)
    while len(tree := _tree(task)) < 4:  # supervisor, worker, two data-loader workers
        assert time.monotonic() < deadline, tree
        time.sleep(0.05)
    api.cancel(task.id)
    assert task.status == "cancelled"
    gone, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive and not processes_mentioning(str(task.package))
    record = json.loads(task.record_path.read_text())
    assert (record["status"], record["attempts"][-1]["status"]) == ("cancelled", "cancelled"), record["error"]

    again = api.continue_(task.package, memory_mb=2000)
    assert again.wait(300) == "done", again.output(tail=20)
    record = json.loads(task.record_path.read_text())
    assert record["status"] == "done" and [a["status"] for a in record["attempts"]][-1] == "done"


def test_a_del_that_surfaces_as_another_error_is_still_cancelled(tmp_path: Path, env):
    """The del's SIGTERM also ends data-loader workers, and torch then raises "DataLoader worker ... killed"
    wherever the stop is unwinding. Here the user's step turns the stop into such an error, every time."""
    from dlnest_jupyter import api

    project = new_project(tmp_path / "mnist", mnist=True)
    model = project / "Model" / "Model.py"
    model.write_text(model.read_text().replace("        x, y = batch\n", """        x, y = batch
        import time
        try:
            time.sleep(0.05)
        except KeyboardInterrupt:
            raise RuntimeError("DataLoader worker (pid 1) is killed by signal: Terminated.") from None
""", 1))
    task = api.submit(project / "root_config.json", memory_mb=2000, overrides=["epochs=50"])
    deadline = time.monotonic() + 120
    while not (task.package / "metrics.jsonl").exists():
        assert time.monotonic() < deadline and task.status in ("queued", "starting", "running"), task
        time.sleep(0.05)
    assert api.cancel(task.id).status == "cancelled"
    record = json.loads(task.record_path.read_text())
    assert (record["status"], record["attempts"][-1]["status"]) == ("cancelled", "cancelled"), record["error"]
    assert "killed by signal" in task.output(tail=40)  # the user still sees what their code raised


def test_del_during_a_checkpoint_write_leaves_nothing_running(tmp_path: Path, env):
    from dlnest_jupyter import api
    from dlnest_jupyter.checkpoint import Checkpoints

    project = new_project(tmp_path / "mnist", mnist=True)
    task = api.submit(project / "root_config.json", memory_mb=2000, overrides=["epochs=20", "model.hidden=2048"])
    folder = task.package / "checkpoints"
    deadline = time.monotonic() + 180
    while not any(folder.glob(".epoch_*.tmp")):
        assert time.monotonic() < deadline and task.status in ("queued", "starting", "running"), task
        time.sleep(0.002)
    tree = _tree(task)
    api.cancel(task.id)
    gone, alive = psutil.wait_procs(tree, timeout=10)
    assert not alive and not processes_mentioning(str(task.package))
    ck = Checkpoints(folder, {})
    if ck.epochs():
        assert ck.load()["epoch"] == ck.epochs()[-1]


def test_bad_input_prints_one_line_and_changes_nothing(tmp_path: Path, env):
    project = new_project(tmp_path / "mnist", mnist=True)
    root = project / "root_config.json"
    lines = [f"%dlnest_run -c {root} --bogus", f"%dlnest_run -c {project}/missing.json", f"%dlnest_run -c {root} -m 0",
             f"%dlnest_run -c {root} -m lots", f"%dlnest_run -c {root} -m 99999", "%dlnest_del T_nope",
             "%dlnest_continue -r /nonexistent", "%dlnest_run -c 'unbalanced"]
    out, err = shell(f"""
        import contextlib, io
        for line in {lines!r}:
            buf = io.StringIO()
            with contextlib.redirect_stderr(buf):
                result = ip.run_cell(line)
            print(json.dumps([line, buf.getvalue(), result.result is None, result.error_in_exec is None]))
        print(json.dumps(['tasks', len(dlnest_jupyter.tasks())]))
    """, env)
    results = [json.loads(x) for x in out.strip().splitlines()]
    for line, text, none, no_exc in results[:-1]:
        assert text.count("\n") == 1 and text.startswith("dlnest: error: "), (line, text)
        assert "Traceback" not in text and none and no_exc, line
    messages = [r[1] for r in results[:-1]]
    assert "unrecognized arguments: --bogus" in messages[0]
    assert "config file not found" in messages[1]
    assert "positive number of MiB" in messages[2] and "positive number of MiB" in messages[3]
    assert "can never fit: the largest GPU has 16384 MiB" in messages[4]
    assert "unknown task id 'T_nope'" in messages[5]
    assert "not a save package" in messages[6]
    assert results[-1] == ["tasks", 0] and not (project / "Saves").exists()


def test_gpu_task_without_gpus_is_refused(tmp_path: Path, env, monkeypatch):
    if os.path.exists("/dev/nvidiactl"):
        pytest.skip("this machine has an NVIDIA driver")
    env = {k: v for k, v in env.items() if k != "DLNEST_SIMULATED_GPUS"}
    project = new_project(tmp_path / "mnist", mnist=True)
    out, err = shell(f"""
        ip.run_line_magic('dlnest_run', '-c {project}/root_config.json')
        print(len(dlnest_jupyter.tasks()))
    """, env)
    assert err.startswith("dlnest: error: no GPU available") and "--cpu" in err and out.strip() == "0"


def test_load_ext_does_not_import_torch(env):
    out, _ = shell("print('torch' in sys.modules)", env)
    assert out.strip() == "False"


def test_cli_is_a_full_client(tmp_path: Path, env):
    from conftest import cli

    project = new_project(tmp_path / "mnist", mnist=True)
    task_id = cli("submit", "-c", str(project / "root_config.json"), "-m", "1000", "--set", "epochs=40",
                  env=env).stdout.strip()
    assert task_id.startswith("T_")
    listing = cli("tasks", "--active", env=env).stdout
    assert task_id in listing and listing.splitlines()[0].split()[:3] == ["ID", "KIND", "STATUS"]
    gpus = cli("gpus", env=env).stdout
    assert "Simulated GPU 0" in gpus and "Simulated GPU 1" in gpus and task_id in gpus
    assert "cancelled" in cli("del", task_id, env=env).stdout
    assert "unknown task id" in cli("del", "T_zzz", env=env, check=False).stderr
