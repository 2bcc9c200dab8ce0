"""Analyzer sessions: real IPython shells in separate processes talking to real session kernels."""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from conftest import cli, packages, processes_mentioning, shell


@pytest.fixture
def trained(tmp_path: Path, env) -> Path:
    from dlnest_jupyter.scaffold import new_project

    project = new_project(tmp_path / "mnist", mnist=True)
    (project / "AnalyzeScripts" / "broken.py").write_text("def experience(self):\n    return self.nothing_here\n")
    cli("run", "-c", str(project / "root_config.json"), "--cpu", "--set", "epochs=2")
    (pkg,) = packages(project)
    return pkg


def test_session_runs_scripts_cells_and_figures_and_outlives_its_shell(trained: Path, env):
    foreground = cli("analyze", "-r", str(trained), "-s", "getAcc", "--cpu").stdout.splitlines()[0]
    out, err = shell(f"""
        from IPython.utils.capture import capture_output
        t = ip.run_line_magic('dlnest_analyze', '-r {trained} --cpu')
        ip.run_line_magic('runExp', 'getAcc')
        ip.run_line_magic('runExp', 'broken')
        ip.run_line_magic('runExp', 'getAcc')
        ip.run_cell_magic('dlnest_exp', '', 'kept = 41\\nprint("epoch", self.epoch)\\nkept + 1')
        with capture_output() as cap:
            ip.run_cell_magic('dlnest_exp', '', 'import matplotlib.pyplot as plt\\nplt.plot([1, 2, 3])\\nplt.show()')
        print('mimes', json.dumps(sorted(k for o in cap.outputs for k in o.data)))
        failed = ip.run_cell('%%dlnest_exp\\nraise ValueError("inside")')
        print('cell failed:', type(failed.error_in_exec).__name__)
        print('id', t.id)
    """, env)
    assert out.count(foreground) == 2, (out, foreground)  # same accuracy as the foreground analyze, twice
    assert "epoch 2" in out and "42" in out
    assert '"image/png"' in out.split("mimes", 1)[1]
    assert "cell failed: SessionCellError" in out
    assert "ValueError: inside" in re.sub(r"\x1b\[[0-9;]*m", "", err)  # the session's own (colored) traceback
    assert "broken.py" in err and "AttributeError" in err and "dlnest_jupyter/" not in err
    session_id = out.split("id ")[-1].strip()

    out, err = shell(f"""
        ip.run_cell_magic('dlnest_exp', {session_id!r}, 'print("kept is", kept)')
        ip.run_line_magic('runExp', '{session_id} showModel')
        ip.run_line_magic('dlnest_del', {session_id!r})
        print(dlnest_jupyter.task({session_id!r}).status)
    """, env)
    assert "kept is 41" in out and "parameters" in out and out.strip().endswith("cancelled"), err
    log = (trained / f"_session_{session_id}.txt").read_text()
    assert foreground in log and "kept is 41" in log
    assert not processes_mentioning(str(trained))
    assert not (Path(env["DLNEST_HOME"]) / "sessions" / session_id).exists()


def test_cli_exp_and_who_may_connect(trained: Path, env, tmp_path: Path, monkeypatch):
    from jupyter_client import BlockingKernelClient

    from dlnest_jupyter import api, sessions

    # a home under a folder other users may traverse, so only dlnest's own permissions keep them out
    outer = Path(tempfile.mkdtemp(prefix="dlnest_home_"))
    outer.chmod(0o755)
    original_home = env["DLNEST_HOME"]
    env = {**env, "DLNEST_HOME": str(outer / "home")}
    monkeypatch.setenv("DLNEST_HOME", env["DLNEST_HOME"])
    session_id = cli("session", "-r", str(trained), "--cpu", env=env).stdout.strip()
    try:
        out = cli("exp", session_id, "getAcc", env=env).stdout
        assert "validation accuracy at epoch 2" in out
        endpoint = Path(api.task(session_id).row["endpoint"])
        assert oct(endpoint.stat().st_mode & 0o777) == "0o600"
        assert oct(endpoint.parent.stat().st_mode & 0o777) == "0o700"

        info = json.loads(endpoint.read_text())
        assert info["transport"] == "ipc" and info["key"]
        forged = tmp_path / "forged.json"
        forged.write_text(json.dumps({**info, "key": "0" * len(info["key"])}))
        kc = BlockingKernelClient(connection_file=str(forged))
        kc.load_connection_file()
        kc.start_channels()
        with pytest.raises(RuntimeError):
            kc.wait_for_ready(timeout=5)  # messages signed with the wrong key are dropped
        kc.stop_channels()

        if os.geteuid() == 0:  # another OS user can neither read the key nor reach the sockets
            probe = ('cat "$1" >/dev/null 2>&1 && echo read || echo no-read; '
                     'ls "$(dirname "$1")" >/dev/null 2>&1 && echo list || echo no-list')
            res = subprocess.run(["/bin/sh", "-c", probe, "sh", str(endpoint)], user=65534, group=65534,
                                 capture_output=True, text=True, timeout=60, cwd="/")
            assert res.stdout.split() == ["no-read", "no-list"], res.stderr
    finally:
        api.cancel(session_id)
        assert api.task(session_id).status == "cancelled"
        with pytest.raises(Exception, match="cancelled"):
            sessions.execute(session_id, "1")
        monkeypatch.setenv("DLNEST_HOME", original_home)
        shutil.rmtree(outer)
