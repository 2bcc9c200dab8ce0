"""The panel in a real IPython kernel, read and driven through the Jupyter widget protocol as a front end
would: model states are rebuilt from comm_open/comm_msg, clicks and selections are sent as comm messages."""
from __future__ import annotations

import os
import queue
import re
import time
from pathlib import Path
from typing import Any, Callable

import pytest
from conftest import kernel_client

from dlnest_jupyter.scaffold import new_project

IPYKERNEL6 = Path(__file__).resolve().parents[1] / "build" / "ipykernel6"


class Frontend:
    """Just enough of a widget front end: it mirrors every model's state and sends events."""

    def __init__(self, kc: Any):
        self.kc = kc
        self.models: dict[str, dict[str, Any]] = {}
        self.closed: set[str] = set()
        self.updates: list[tuple[float, str, str]] = []  #: (time, comm id, parent msg id) of kernel updates
        self.displayed: list[tuple[str, str]] = []  #: (model id, parent msg id) of displays

    def execute(self, code: str) -> str:
        msg_id = self.kc.execute(code)
        while True:
            reply = self.kc.get_shell_msg(timeout=120)
            if reply["parent_header"].get("msg_id") == msg_id:
                assert reply["content"]["status"] == "ok", reply["content"]
                return msg_id

    def drain(self, seconds: float) -> None:
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                msg = self.kc.get_iopub_msg(timeout=max(0.01, end - time.monotonic()))
            except queue.Empty:
                return
            self._take(msg)

    def _take(self, msg: dict[str, Any]) -> None:
        kind, content = msg["msg_type"], msg["content"]
        if kind == "comm_open" and content.get("target_name") == "jupyter.widget":
            self.models[content["comm_id"]] = dict(content["data"]["state"])
        elif kind == "comm_msg" and content["comm_id"] in self.models:
            data = content["data"]
            if data.get("method") in ("update", "echo_update"):
                self.models[content["comm_id"]].update(data["state"])
                self.updates.append((time.monotonic(), content["comm_id"], msg["parent_header"].get("msg_id")))
        elif kind == "comm_close":
            self.closed.add(content["comm_id"])
        elif kind == "display_data" and "application/vnd.jupyter.widget-view+json" in content["data"]:
            view = content["data"]["application/vnd.jupyter.widget-view+json"]
            self.displayed.append((view["model_id"], msg["parent_header"].get("msg_id")))
        elif kind == "error":
            raise AssertionError("\n".join(content["traceback"]))

    def wait(self, predicate: Callable[[], Any], timeout: float = 180, what: str = "") -> Any:
        deadline = time.monotonic() + timeout
        while not (result := predicate()):
            assert time.monotonic() < deadline, f"timed out waiting for {what}"
            self.drain(0.2)
        return result

    def find(self, dom_class: str) -> str:
        found = [cid for cid, s in self.models.items() if dom_class in s.get("_dom_classes", [])]
        assert len(found) == 1, (dom_class, found)
        return found[0]

    def html(self, dom_class: str) -> str:
        return self.models[self.find(dom_class)]["value"]

    def send(self, comm_id: str, data: dict[str, Any]) -> None:
        msg = self.kc.session.msg("comm_msg", {"comm_id": comm_id, "data": data})
        self.kc.shell_channel.send(msg)

    def click(self, dom_class: str) -> None:
        self.send(self.find(dom_class), {"method": "custom", "content": {"event": "click"}})

    def select(self, task_id: str) -> None:
        [cid] = [c for c, s in self.models.items() if s.get("_model_name") == "DropdownModel"]
        index = [label.split()[0] for label in self.models[cid]["_options_labels"]].index(task_id)
        self.send(cid, {"method": "update", "state": {"index": index}, "buffer_paths": []})


def _status(frontend: Frontend, task_id: str) -> str | None:
    m = re.search(rf'data-task="{task_id}" data-status="(\w+)"', frontend.html("dlnest-panel-tasks"))
    return m.group(1) if m else None


@pytest.fixture(params=["ipykernel7", "ipykernel6"])
def frontend(request, tmp_path: Path, env):
    """A kernel with the extension loaded, and a front end on it (ipykernel 7, and 6 where ``make install``
    put it in build/ipykernel6: the package allows both, and they route threads' messages differently)."""
    kernel_env = dict(env)
    if request.param == "ipykernel6":
        if not IPYKERNEL6.is_dir():
            pytest.skip("ipykernel 6 is not installed in build/ipykernel6 (make install puts it there)")
        kernel_env["PYTHONPATH"] = os.pathsep.join([str(IPYKERNEL6), *filter(None, [env.get("PYTHONPATH")])])
    with kernel_client(kernel_env, tmp_path) as kc:
        fe = Frontend(kc)
        fe.execute(f"import ipykernel; assert ipykernel.version_info[0] == {request.param[-1]}, ipykernel.__file__")
        fe.execute("%load_ext dlnest_jupyter")
        yield fe


def test_panel_models_hold_the_task_and_buttons_act(frontend: Frontend, tmp_path: Path):
    fe = frontend
    project = new_project(tmp_path / "mnist", mnist=True)
    fe.execute(f"t = %dlnest_run -c {project}/root_config.json --cpu --set epochs=40")
    panel_cell = fe.execute("%dlnest_panel")
    fe.wait(lambda: fe.displayed, what="the panel's display")
    assert fe.displayed[0][1] == panel_cell
    row = fe.wait(lambda: re.search(r'data-task="(T_\w+)"', fe.html("dlnest-panel-tasks")), what="a task row")
    task_id = row.group(1)

    # GPU rows: the two simulated devices and the host
    gpus = fe.html("dlnest-panel-gpus")
    assert gpus.count('class="dlnest-gpu"') == 2 and "(simulated)" in gpus and 'class="dlnest-host"' in gpus

    # progress, output tail and plot follow the training
    fe.wait(lambda: re.search(r"epoch [3-9]\d*/40", fe.html("dlnest-panel-tasks")), what="progress at epoch 3")
    tasks = fe.html("dlnest-panel-tasks")
    assert re.search(rf'data-task="{task_id}" data-status="running"', tasks)
    assert re.search(r'<progress class="dlnest-progress" max="1" value="0\.0[5-9]\d*|0\.[1-9]', tasks)
    assert "ETA" in tasks and "loss" in tasks
    fe.wait(lambda: "[dlnest] epoch 2 " in fe.html("dlnest-output"), what="output tail")
    assert fe.html("dlnest-output").count("\n") <= 27  # a bounded tail
    fe.wait(lambda: 'id="dlnest-series-loss"' in fe.html("dlnest-plot"), what="the loss plot")
    plot = fe.html("dlnest-plot")
    assert re.search(r'<g id="dlnest-series-loss">\s*<path d="M [\d.]+ [\d.]+\s+L', plot)  # a drawn line

    # every update came from the pump with the panel cell's parent header, at a bounded rate
    mine = [u for u in fe.updates if u[1] in fe.models]
    assert mine and all(parent == panel_cell for _, _, parent in mine), {p for *_, p in mine}
    span = mine[-1][0] - mine[0][0]
    assert len(mine) <= 10 * span + 10, (len(mine), span)

    # stop, continue and analyze buttons do what they say
    fe.select(task_id)
    fe.click("dlnest-action-stop")
    fe.wait(lambda: _status(fe, task_id) == "cancelled", what="the stop button to cancel the task")
    fe.click("dlnest-action-continue")
    new_id = fe.wait(lambda: re.search(rf"(T_\w+): continue of {task_id} queued", fe.html("dlnest-status")),
                     what="the continue to be queued").group(1)
    fe.wait(lambda: "continuing from the checkpoint of epoch" in fe.html("dlnest-output"), what="the continue's output")
    assert f"[{new_id} " in fe.html("dlnest-output")  # the output pane follows the new task
    fe.select(task_id)
    fe.click("dlnest-action-watch")  # pins the output pane to the first task
    fe.wait(lambda: f"Output: {task_id} (pinned" in fe.html("dlnest-output"), what="the pinned output")
    fe.select(new_id)
    fe.wait(lambda: f'class="dlnest-task dlnest-selected" data-task="{new_id}"' in fe.html("dlnest-panel-tasks"),
            what="the selection to move")
    fe.drain(1.5)
    assert f"Output: {task_id} (pinned" in fe.html("dlnest-output")
    fe.click("dlnest-action-stop")
    fe.wait(lambda: _status(fe, new_id) == "cancelled", what="the continue to stop")


def test_panel_shows_refresh_errors_survives_them_and_stops_when_closed(frontend: Frontend, tmp_path: Path):
    fe = frontend
    project = new_project(tmp_path / "mnist", mnist=True)
    fe.execute(f"t = %dlnest_run -c {project}/root_config.json --cpu --set epochs=2")
    fe.execute("t.wait(180)")
    first = fe.execute("%dlnest_panel")
    second = fe.execute("%dlnest_panel")
    fe.wait(lambda: len(fe.displayed) == 2, what="two displays")
    assert fe.displayed[0][0] == fe.displayed[1][0]  # the same models, shown twice
    assert [p for _, p in fe.displayed] == [first, second]
    fe.execute("import threading; assert [t.name for t in threading.enumerate()].count('dlnest-panel') == 1")
    fe.wait(lambda: 'id="dlnest-series-loss"' in fe.html("dlnest-plot"), what="the plot")

    [metrics] = (tmp_path / "mnist").rglob("metrics.jsonl")
    saved = metrics.read_bytes()
    metrics.unlink()
    metrics.mkdir()  # reading it now fails in the refresher
    fe.wait(lambda: re.search(r"refresh error \(\w+\): IsADirectoryError", fe.html("dlnest-status")), timeout=30,
            what="the error")
    metrics.rmdir()
    metrics.write_bytes(saved)
    fe.wait(lambda: fe.html("dlnest-status") == "", timeout=30, what="the error to clear")
    fe.execute("from dlnest_jupyter import panels as p; assert p._panel.alive and p._panel.errors > 0")

    fe.click("dlnest-panel-close")
    panel_id = fe.displayed[0][0]
    fe.wait(lambda: panel_id in fe.closed, timeout=30, what="the panel's models to close")
    fe.execute("import threading, time; time.sleep(0.5); "
               "assert 'dlnest-panel' not in [t.name for t in threading.enumerate()]")
    closed_at = time.monotonic()
    fe.drain(3)
    assert not [u for u in fe.updates if u[0] > closed_at]  # nothing is sent after closing
