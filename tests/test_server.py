"""The jupyter_server extension against a real ``jupyter server`` on loopback with a token, real supervisors
and workers on simulated GPUs, and ``serve`` (the headless dispatcher). No kernel and no IPython anywhere:
whatever starts a queued task here is the server's (or serve's) dispatcher."""
from __future__ import annotations

import json
import secrets
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import requests

import dlnest_jupyter
from dlnest_jupyter import api
from dlnest_jupyter.scaffold import new_project

ROOT = Path(__file__).resolve().parents[1]
EXTENSION = "dlnest_jupyter"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """A ``jupyter server`` subprocess with the extension enabled, private config/runtime folders."""

    def __init__(self, root: Path, env: dict[str, str], name: str = "server"):
        self.root, self.token, self.port = root, secrets.token_hex(16), free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.api = f"{self.base}/dlnest/api"
        self.auth = {"Authorization": f"token {self.token}"}
        jupyter = root / f".jupyter-{name}"
        self.env = {**env, "JUPYTER_CONFIG_DIR": str(jupyter / "config"), "JUPYTER_RUNTIME_DIR": str(jupyter / "rt"),
                    "JUPYTER_DATA_DIR": str(jupyter / "data"), "JUPYTER_PLATFORM_DIRS": "1"}
        self.log_path = root / f"{name}.log"
        self.proc: subprocess.Popen | None = None

    def start(self, timeout: float = 60) -> "Server":
        cmd = [sys.executable, "-m", "jupyter_server", "--no-browser", "--allow-root", "--ServerApp.ip=127.0.0.1",
               f"--ServerApp.port={self.port}", "--ServerApp.port_retries=0", f"--ServerApp.root_dir={self.root}",
               f"--IdentityProvider.token={self.token}", f"--ServerApp.jpserver_extensions={EXTENSION}=True"]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(cmd, env=self.env, stdout=log, stderr=subprocess.STDOUT,
                                         stdin=subprocess.DEVNULL, cwd=self.root)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.proc.poll() is None, self.log()
            try:
                if requests.get(f"{self.api}/status", headers=self.auth, timeout=5).status_code == 200:
                    return self
            except requests.ConnectionError:
                pass
            time.sleep(0.2)
        raise AssertionError(f"server did not answer in {timeout} s\n{self.log()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")[-5000:] if self.log_path.exists() else ""

    def get(self, path: str, **kw) -> requests.Response:
        return requests.get(f"{self.api}/{path}", headers=self.auth, timeout=60, **kw)

    def post(self, path: str, body=None, **kw) -> requests.Response:
        return requests.post(f"{self.api}/{path}", headers=self.auth, json=body, timeout=60, **kw)

    def wait_status(self, task_id: str, wanted: tuple[str, ...], timeout: float = 180) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            task = self.get(f"tasks/{task_id}").json()
            if task["status"] in wanted:
                return task
            time.sleep(0.2)
        raise AssertionError(f"{task_id} still {task['status']} after {timeout} s\n{self.log()}")


@pytest.fixture
def server(tmp_path: Path, env):
    srv = Server(tmp_path, env)
    try:
        yield srv.start()
    finally:
        srv.stop()


@pytest.fixture
def no_local_dispatch(monkeypatch):
    """``api.submit`` in this test process only queues: nothing here dispatches (no kernel, no _kick)."""
    monkeypatch.setattr(api, "_wake", lambda: None)


def mnist_config(tmp_path: Path) -> str:
    """The MNIST example, named relative to the server's root_dir (tmp_path)."""
    project = tmp_path / "mnist"
    if not project.exists():
        new_project(project, mnist=True)
    return "mnist/root_config.json"


# -- authentication, XSRF, bad input ---------------------------------------------------------------------------
GETS = ["tasks", "tasks/T_x", "tasks/T_x/output", "devices", "events?timeout=0", "status", "openapi.json"]


def test_every_endpoint_needs_jupyter_auth_and_posts_need_xsrf(server):
    for path in GETS:
        assert requests.get(f"{server.api}/{path}", timeout=30).status_code in (401, 403), path
        assert requests.get(f"{server.api}/{path}", headers={"Authorization": "token wrong"},
                            timeout=30).status_code in (401, 403), path
    for path in ["tasks", "tasks/T_x/cancel"]:
        assert requests.post(f"{server.api}/{path}", json={}, timeout=30).status_code in (401, 403), path
    assert server.get("tasks").status_code == 200
    assert server.get("status").json()["dispatcher"]["running"] is True
    assert requests.get(f"{server.api}/tasks?token={server.token}", timeout=30).status_code == 200

    # a browser-like client: the login cookie and no token. jupyter_server checks XSRF on its unsafe methods
    # (token-authenticated requests are exempt: a browser cannot add the header cross-site)
    browser = requests.Session()
    assert browser.get(f"{server.base}/login", timeout=30).status_code == 200  # sets the _xsrf cookie
    assert browser.get(f"{server.api}/tasks", headers=server.auth, timeout=30).status_code == 200  # login cookie
    assert browser.get(f"{server.api}/tasks", timeout=30).status_code == 200  # the cookie alone authenticates
    refused = browser.post(f"{server.api}/tasks", json={}, timeout=30)
    assert refused.status_code == 403 and "_xsrf" in refused.json()["error"]
    assert browser.post(f"{server.api}/tasks/T_x/cancel", timeout=30).status_code == 403
    passed = browser.post(f"{server.api}/tasks", json={}, headers={"X-XSRFToken": browser.cookies["_xsrf"]},
                          timeout=30)
    assert passed.status_code == 400 and "config is required" in passed.json()["error"]  # past XSRF: validation


def test_bad_input_gets_a_clear_400_and_unknown_ids_404(server, tmp_path):
    config = mnist_config(tmp_path)
    cases = [
        ({}, "config is required"),
        ({"config": config, "memory_mb": 0}, "memory_mb must be a positive"),
        ({"config": config, "memory_mb": -5}, "memory_mb must be a positive"),
        ({"config": config, "memory_mb": "2000"}, "memory_mb must be a positive"),
        ({"config": config, "memory_mb": True}, "memory_mb must be a positive"),
        ({"config": config, "memory_mb": 10**6}, "can never fit"),  # api.submit's own DLNestError
        ({"config": config, "bogus": 1}, "unknown field(s) 'bogus'"),
        ({"config": config, "attached": True}, "unknown field(s) 'attached'"),
        ({"config": "missing/root_config.json"}, "is not a file"),
        ({"config": config, "overrides": "epochs=2"}, "overrides must be a list"),
        ({"config": config, "overrides": ["nonsense"]}, "nonsense"),
        ({"config": config, "cpu": "yes"}, "cpu must be true or false"),
        ({"config": config, "priority": 1.5}, "priority must be an integer"),
        ({"config": "a\x00b"}, "NUL"),
        ([config], "must be a JSON object"),
    ]
    for body, message in cases:
        r = server.post("tasks", body)
        assert r.status_code == 400 and message in r.json()["error"], (body, r.status_code, r.text)
    r = requests.post(f"{server.api}/tasks", data=b"{not json", headers=server.auth, timeout=30)
    assert r.status_code == 400 and "not JSON" in r.json()["error"]
    for path, message in [("tasks?status=bogus", "status 'bogus'"), ("tasks?limit=0", "limit must be"),
                          ("tasks?limit=x", "limit must be"), ("tasks?kind=x", "kind 'x'"),
                          ("tasks?before=-1", "before must be"), ("events?timeout=-1", "timeout must be"),
                          ("events?timeout=nan", "timeout must be"), ("events?cursor=garbage", "cursor must be")]:
        r = server.get(path)
        assert r.status_code == 400 and message in r.json()["error"], (path, r.text)
    for r in [server.get("tasks/T_nope"), server.get("tasks/T_nope/output"), server.post("tasks/T_nope/cancel")]:
        assert r.status_code == 404 and "unknown task id 'T_nope'" in r.json()["error"]
    assert server.get("tasks").json() == {"tasks": [], "next": None}  # nothing was created
    assert not (tmp_path / "mnist" / "Saves").exists()


# -- the queue over HTTP ------------------------------------------------------------------------------------------
def test_submit_run_output_cancel_and_events_over_http(server, tmp_path):
    config = mnist_config(tmp_path)
    first = server.get("events?timeout=0").json()
    assert first["reset"] is True
    cursor = first["cursor"]

    r = server.post("tasks", {"config": config, "memory_mb": 2000, "overrides": ["epochs=2"], "description": "short"})
    assert r.status_code == 201, r.text
    short = r.json()
    assert short["status"] in ("queued", "starting") and r.headers["Location"].endswith(f"/dlnest/api/tasks/{short['id']}")
    long = server.post("tasks", {"config": config, "memory_mb": 2000, "overrides": ["epochs=500"], "priority": 3}).json()

    # long-poll the events until the short task is done: every transition it made arrives, in order
    seen: list[str] = []
    deadline = time.monotonic() + 180
    while "done" not in seen and time.monotonic() < deadline:
        ev = server.get(f"events?cursor={cursor}&timeout=20").json()
        assert ev["reset"] is False
        cursor = ev["cursor"]
        seen += [t["status"] for t in ev["tasks"] if t["id"] == short["id"] and (not seen or seen[-1] != t["status"])]
    assert seen[-1] == "done" and "running" in seen, seen

    running = server.wait_status(long["id"], ("running",))
    assert running["placement"] and running["placement"][0].startswith("SIM-")
    devices = server.get("devices").json()
    assert [g["uuid"] for g in devices["gpus"]] == ["SIM-0", "SIM-1"]
    assert sum(long["id"] in g["tasks"] for g in devices["gpus"]) == 1 and devices["host"]["cpus"] >= 1
    r = server.post(f"tasks/{long['id']}/cancel")
    assert r.status_code == 200 and r.json()["status"] == "cancelled", r.text
    assert server.post(f"tasks/{long['id']}/cancel").json()["status"] == "cancelled"  # idempotent

    # output: whole, then incrementally in small chunks that join to the same text; nothing after the end
    whole = server.get(f"tasks/{short['id']}/output").json()
    assert whole["complete"] and "[dlnest] done:" in whole["text"] and whole["next_offset"] == whole["size"]
    text, offset = "", 0
    while True:
        part = server.get(f"tasks/{short['id']}/output", params={"offset": offset, "max_bytes": 700}).json()
        text += part["text"]
        offset = part["next_offset"]
        if part["complete"]:
            break
    assert text == whole["text"]
    tail = server.get(f"tasks/{short['id']}/output?offset={whole['size']}").json()
    assert tail["text"] == "" and tail["complete"]

    listing = server.get("tasks").json()
    assert [t["id"] for t in listing["tasks"]] == [long["id"], short["id"]]  # newest first
    assert [t["id"] for t in server.get("tasks?status=done").json()["tasks"]] == [short["id"]]
    assert [t["id"] for t in server.get("tasks?status=final&kind=train&limit=1").json()["tasks"]] == [long["id"]]
    page = server.get("tasks?limit=1").json()
    assert server.get(f"tasks?limit=1&before={page['next']}").json()["tasks"][0]["id"] == short["id"]
    assert api.ledger().get(short["id"])["status"] == "done"  # the ledger every kernel and the CLI read


def _dead_process() -> tuple[int, float]:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    started = psutil.Process(proc.pid).create_time()
    proc.wait()
    return proc.pid, started


def _fake_running_task(task_id: str) -> None:
    """A task whose supervisor was killed -9 a moment ago: its heartbeat is fresh, its process is gone."""
    pid, started = _dead_process()
    now = time.time()
    with api.ledger().transaction() as db:
        api.ledger().insert(db, {"id": task_id, "kind": "train", "status": "running", "request": {"cpu": True},
                                 "supervisor_pid": pid, "supervisor_started": started, "heartbeat": now,
                                 "created": now, "started": now, "placement": []})


def test_server_restart_keeps_the_queue_and_moves_it_without_any_kernel(tmp_path, env, monkeypatch,
                                                                          no_local_dispatch):
    """The device is full (an external load) while the first server runs: its tasks stay queued. It stops; a
    plain process queues one more (no kernel, nobody dispatching); a second server starts with the device free,
    fails at once the task whose supervisor died, and runs the whole queue."""
    config = mnist_config(tmp_path)
    monkeypatch.setenv("DLNEST_SIMULATED_GPUS", "16384")
    first = Server(tmp_path, {**env, "DLNEST_SIMULATED_GPUS": "16384", "DLNEST_SIMULATED_GPU_USED": "16384"}, "first")
    try:
        first.start()
        ids = [first.post("tasks", {"config": config, "memory_mb": 3000, "overrides": ["epochs=1"], "priority": p})
               .json()["id"] for p in (0, 5)]
        time.sleep(2.5)  # two dispatcher ticks at least
        assert [first.get(f"tasks/{i}").json()["status"] for i in ids] == ["queued", "queued"]
    finally:
        first.stop()

    ids.append(api.submit(tmp_path / config, memory_mb=3000, overrides=["epochs=1"]).id)
    _fake_running_task("T_dead01")
    time.sleep(1.5)
    assert [api.ledger().get(i)["status"] for i in ids] == ["queued"] * 3  # nothing dispatches meanwhile

    second = Server(tmp_path, {**env, "DLNEST_SIMULATED_GPUS": "16384"}, "second")
    try:
        t0 = time.monotonic()
        second.start()
        dead = second.wait_status("T_dead01", ("failed",), timeout=10)
        assert dead["error"] == "the task's supervisor died" and time.monotonic() - t0 < 30  # not the heartbeat timeout
        assert "T_dead01" in second.get("status").json()["dispatcher"]["reconciled_at_startup"]
        for task_id in ids:
            assert second.wait_status(task_id, ("done", "failed", "cancelled"))["status"] == "done", second.log()
        rows = {i: api.ledger().get(i) for i in ids}
        assert rows[ids[1]]["started"] <= rows[ids[0]]["started"]  # priority 5 was booked first
        assert set(second.get("status").json()["dispatcher"]["started"]) >= {ids[1], ids[2]}
        assert not [p for p in psutil.process_iter(["cmdline"]) if "ipykernel" in " ".join(p.info["cmdline"] or [])
                    and str(tmp_path) in " ".join(p.info["cmdline"] or [])]
    finally:
        second.stop()


def test_serve_dispatches_headless_and_stops_on_sigterm(tmp_path, env, no_local_dispatch):
    config = mnist_config(tmp_path)
    task = api.submit(tmp_path / config, cpu=True, overrides=["epochs=1"])
    _fake_running_task("T_dead02")
    assert task.status == "queued"
    code = "import sys; from dlnest_jupyter.server import serve; sys.exit(serve(0.5))"
    proc = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    try:
        assert task.wait(180) == "done"
        assert api.task("T_dead02").status == "failed"
    finally:
        proc.send_signal(signal.SIGTERM)
        out, _ = proc.communicate(timeout=30)
    assert proc.returncode == 0, out
    assert "T_dead02 failed: its supervisor died" in out and f"started {task.id}" in out and "stopped" in out


def test_output_chunks_never_split_a_character(tmp_path, env):
    """In-process: every max_bytes, every character arrives once, whole; a final file cut mid-character ends."""
    from dlnest_jupyter.server.extension import read_output

    package = tmp_path / "pkg"
    package.mkdir()
    text = "a é ✓ 数 🙂\n" * 20
    (package / "_output.txt").write_bytes(text.encode() + "🙂".encode()[:2])  # the writer died mid-character
    now = time.time()
    with api.ledger().transaction() as db:
        api.ledger().insert(db, {"id": "T_chunks", "kind": "train", "status": "running", "request": {"cpu": True},
                                 "package": str(package), "created": now})
    for max_bytes in (1, 2, 3, 5, 64):
        got, offset = "", 0
        while (part := read_output(api.ledger(), "T_chunks", offset, max_bytes))["next_offset"] > offset:
            got, offset = got + part["text"], part["next_offset"]
        assert got == text and not part["complete"], max_bytes  # the 2 stray bytes wait for the rest
    api.ledger().finish("T_chunks", "failed", error="killed")
    last = read_output(api.ledger(), "T_chunks", offset, 64)
    assert last["text"] == "\ufffd" and last["complete"] and last["next_offset"] == last["size"]


# -- the OpenAPI document -------------------------------------------------------------------------------------------
def test_openapi_document_matches_the_routes(server):
    from dlnest_jupyter.server.extension import ROUTES

    doc = server.get("openapi.json").json()
    assert doc["servers"] == [{"url": "/dlnest/api"}]
    documented = {p.strip("/") for p in doc["paths"]}
    routed = {p.replace("(?P<task_id>[^/]+)", "{task_id}").replace("\\.", ".") for p, _ in ROUTES}
    assert documented == routed


def test_schemathesis_finds_no_server_error(server, tmp_path):
    """Generated input for every operation must never get a 5xx. POST tasks is fuzzed too: a generated config
    never names a real file, so nothing is queued. The example task id of the document is a real (finished)
    task with multi-byte output, so task, output and cancel are exercised past the 404 too."""
    pytest.importorskip("schemathesis")
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "_output.txt").write_text("épochs ✓ 数据\n" * 50 + "tail é")
    now = time.time()
    with api.ledger().transaction() as db:
        api.ledger().insert(db, {"id": "T_1a2b3c", "kind": "train", "status": "done", "request": {"cpu": True},
                                 "package": str(package), "created": now, "started": now, "ended": now})
    doc = server.get("openapi.json").json()
    for param in doc["paths"]["/events"]["get"]["parameters"]:
        if param["name"] == "timeout":  # a long-poll may rightly wait 60 s: keep the fuzzing's waits short
            param.update(required=True, schema={"type": "number", "minimum": 0, "maximum": 1})
    schema = tmp_path / "openapi.json"
    schema.write_text(json.dumps(doc))
    cmd = [str(Path(sys.executable).with_name("schemathesis")), "run", str(schema), "--url", server.api,
           "-H", f"Authorization: token {server.token}", "--checks", "not_a_server_error",
           "--phases", "examples,coverage,fuzzing", "--max-examples", "40", "--workers", "1",
           "--request-timeout", "20", "--suppress-health-check", "all", "--no-color"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-3000:] + server.log()
    assert "9 selected / 9 total" in proc.stdout and " passed" in proc.stdout
    assert [t["id"] for t in server.get("tasks").json()["tasks"]] == ["T_1a2b3c"]  # the fuzzing queued nothing


# -- packaging ------------------------------------------------------------------------------------------------------
def test_the_config_file_enables_the_extension_by_package_name():
    data = json.loads((ROOT / "jupyter-config/jupyter_server_config.d/dlnest_jupyter.json").read_text())
    assert data == {"ServerApp": {"jpserver_extensions": {"dlnest_jupyter": True}}}
    from dlnest_jupyter import server

    assert server._jupyter_server_extension_points() == [{"module": "dlnest_jupyter.server"}]
    if not hasattr(dlnest_jupyter, "_jupyter_server_extension_points"):
        pytest.skip("dlnest_jupyter/__init__.py does not expose _jupyter_server_extension_points yet")
    assert dlnest_jupyter._jupyter_server_extension_points() == [{"module": "dlnest_jupyter.server"}]
