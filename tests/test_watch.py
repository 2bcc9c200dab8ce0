"""%dlnest_watch / %dlnest_withdraw in a real IPython kernel, read through the Jupyter protocol."""
from __future__ import annotations

import queue
import time
from pathlib import Path

from conftest import kernel_client

from dlnest_jupyter.scaffold import new_project


def _execute(kc, code: str) -> str:
    return _reply(kc, code)["parent_header"]["msg_id"]


def _reply(kc, code: str) -> dict:
    msg_id = kc.execute(code)
    while True:
        reply = kc.get_shell_msg(timeout=120)
        if reply["parent_header"].get("msg_id") == msg_id:
            assert reply["content"]["status"] == "ok", reply["content"]
            return reply


def test_watch_follows_output_into_its_cell_and_withdraw_stops_it(tmp_path: Path, env):
    project = new_project(tmp_path / "mnist", mnist=True)
    with kernel_client(env, tmp_path) as kc:
        _execute(kc, "%load_ext dlnest_jupyter")
        _execute(kc, f"t = %dlnest_run -c {project}/root_config.json --cpu --set epochs=30")
        watch_cell = _execute(kc, "%dlnest_watch -n 5 {t.id}")
        display_id, updates, texts = None, [], []
        deadline = time.monotonic() + 180
        while not any("[dlnest] epoch 2 " in t for t in texts):
            assert time.monotonic() < deadline, texts[-1:] or "no display"
            try:
                msg = kc.get_iopub_msg(timeout=1)
            except queue.Empty:
                continue
            if msg["msg_type"] == "display_data" and display_id is None:
                display_id = msg["content"]["transient"]["display_id"]
                assert msg["parent_header"]["msg_id"] == watch_cell
            elif msg["msg_type"] == "update_display_data":
                assert msg["content"]["transient"]["display_id"] == display_id
                assert msg["parent_header"]["msg_id"] == watch_cell  # routed to the cell that asked
                updates.append(time.monotonic())
                texts.append(msg["content"]["data"]["text/plain"])
        assert len(texts[-1].splitlines()) <= 6  # header + a bounded tail of 5 lines
        span = updates[-1] - updates[0]
        assert len(updates) <= 2 + span / 0.45  # coalesced: at most about two updates a second

        withdrawn = _reply(kc, "%dlnest_withdraw")["header"]["date"]
        late = []
        end = time.monotonic() + 3
        while time.monotonic() < end:
            try:
                msg = kc.get_iopub_msg(timeout=0.5)
            except queue.Empty:
                continue
            if msg["msg_type"] == "update_display_data" and msg["header"]["date"] > withdrawn:
                late.append(msg)
        assert late == []  # nothing is sent once %dlnest_withdraw has returned
        _execute(kc, "assert t.status == 'running', t")  # the task kept running
        _execute(kc, "%dlnest_del {t.id}")
