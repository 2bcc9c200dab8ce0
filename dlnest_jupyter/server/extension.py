"""REST API under ``/dlnest/api/`` and a dispatcher in the server's event loop.

Every handler is a Jupyter ``APIHandler``: ``@web.authenticated`` (token or login cookie) and ``@authorized``
on the resource ``dlnest`` (so a custom Authorizer can restrict it); tornado's XSRF check guards every unsafe
method of a cookie-authenticated request (jupyter_server exempts token-authenticated ones: a token cannot be
sent cross-site by a browser). Errors are JSON ``{"error": message}``: 400 for bad input (including every
``DLNestError``), 404 for an unknown task.

Nothing blocking runs on the event loop: ledger queries, ``api.submit`` (which snapshots the code),
``api.cancel`` (which waits for the task to end) run on a thread pool, and ``dispatch_once`` (which may spawn
supervisors) on a thread of its own, so a slow request never delays the queue and vice versa.

``GET events`` is a long-poll: the dispatcher's tick also diffs the ledger's active tasks and appends every
change to a numbered in-memory log; a client passes back the ``cursor`` it was given and gets the tasks that
changed after it, waiting up to ``timeout`` seconds for one. ``reset: true`` means the cursor is unusable
(none given, another server's, or too old): reload ``GET tasks`` and poll on with the new cursor."""
from __future__ import annotations

import asyncio
import codecs
import collections
import json
import logging
import math
import os
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from importlib import resources
from pathlib import Path
from typing import Any, Callable

from jupyter_server.auth.decorator import authorized
from jupyter_server.base.handlers import APIHandler
from jupyter_server.utils import url_path_join
from tornado import web

from .. import api, devices
from ..errors import DLNestError
from ..ledger import ACTIVE, FINAL, JSON_COLUMNS, Ledger
from ..scheduler import dispatch_once
from ..scheduler import reconcile_at_startup

log = logging.getLogger("dlnest_jupyter.server")

SETTINGS_KEY = "dlnest"
RESOURCE = "dlnest"
KINDS = ("train", "continue", "analyze")
PUBLIC = ("id", "seq", "kind", "status", "priority", "project", "package", "config_hash", "request", "placement",
          "supervisor_pid", "worker_pid", "heartbeat", "exit_code", "error", "cancel_requested", "description",
          "command", "created", "started", "ended", "slurm_job_id")
DEFAULT_LIMIT, MAX_LIMIT = 100, 1000
DEFAULT_CHUNK, MAX_CHUNK = 1 << 20, 8 << 20
MAX_EVENT_WAIT_S = 60.0
INT_BOUND = 2**31  # SQLite stores 64-bit ints; anything near that is a typo or a fuzzer, never a request
SUBMIT_FIELDS = ("config", "freq", "overrides", "description", "cpu", "memory_mb", "priority")


def task_json(row: Any) -> dict[str, Any]:
    """The public view of a ledger row (sqlite3.Row or dict); JSON columns decoded."""
    out = {}
    for key in PUBLIC:
        value = row[key]
        if key in JSON_COLUMNS and isinstance(value, str):
            value = json.loads(value)
        out[key] = bool(value) if key == "cancel_requested" else value
    return out


def _bad(message: str, status: int = 400) -> web.HTTPError:
    return web.HTTPError(status, "%s", message)  # "%s": a message holding "%" must not break tornado's log


# -- blocking work (thread pool) ---------------------------------------------------------------------------
def list_tasks(ledger: Ledger, statuses: tuple[str, ...] = (), kinds: tuple[str, ...] = (),
               before: int | None = None, limit: int = DEFAULT_LIMIT) -> dict[str, Any]:
    """Newest first, ``limit`` at a time; ``next`` is the ``before`` cursor of the following page."""
    where, params = [], []
    if statuses:
        where.append(f"status IN ({', '.join('?' * len(statuses))})")
        params += statuses
    if kinds:
        where.append(f"kind IN ({', '.join('?' * len(kinds))})")
        params += kinds
    if before is not None:
        where.append("seq < ?")
        params.append(before)
    sql = "SELECT * FROM tasks" + (f" WHERE {' AND '.join(where)}" if where else "") + " ORDER BY seq DESC LIMIT ?"
    rows = [task_json(r) for r in ledger.db.execute(sql, [*params, limit])]
    return {"tasks": rows, "next": rows[-1]["seq"] if len(rows) == limit else None}


def get_task(ledger: Ledger, task_id: str) -> dict[str, Any]:
    row = ledger.get(task_id)
    if row is None:
        raise _bad(f"unknown task id {task_id!r}", 404)
    return task_json(row)


def read_output(ledger: Ledger, task_id: str, offset: int, max_bytes: int) -> dict[str, Any]:
    """Up to ``max_bytes`` of the task's output from byte ``offset``; ``next_offset`` never splits a UTF-8
    character, so a client that always passes it back sees every character exactly once."""
    from ..tails import output_file

    task = get_task(ledger, task_id)
    path = output_file(Path(task["package"]), task_id) if task["package"] else None
    size = path.stat().st_size if path is not None and path.exists() else 0
    start = min(offset, size)
    data = b""
    if start < size:
        with open(path, "rb") as fh:
            fh.seek(start)
            data = fh.read(max(max_bytes, 4))  # 4 bytes always hold a whole character: progress is guaranteed
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    text = decoder.decode(data, final=False)
    pending = len(decoder.getstate()[0])
    if pending and start + len(data) >= size and task["status"] in FINAL:
        text, pending = text + decoder.decode(b"", final=True), 0  # the file ends mid-character: it never completes
    end = start + len(data) - pending
    return {"task_id": task_id, "status": task["status"], "offset": start, "next_offset": end, "size": size,
            "text": text, "complete": task["status"] in FINAL and end >= size}


def submit(root_dir: Path, body: dict[str, Any]) -> dict[str, Any]:
    """``api.submit`` with paths relative to the server's root_dir (as notebooks' paths are; no ``~``).

    Any file the user can read may be named: an authenticated user runs code as the server's user anyway."""
    paths = {}
    for key in ("config", "freq"):
        if body.get(key) is None:
            continue
        path = root_dir / body[key]
        try:
            is_file = path.is_file()
        except OSError as exc:  # a name too long, a permission denied on the way
            raise DLNestError(f"{key} {body[key]!r}: {exc.strerror or exc}") from None
        if not is_file:
            raise DLNestError(f"{key} {body[key]!r} is not a file (relative paths start at {root_dir})")
        paths[key] = path
    try:
        task = api.submit(paths["config"], freq=paths.get("freq"), overrides=body.get("overrides", []),
                          description=body.get("description", ""), cpu=body.get("cpu", False),
                          memory_mb=body.get("memory_mb"), priority=body.get("priority", 0),
                          command=["POST /dlnest/api/tasks", str(paths["config"])])
    except OSError as exc:  # an unreadable project file; the message names it
        raise DLNestError(f"cannot submit {paths['config']}: {exc}") from None
    return task_json(api.ledger().get(task.id))


def cancel(task_id: str) -> dict[str, Any]:
    get_task(api.ledger(), task_id)
    api.cancel(task_id)
    return task_json(api.ledger().get(task_id))


def device_listing(ledger: Ledger) -> dict[str, Any]:
    reserved: dict[str, int] = {}
    for r in ledger.reservations():
        reserved[r["device"]] = reserved.get(r["device"], 0) + r["memory_mb"]
    holders: dict[str, list[str]] = {}
    for t in ledger.tasks(ACTIVE):
        for uuid_ in t["placement"] or []:
            holders.setdefault(uuid_, []).append(t["id"])
    gpus = [{**g.as_dict(), "reserved_mb": reserved.get(g.uuid, 0),
             "free_mb": g.total_mb - g.used_mb - reserved.get(g.uuid, 0), "tasks": holders.get(g.uuid, [])}
            for g in devices.gpus()]
    return {"gpus": gpus, "host": devices.host(), "note": None if gpus else devices.no_gpu_message()}


# -- input validation --------------------------------------------------------------------------------------
def _text(name: str, value: Any, limit: int = 4096) -> str:
    if not isinstance(value, str):
        raise _bad(f"{name} must be a string")
    if "\x00" in value or len(value) > limit:
        raise _bad(f"{name} must be at most {limit} characters without NUL bytes")
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        raise _bad(f"{name} is not valid Unicode (lone surrogate)") from None
    return value


def _int(name: str, value: Any, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise _bad(f"{name} must be an integer from {low} to {high}, got {json.dumps(value)[:80]}")
    return value


def validate_submit(raw: bytes) -> dict[str, Any]:
    """The POST tasks body: the keyword arguments of ``api.submit`` (``attached`` excepted: it would tie the
    task to the server process)."""
    try:
        body = json.loads(raw or b"null")
    except (ValueError, UnicodeDecodeError) as exc:
        raise _bad(f"the body is not JSON: {exc}") from None
    if not isinstance(body, dict):
        raise _bad('the body must be a JSON object such as {"config": "my_mnist/root_config.json"}')
    unknown = sorted(set(body) - set(SUBMIT_FIELDS))
    if unknown:
        raise _bad(f"unknown field(s) {', '.join(map(repr, unknown))}; known: {', '.join(SUBMIT_FIELDS)}")
    if "config" not in body:
        raise _bad("config is required: the project's root_config.json (relative to the server's root_dir)")
    out: dict[str, Any] = {"config": _text("config", body["config"])}
    if not out["config"]:
        raise _bad("config must not be empty")
    if body.get("freq") is not None:
        out["freq"] = _text("freq", body["freq"]) or None
    overrides = body.get("overrides", [])
    if not isinstance(overrides, list) or len(overrides) > 256:
        raise _bad('overrides must be a list of "key=value" strings (at most 256)')
    out["overrides"] = [_text("each override", o) for o in overrides]
    out["description"] = _text("description", body.get("description", ""))
    cpu = body.get("cpu", False)
    if not isinstance(cpu, bool):
        raise _bad("cpu must be true or false")
    out["cpu"] = cpu
    if body.get("memory_mb") is not None:
        mb = body["memory_mb"]
        if isinstance(mb, bool) or not isinstance(mb, int) or mb <= 0:
            raise _bad(f"memory_mb must be a positive number of MiB, got {json.dumps(mb)[:80]}")
        out["memory_mb"] = _int("memory_mb", mb, 1, INT_BOUND)
    out["priority"] = _int("priority", body.get("priority", 0), -INT_BOUND, INT_BOUND)
    return out


# -- change feed (GET events) -------------------------------------------------------------------------------
def _fingerprint(row: Any) -> tuple:
    """What a client cares about; heartbeats (every 2 s per running task) are deliberately not a change."""
    return (row["status"], row["placement"], row["exit_code"], row["error"], row["cancel_requested"],
            row["supervisor_pid"], row["worker_pid"], row["priority"])


class ChangeFeed:
    """Task changes as a numbered log. ``scan`` runs on the dispatcher's thread, everything else on the loop."""

    KEEP = 5000

    def __init__(self) -> None:
        self.epoch = uuid.uuid4().hex[:8]
        self.seq = 0
        self.log: collections.deque[tuple[int, dict[str, Any]]] = collections.deque(maxlen=self.KEEP)
        self._watched: dict[str, tuple] = {}  # active task id -> fingerprint (dispatcher thread only)
        self._max_row: int | None = None
        self._changed: asyncio.Event | None = None

    @property
    def cursor(self) -> str:
        return f"{self.epoch}-{self.seq}"

    def scan(self, ledger: Ledger) -> list[dict[str, Any]]:
        """The tasks that changed since the last scan: every active or newly created row, plus the rows that
        were active last time (they may have ended). Costs O(active tasks), not O(ledger)."""
        db = ledger.db
        first = self._max_row is None
        if first:
            self._max_row = db.execute("SELECT COALESCE(MAX(seq), 0) FROM tasks").fetchone()[0]
        marks = ", ".join("?" * len(ACTIVE))
        rows = list(db.execute(f"SELECT * FROM tasks WHERE status IN ({marks}) OR seq > ?", [*ACTIVE, self._max_row]))
        seen = {r["id"] for r in rows}
        for task_id in [i for i in self._watched if i not in seen]:
            row = db.execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if row is not None:
                rows.append(row)
        changed, watched = [], {}
        for row in rows:
            fp = _fingerprint(row)
            if not first and self._watched.get(row["id"]) != fp:
                changed.append(task_json(row))
            if row["status"] in ACTIVE:
                watched[row["id"]] = fp
            self._max_row = max(self._max_row, row["seq"])
        self._watched = watched
        return changed

    def publish(self, changes: list[dict[str, Any]]) -> None:
        for task in changes:
            self.seq += 1
            self.log.append((self.seq, task))
        if changes and self._changed is not None:
            self._changed.set()
            self._changed = asyncio.Event()

    async def since(self, cursor: str | None, timeout: float) -> dict[str, Any]:
        if self._changed is None:
            self._changed = asyncio.Event()
        position = None
        if cursor:
            epoch, _, number = cursor.partition("-")
            if not number.isdigit() or len(epoch) != 8:
                raise _bad("cursor must be a value returned by GET events (or absent)")
            position = int(number) if epoch == self.epoch else None
        oldest = self.log[0][0] if self.log else self.seq + 1
        if position is None or position > self.seq or position < oldest - 1:
            return {"cursor": self.cursor, "reset": True, "tasks": []}
        if position == self.seq and timeout > 0:
            try:
                await asyncio.wait_for(self._changed.wait(), timeout)
            except asyncio.TimeoutError:
                pass
        latest: dict[str, dict[str, Any]] = {}
        for number, task in self.log:
            if number > position:
                latest.pop(task["id"], None)
                latest[task["id"]] = task  # one entry per task, its newest state, in order of last change
        return {"cursor": self.cursor, "reset": False, "tasks": list(latest.values())}


# -- the dispatcher ----------------------------------------------------------------------------------------
class ServerDispatcher:
    """``dispatch_once`` every ``poll_s`` (or at once when a submission wakes it) on a dedicated thread."""

    def __init__(self, ledger: Ledger, poll_s: float = 1.0):
        self.ledger, self.poll_s = ledger, poll_s
        self.feed = ChangeFeed()
        self.thread = ThreadPoolExecutor(1, thread_name_prefix="dlnest-dispatch")
        self.last_error: str | None = None
        self.last_tick: float | None = None
        self.started: list[str] = []  # ids this server started (newest last, bounded)
        self.reconciled: list[str] = []
        self._wake: asyncio.Event | None = None
        self._task: asyncio.Task | None = None

    def _tick(self) -> tuple[list[str], list[dict[str, Any]]]:
        return dispatch_once(self.ledger), self.feed.scan(self.ledger)

    def _startup(self) -> list[str]:
        failed = reconcile_at_startup(self.ledger)
        self.feed.scan(self.ledger)  # the baseline: what exists now is not a change
        return failed

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        self._wake = asyncio.Event()

        def wake() -> None:  # called from the pool's threads (api.submit's _kick)
            try:
                loop.call_soon_threadsafe(self._wake.set)
            except RuntimeError:  # the loop is closing
                pass

        api.set_waker(wake)
        try:
            self.reconciled = await loop.run_in_executor(self.thread, self._startup)
            for task_id in self.reconciled:
                log.warning("dlnest: %s failed: its supervisor died", task_id)
        except Exception as exc:
            self.last_error = f"start-up reconcile: {type(exc).__name__}: {exc}"
            log.exception("dlnest: start-up reconcile failed")
        while True:
            try:
                started, changes = await loop.run_in_executor(self.thread, self._tick)
                self.started = (self.started + started)[-100:]
                self.feed.publish(changes)
                self.last_error, self.last_tick = None, time.time()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a locked or full disk must not end the loop
                if f"{type(exc).__name__}: {exc}" != self.last_error:
                    log.warning("dlnest: dispatch error: %s: %s", type(exc).__name__, exc)
                self.last_error = f"{type(exc).__name__}: {exc}"
            try:
                await asyncio.wait_for(self._wake.wait(), self.poll_s)
            except asyncio.TimeoutError:
                pass
            self._wake.clear()

    def start(self) -> None:
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self.run())

    def status(self) -> dict[str, Any]:
        return {"running": self._task is not None and not self._task.done(), "poll_s": self.poll_s,
                "last_tick": self.last_tick, "last_error": self.last_error, "started": self.started,
                "reconciled_at_startup": self.reconciled}


class State:
    """What the handlers share, kept in the tornado settings under ``dlnest``."""

    def __init__(self, root_dir: Path, base_url: str):
        self.root_dir, self.base_url = root_dir, base_url
        self.pool = ThreadPoolExecutor(8, thread_name_prefix="dlnest-api")
        self.dispatcher = ServerDispatcher(api.ledger(), float(os.environ.get("DLNEST_SERVER_POLL_S", "1.0")))


# -- handlers ------------------------------------------------------------------------------------------------
class DLNestHandler(APIHandler):
    auth_resource = RESOURCE

    @property
    def state(self) -> State:
        return self.settings[SETTINGS_KEY]

    async def blocking(self, fn: Callable, *args: Any, **kwargs: Any) -> Any:
        """Run ``fn`` on the pool; a ``DLNestError`` becomes a 400 with its one line."""
        try:
            return await asyncio.get_running_loop().run_in_executor(self.state.pool, partial(fn, *args, **kwargs))
        except DLNestError as exc:
            raise _bad(str(exc)) from None

    def reply(self, obj: Any, status: int = 200) -> None:
        self.set_status(status)
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(obj))

    def write_error(self, status_code: int, **kwargs: Any) -> None:
        """``{"error": message}`` (plus jupyter's ``message`` key, so generic Jupyter clients read it too)."""
        exc = kwargs.get("exc_info", (None, None, None))[1]
        if isinstance(exc, web.HTTPError) and exc.log_message:
            message = exc.log_message % exc.args if exc.args else exc.log_message
        elif isinstance(exc, web.HTTPError) or exc is None:
            message = self._reason
        else:
            message = f"internal error ({type(exc).__name__}); see the server's log"
        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps({"error": message, "message": message}))

    def query_int(self, name: str, default: int | None, low: int, high: int) -> int | None:
        raw = self.get_query_argument(name, None)
        if raw is None or raw == "":
            return default
        try:
            value = int(raw)
        except ValueError:
            raise _bad(f"{name} must be an integer from {low} to {high}, got {raw[:80]!r}") from None
        return _int(name, value, low, high)

    def query_list(self, name: str, allowed: tuple[str, ...]) -> tuple[str, ...]:
        values = [v.strip() for raw in self.get_query_arguments(name) for v in raw.split(",") if v.strip()]
        expanded = []
        for v in values:
            expanded += {"active": list(ACTIVE), "final": list(FINAL)}.get(v, [v]) if name == "status" else [v]
        bad = [v for v in expanded if v not in allowed]
        if bad:
            raise _bad(f"{name} {bad[0][:80]!r} is not one of {', '.join(allowed)}")
        return tuple(dict.fromkeys(expanded))


class TasksHandler(DLNestHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        statuses = self.query_list("status", ACTIVE + FINAL + ("active", "final"))
        kinds = self.query_list("kind", KINDS)
        before = self.query_int("before", None, 1, 2**62)
        limit = self.query_int("limit", DEFAULT_LIMIT, 1, MAX_LIMIT)
        self.reply(await self.blocking(list_tasks, api.ledger(), statuses, kinds, before, limit))

    @web.authenticated
    @authorized
    async def post(self) -> None:
        body = validate_submit(self.request.body)
        task = await self.blocking(submit, self.state.root_dir, body)
        self.set_header("Location", url_path_join(self.state.base_url, "dlnest/api/tasks", task["id"]))
        self.reply(task, 201)


class TaskHandler(DLNestHandler):
    @web.authenticated
    @authorized
    async def get(self, task_id: str) -> None:
        self.reply(await self.blocking(get_task, api.ledger(), task_id))


class OutputHandler(DLNestHandler):
    @web.authenticated
    @authorized
    async def get(self, task_id: str) -> None:
        offset = self.query_int("offset", 0, 0, 2**62)
        max_bytes = self.query_int("max_bytes", DEFAULT_CHUNK, 1, MAX_CHUNK)
        self.reply(await self.blocking(read_output, api.ledger(), task_id, offset, max_bytes))


class CancelHandler(DLNestHandler):
    @web.authenticated
    @authorized
    async def post(self, task_id: str) -> None:
        self.reply(await self.blocking(cancel, task_id))


class DevicesHandler(DLNestHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        self.reply(await self.blocking(device_listing, api.ledger()))


class EventsHandler(DLNestHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        raw = self.get_query_argument("timeout", None)
        try:
            timeout = 25.0 if raw in (None, "") else float(raw)
        except ValueError:
            timeout = math.nan
        if not 0 <= timeout <= MAX_EVENT_WAIT_S:  # also rejects nan
            raise _bad(f"timeout must be a number of seconds from 0 to {MAX_EVENT_WAIT_S:g}")
        cursor = self.get_query_argument("cursor", None)
        if cursor is not None:
            _text("cursor", cursor, 64)
        self.reply(await self.state.dispatcher.feed.since(cursor, timeout))


class StatusHandler(DLNestHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        from .. import __version__

        self.reply({"version": __version__, "ledger": str(api.ledger().path), "pid": os.getpid(),
                    "dispatcher": self.state.dispatcher.status()})


class OpenAPIHandler(DLNestHandler):
    @web.authenticated
    @authorized
    async def get(self) -> None:
        doc = openapi_document()
        doc["servers"] = [{"url": url_path_join(self.state.base_url, "dlnest/api")}]
        self.reply(doc)


def openapi_document() -> dict[str, Any]:
    return json.loads((resources.files("dlnest_jupyter.server") / "openapi.json").read_text())


ROUTES = [
    (r"tasks", TasksHandler),
    (r"tasks/(?P<task_id>[^/]+)", TaskHandler),
    (r"tasks/(?P<task_id>[^/]+)/output", OutputHandler),
    (r"tasks/(?P<task_id>[^/]+)/cancel", CancelHandler),
    (r"devices", DevicesHandler),
    (r"events", EventsHandler),
    (r"status", StatusHandler),
    (r"openapi\.json", OpenAPIHandler),
]


def load(serverapp: Any) -> None:
    """Add the handlers; idempotent, since the extension may be enabled under two names
    (``dlnest_jupyter`` by the installed config file, ``dlnest_jupyter.server`` by hand)."""
    web_app = serverapp.web_app
    if SETTINGS_KEY in web_app.settings:
        return
    base_url = web_app.settings.get("base_url", "/")
    web_app.settings[SETTINGS_KEY] = State(Path(serverapp.root_dir).expanduser().resolve(), base_url)
    web_app.add_handlers(".*$", [(url_path_join(base_url, "dlnest/api", p) + "/?$", h) for p, h in ROUTES])
    serverapp.log.info("dlnest_jupyter: REST API at %s, ledger %s", url_path_join(base_url, "dlnest/api/"),
                       api.ledger().path)


async def start(serverapp: Any) -> None:
    state = serverapp.web_app.settings.get(SETTINGS_KEY)
    if state is not None:
        state.dispatcher.start()
