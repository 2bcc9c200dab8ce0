"""The quickstart notebook run in a real browser: JupyterLab on loopback with a token, headless Chromium
(Debian's package) driven by Playwright. Asserts on the rendered panel and keeps a screenshot."""
from __future__ import annotations

import contextlib
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterator

import nbformat
import pytest
import requests

from dlnest_jupyter.scaffold import new_project

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
    deadline = time.monotonic() + 300
    while True:
        sessions = requests.get(f"{url}/api/sessions", headers={"Authorization": f"token {token}"}, timeout=5).json()
        if sessions and all(s["kernel"]["execution_state"] == "idle" for s in sessions):
            return
        assert time.monotonic() < deadline, f"the kernel did not start: {sessions}"
        time.sleep(0.5)


def _serve(tmp_path: Path, env: dict[str, str], app: str) -> Iterator[tuple[str, str, Path]]:
    """``app`` (jupyterlab or notebook, Notebook 7) on 127.0.0.1 with a token, serving tmp_path/root, its state
    kept under tmp_path. Yields (url, token, root)."""
    root = tmp_path / "root"
    root.mkdir()
    news = tmp_path / "settings" / "@jupyterlab" / "apputils-extension" / "notification.jupyterlab-settings"
    news.parent.mkdir(parents=True)
    news.write_text('{"fetchNews": "false"}')  # no "get Jupyter news?" toast over the panel (and no fetch)
    port, token = _free_port(), secrets.token_hex(16)
    lab_env = {**env, "JUPYTER_RUNTIME_DIR": str(tmp_path / "runtime"), "JUPYTER_CONFIG_DIR": str(tmp_path / "config")}
    cls = {"jupyterlab": "LabApp", "notebook": "JupyterNotebookApp"}[app]
    cmd = [sys.executable, "-m", app, "--no-browser", "--ServerApp.ip=127.0.0.1", f"--ServerApp.port={port}",
           "--ServerApp.port_retries=0", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={root}",
           f"--{cls}.workspaces_dir={tmp_path / 'workspaces'}", f"--{cls}.user_settings_dir={tmp_path / 'settings'}"]
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
            assert time.monotonic() < deadline, f"{app} did not start"
            time.sleep(0.5)
        yield url, token, root
    finally:
        proc.terminate()  # SIGTERM: the server shuts its kernels down, then exits
        try:
            proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture
def lab(tmp_path: Path, env):
    yield from _serve(tmp_path, env, "jupyterlab")


@pytest.fixture
def notebook7(tmp_path: Path, env):
    yield from _serve(tmp_path, env, "notebook")


@contextlib.contextmanager
def _browser(name: str) -> Iterator[Any]:
    """A page in headless Chromium; what it showed is saved as ``<name>-failure.png`` if the test fails."""
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    with playwright.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=CHROMIUM, args=FLAGS, headless=True)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        try:
            yield page
        except BaseException:
            page.screenshot(path=str(ARTIFACTS / f"{name}-failure.png"), full_page=True)
            raise
        finally:
            browser.close()


def _run_all(page: Any, url: str, token: str) -> None:
    page.wait_for_selector(".jp-Notebook .jp-Cell", timeout=120_000)
    _wait_for_kernel(url, token)
    page.get_by_role("menuitem", name="Run", exact=True).click()
    page.get_by_role("menuitem", name="Run All Cells", exact=True).click()
    # the first cell gets its execution count once the kernel ran it
    page.locator(".jp-InputPrompt", has_text="[1]").first.wait_for(timeout=60_000)


def _check_panel(page: Any, timeout_s: float) -> Any:
    """The rendered panel: a finished task's row, both simulated GPUs and the host, a plotted loss line."""
    panel = page.locator(".dlnest-panel")
    panel.wait_for(timeout=180_000)
    panel.locator(".dlnest-panel-tasks tr.dlnest-task[data-status='done']").first.wait_for(timeout=timeout_s * 1000)
    assert panel.locator(".dlnest-panel-gpus tr.dlnest-gpu").count() == 2
    assert "(simulated)" in panel.locator(".dlnest-panel-gpus").inner_text()
    assert panel.locator(".dlnest-panel-gpus tr.dlnest-host").count() == 1
    line = panel.locator(".dlnest-plot svg g[id='dlnest-series-loss'] path").first
    line.wait_for(timeout=60_000)
    assert line.get_attribute("d").startswith("M ")
    assert line.bounding_box()["width"] > 50  # a line actually drawn across the axes
    return panel


def test_quickstart_runs_in_jupyterlab_and_the_panel_renders(lab):
    url, token, root = lab
    shutil.copy(ROOT / "notebooks" / "quickstart.ipynb", root)
    with _browser("jupyterlab") as page:
        page.goto(f"{url}/lab/tree/quickstart.ipynb?token={token}")
        _run_all(page, url, token)
        panel = _check_panel(page, 300)

        # the tour ends: the continued run finished, bit by bit as if it had never stopped
        # (the printed list's quote tells the cell's output from the panel's copy of the first run's output)
        page.get_by_text(re.compile(r"'best validation accuracy: ")).wait_for(timeout=600_000)
        _wait_for_kernel(url, token)
        errors = page.locator(".jp-OutputArea-output[data-mime-type='application/vnd.jupyter.stderr']")
        assert not [t for t in errors.all_inner_texts() if "Traceback" in t or "dlnest: error" in t]
        assert page.locator(".dlnest-panel-tasks tr.dlnest-task").count() >= 4  # 2 runs, a continue, a session
        panel.scroll_into_view_if_needed()
        panel.screenshot(path=str(ARTIFACTS / "panel.png"))
        page.screenshot(path=str(ARTIFACTS / "quickstart.png"), full_page=True)
    assert (ARTIFACTS / "panel.png").stat().st_size > 10_000


def test_the_panel_renders_in_notebook_7(notebook7):
    url, token, root = notebook7
    new_project(root / "mnist", mnist=True)
    cells = ["%load_ext dlnest_jupyter", "t = %dlnest_run -c mnist/root_config.json --cpu --set epochs=2",
             "%dlnest_panel"]
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(c) for c in cells],
                                            metadata={"kernelspec": {"name": "python3", "language": "python",
                                                                     "display_name": "Python 3"}}),
                   root / "panel.ipynb")
    with _browser("notebook7") as page:
        page.goto(f"{url}/notebooks/panel.ipynb?token={token}")
        _run_all(page, url, token)
        panel = _check_panel(page, 180)
        panel.screenshot(path=str(ARTIFACTS / "panel-notebook7.png"))
