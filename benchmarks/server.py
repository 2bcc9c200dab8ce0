"""REST latency: GET /dlnest/api/tasks with 10,000 tasks in the ledger (goal: median <= 50 ms).

Set-up: a temporary DLNEST_HOME holding N_TASKS finished tasks (done/failed/cancelled, inserted with
Ledger.insert in one transaction: final tasks, so the server's dispatcher has nothing to start), and a real
``jupyter server`` on loopback with a token and the extension enabled. Each figure is the median (and p90) of
N_REQUESTS requests on one keep-alive connection, after WARMUP requests; side by side, the same query run
in-process (no HTTP, no JSON), so the HTTP/Jupyter overhead is visible.

Queries: the default page (newest 100), a status filter (``status=failed``, 900 matches, first 100), a
1000-task page (the largest ``limit``), and one task by id.
Wall-clock figures on a noisy 2-core machine: read them as orders of magnitude."""
from __future__ import annotations

import os
import secrets
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

N_TASKS, N_REQUESTS, WARMUP = 10_000, 50, 5
GOAL_S = 0.050


def _median_p90(xs: list[float]) -> tuple[float, float]:
    return statistics.median(xs), sorted(xs)[min(len(xs) - 1, int(0.9 * len(xs)))]


def fill(n: int) -> None:
    from dlnest_jupyter.api import ledger

    statuses = ["done"] * 90 + ["failed"] * 9 + ["cancelled"]
    now = time.time() - n
    with ledger().transaction() as db:
        for i in range(n):
            t = now + i
            ledger().insert(db, {
                "id": f"T_{i:06x}", "kind": "train", "status": statuses[i % 100], "priority": 0,
                "project": "/home/user/projects/my_mnist",
                "package": f"/home/user/projects/my_mnist/Saves/2026-01-01_00-00-00_{i:06x}",
                "config_hash": f"{i:016x}", "request": {"cpu": False, "memory_mb": 2000, "gpus": 1, "attached": None},
                "placement": ["SIM-0"], "description": f"run {i}", "exit_code": 0,
                "command": ["%dlnest_run", "-c", "my_mnist/root_config.json", "-m", "2000"],
                "created": t, "started": t + 1, "ended": t + 60, "heartbeat": t + 59,
            })


def timed(fn, n: int = N_REQUESTS) -> tuple[float, float]:
    for _ in range(WARMUP):
        fn()
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return _median_p90(times)


def main() -> int:
    import requests

    tmp = Path(tempfile.mkdtemp(prefix="dlnest-bench-server-"))
    os.environ.update(DLNEST_HOME=str(tmp / "home"), DLNEST_SIMULATED_GPUS="16384,16384")
    from dlnest_jupyter.api import ledger
    from dlnest_jupyter.server.extension import list_tasks

    t0 = time.perf_counter()
    fill(N_TASKS)
    print(f"ledger: {N_TASKS} tasks inserted in {time.perf_counter() - t0:.2f} s ({ledger().path})")

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    token = secrets.token_hex(16)
    env = {**os.environ, "JUPYTER_CONFIG_DIR": str(tmp / "jcfg"), "JUPYTER_RUNTIME_DIR": str(tmp / "jrt"),
           "JUPYTER_DATA_DIR": str(tmp / "jdata")}
    log = open(tmp / "server.log", "wb")
    proc = subprocess.Popen([sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root",
                             "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}", "--ServerApp.port_retries=0",
                             f"--ServerApp.root_dir={tmp}", f"--IdentityProvider.token={token}",
                             "--ServerApp.jpserver_extensions=dlnest_jupyter.server=True"],
                            env=env, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    api = f"http://127.0.0.1:{port}/dlnest/api"
    http = requests.Session()
    http.headers["Authorization"] = f"token {token}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                if http.get(f"{api}/status", timeout=5).status_code == 200:
                    break
            except requests.ConnectionError:
                pass
            if time.monotonic() > deadline or proc.poll() is not None:
                print((tmp / "server.log").read_text()[-3000:])
                return 1
            time.sleep(0.2)

        def get(path: str, expect: int) -> None:
            r = http.get(f"{api}/{path}", timeout=30)
            assert r.status_code == 200 and len(r.json().get("tasks", [None])) == expect, (path, r.text[:200])

        db = ledger()
        rows = [
            ("GET tasks (default page: 100)", lambda: get("tasks", 100),
             lambda: list_tasks(db)),
            ("GET tasks?status=failed (first 100)", lambda: get("tasks?status=failed", 100),
             lambda: list_tasks(db, ("failed",))),
            ("GET tasks?limit=1000", lambda: get("tasks?limit=1000", 1000),
             lambda: list_tasks(db, limit=1000)),
            ("GET tasks/{id}", lambda: get("tasks/T_000123", 1),
             lambda: db.get("T_000123")),
        ]
        print(f"{'query':40s} {'HTTP median':>12s} {'p90':>9s} {'in-process':>11s} {'HTTP/in-proc':>12s} "
              f"{'goal ratio':>10s}")
        for name, over_http, in_process in rows:
            med, p90 = timed(over_http)
            local, _ = timed(in_process)
            print(f"{name:40s} {med * 1e3:9.2f} ms {p90 * 1e3:6.2f} ms {local * 1e3:8.2f} ms {med / local:11.1f}x "
                  f"{med / GOAL_S:9.2f}x")
        old_api = ledger().tasks(limit=100)
        med, _ = timed(lambda: ledger().tasks(limit=100))
        print(f"(reference: Ledger.tasks(limit=100) in-process {med * 1e3:.2f} ms, {len(old_api)} rows; "
              f"goal ratio = HTTP median / {GOAL_S * 1e3:.0f} ms, <= 1 meets the goal)")
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
