"""Talking to analyzer sessions: each is an IPython kernel, so this is a Jupyter messaging client.

Any process of the user (a notebook kernel, a restarted one, a terminal) can connect through the session's
connection file, which the ledger names; the kernel runs one request at a time and queues the rest."""
from __future__ import annotations

import sys
import time
from typing import Any, Callable, TextIO

from . import api
from .errors import DLNestError

READY_TIMEOUT_S = 600.0
_clients: dict[str, Any] = {}
current: str | None = None  #: the session %runExp and %%dlnest_exp use when no id is given


def start(record_path: str, *, ckpt: int | None = None, cpu: bool = False, memory_mb: int | None = None,
          attached: bool = False, command: list[str] | None = None) -> api.Task:
    """Queue an analyzer session for a package; it becomes this process's current session."""
    global current
    task = api.analyze_session(record_path, ckpt=ckpt, cpu=cpu, memory_mb=memory_mb, attached=attached,
                               command=command)
    current = task.id
    return task


def resolve(task_id: str | None) -> str:
    if task_id is None:
        if current is None:
            raise DLNestError("no current analyzer session: start one with %dlnest_analyze -r PKG, or name one (A_...)")
        return current
    if not task_id.startswith("A_"):
        raise DLNestError(f"{task_id} is not an analyzer session (their ids start with A_)")
    api.task(task_id)  # unknown ids are a clear error
    return task_id


def _wait_ready(task_id: str, notify: Callable[[str], None]) -> str:
    """The session's connection file, once its kernel listens (loading a model can take a while)."""
    deadline, told = time.monotonic() + READY_TIMEOUT_S, False
    while True:
        row = api.task(task_id).row
        if row["status"] in ("done", "failed", "cancelled"):
            raise DLNestError(f"session {task_id} is {row['status']}" + (f": {row['error']}" if row["error"] else ""))
        if row["endpoint"]:
            return row["endpoint"]
        if not told:
            notify(f"waiting for {task_id} to load its package...")
            told = True
        if time.monotonic() > deadline:
            raise DLNestError(f"session {task_id} did not start within {READY_TIMEOUT_S:.0f} s")
        time.sleep(0.05)


def client(task_id: str, notify: Callable[[str], None] = lambda m: print(m, file=sys.stderr)) -> Any:
    """A connected client for the session (cached per process; re-made if the session was replaced)."""
    from jupyter_client import BlockingKernelClient

    endpoint = _wait_ready(task_id, notify)
    kc = _clients.get(task_id)
    if kc is not None and kc.connection_file == endpoint:
        return kc
    kc = BlockingKernelClient(connection_file=endpoint)
    try:
        kc.load_connection_file()
    except OSError as exc:
        raise DLNestError(f"cannot read session {task_id}'s connection file: {exc.strerror}") from None
    kc.start_channels()
    try:
        kc.wait_for_ready(timeout=30)
    except RuntimeError:
        kc.stop_channels()
        raise DLNestError(f"session {task_id} does not answer (ended, or its key does not match)") from None
    _clients[task_id] = kc
    return kc


def _publish(content: dict[str, Any], out: TextIO, rich: bool) -> None:
    if rich:
        from IPython.display import publish_display_data

        publish_display_data(data=content["data"], metadata=content.get("metadata", {}))
        return
    data = content["data"]
    out.write(data["text/plain"] + "\n" if "text/plain" in data and len(data) == 1
              else f"[{', '.join(sorted(data))}]\n" if "text/plain" not in data
              else data["text/plain"] + f"  [{', '.join(sorted(k for k in data if k != 'text/plain'))}]\n")


def execute(task_id: str | None, code: str, *, rich: bool = True, out: TextIO | None = None,
            err: TextIO | None = None) -> dict[str, Any]:
    """Run ``code`` in the session, streaming its output, figures and last value here as they come.

    ``rich`` publishes display data into the notebook; otherwise figures are named in the text output.
    Returns ``{"status": "ok"|"error", "result": <data of the last expression or None>}``."""
    task_id = resolve(task_id)
    out, err = out or sys.stdout, err or sys.stderr
    kc = client(task_id, notify=lambda m: print(m, file=err))
    msg_id = kc.execute(code, allow_stdin=False)
    result, status = None, "ok"
    while True:
        try:
            msg = kc.get_iopub_msg(timeout=1.0)
        except KeyboardInterrupt:  # Ctrl-C / the notebook's stop button: interrupt the session's cell too
            _interrupt(task_id)
            raise
        except Exception:  # queue.Empty: check the session is still alive, then keep listening
            if api.task(task_id).status != "running":
                raise DLNestError(f"session {task_id} ended while running this request") from None
            continue
        if msg["parent_header"].get("msg_id") != msg_id:
            continue
        kind, content = msg["msg_type"], msg["content"]
        if kind == "stream":
            (out if content["name"] == "stdout" else err).write(content["text"])
        elif kind in ("display_data", "update_display_data"):
            _publish(content, out, rich)
        elif kind == "execute_result":
            result = content["data"]
            _publish(content, out, rich)
        elif kind == "error":
            status = "error"
            err.write("\n".join(content["traceback"]) + "\n")
        elif kind == "status" and content["execution_state"] == "idle":
            break
    out.flush()
    err.flush()
    return {"status": status, "result": result}


def _interrupt(task_id: str) -> None:
    """SIGINT to the session's kernel: ipykernel turns it into KeyboardInterrupt in the running cell."""
    import os
    import signal

    from .scheduler import process_alive

    row = api.task(task_id).row
    if process_alive(row["worker_pid"], row["worker_started"]):
        os.kill(row["worker_pid"], signal.SIGINT)


def run_experiment(task_id: str | None, name: str, **kwargs: Any) -> dict[str, Any]:
    """``%runExp``: ``experience(self)`` of ``AnalyzeScripts/NAME.py`` inside the session."""
    if not name.replace("_", "").replace("-", "").replace(".", "").replace("/", "").isalnum():
        raise DLNestError(f"not a script name: {name!r}")
    return execute(task_id, f"__dlnest_exp__({name!r})", **kwargs)
