"""The quickstart notebook run in a real browser: JupyterLab on loopback with a token, headless Chromium
(Debian's package) driven by Playwright. Asserts on the rendered panel and keeps a screenshot."""
from __future__ import annotations

import os
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

ROOT = Path(__file__).resolve().parents[1]
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARTIFACTS = Path(os.environ.get("DLNEST_TEST_ARTIFACTS", ROOT / "build" / "test-artifacts"))
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-sync",
         "--disable-background-networking", "--disable-component-update"]

playwright = pytest.importorskip("playwright.sync_api", reason="playwright is not installed (make install)")
if not Path(CHROMIUM).exists():
    pytest.skip("chromium is not installed: apt-get install chromium (.ci/run does)", allow_module_level=True)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_for_kernel(url: str, token: str) -> None:
    """Until the notebook's kernel is up and idle: a Run All sent earlier can be dropped by the front end."""
    deadline = time.monotonic() + 120
    while True:
        sessions = requests.get(f"{url}/api/sessions", headers={"Authorization": f"token {token}"}, timeout=5).json()
        if sessions and all(s["kernel"]["execution_state"] == "idle" for s in sessions):
            return
        assert time.monotonic() < deadline, f"the kernel did not start: {sessions}"
        time.sleep(0.5)


@pytest.fixture
def lab(tmp_path: Path, env):
    """JupyterLab serving a copy of the quickstart notebook, its state kept under tmp_path."""
    root = tmp_path / "lab"
    root.mkdir()
    shutil.copy(ROOT / "notebooks" / "quickstart.ipynb", root)
    news = tmp_path / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text('{"fetchNews": "false"}')  # no "get Jupyter news?" toast over the panel (and no fetch)
    port, token = _free_port(), secrets.token_hex(16)
    lab_env = {**env, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTER_CONFIG_DIR": str(tmp_path / "config")}
    cmd = [sys.executable, "-m", "jupyterlab", "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           f"--LabApp.workspaces_dir={tmp_path / 'workspaces'}", f"--LabApp.user_settings_dir={tmp_path / 'settings'}"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    with open(tmp_path / "lab.log", "w") as log:
        proc = subprocess.Popen(cmd, env=lab_env, cwd=root, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            assert proc.poll() is None, (tmp_path / "lab.log").read_text()[-3000:]
            try:
                if requests.get(f"{url}/api/status", headers={"Authorization": f"token {token}"}, timeout=2).ok:
                    break
            except requests.ConnectionError:
                pass
            assert time.monotonic() < deadline, "JupyterLab did not start"
            time.sleep(0.5)
        yield url, token, root
    finally:
        proc.terminate()  # SIGTERM: the server shuts its kernels down, then exits
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def test_quickstart_runs_in_jupyterlab_and_the_panel_renders(lab):
    url, token, root = lab
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 1000})
            page.goto(f"{url}/lab/tree/quickstart.ipynb?token={token}")
            page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
            _wait_for_kernel(url, token)
            page.wait_for_selector(".jp-Notebook-ExecutionIndicator[data-status='idle']", timeout=120_000)
            page.get_by_role("menuitem", name="Run", exact=True).click()
            page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
            # the first cell gets its execution count once the kernel ran it
            page.locator(".jp-InputPrompt", has_text="[1]").first.wait_for(timeout=60_000)

            panel = page.locator(".dlnest-panel")
            panel.wait_for(timeout=180_000)
            done = panel.locator(".dlnest-panel-tasks tr.dlnest-task[data-status='done']")
            done.first.wait_for(timeout=300_000)
            assert panel.locator(".dlnest-panel-gpus tr.dlnest-gpu").count() == 2  # the simulated devices
            assert "(simulated)" in panel.locator(".dlnest-panel-gpus").inner_text()
            assert panel.locator(".dlnest-panel-gpus tr.dlnest-host").count() == 1
            line = panel.locator(".dlnest-plot svg g[id='dlnest-series-loss'] path").first
            line.wait_for(timeout=60_000)
            assert line.get_attribute("d").startswith("M ")
            assert line.bounding_box()["width"] > 50  # a line actually drawn across the axes

            # the tour ends: the continued run finished, bit by bit as if it had never stopped
            page.get_by_text("best validation accuracy").first.wait_for(timeout=420_000)
            page.locator(".jp-Notebook-ExecutionIndicator[data-status='idle']").wait_for(timeout=120_000)
            errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
            assert not [t for t in errors.all_inner_texts() if "Traceback" in t or "dlnest: error" in t]
            assert page.locator(".dlnest-panel-tasks tr.dlnest-task").count() >= 4  # 2 runs, a continue, a session
            panel.scroll_into_view_if_needed()
            panel.screenshot(path=str(ARTIFACTS / "panel.png"))
            page.screenshot(path=str(ARTIFACTS / "quickstart.png"), full_page=True)
        except Exception:
            page.screenshot(path=str(ARTIFACTS / "failure.png"), full_page=True)  # what the browser showed
            raise
        finally:
            browser.close()
    assert (ARTIFACTS / "panel.png").stat().st_size > 10_000
