"""The MNIST example end to end in real processes, and what its save package holds."""
from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

import pytest

from conftest import FAST, cli, metrics, only_package
from dlnest_jupyter.config import load_config


def test_mnist_example_trains_and_analyses_end_to_end(mnist: Path):
    proc = cli("run", "-c", str(mnist / "root_config.json"), "--cpu", "-d", "e2e")
    pkg = only_package(mnist)
    assert proc.stdout.splitlines()[0] == f"[dlnest] save package: {pkg}"

    record = json.loads((pkg / "record.json").read_text())
    assert record["status"] == "done" and record["description"] == "e2e"
    assert record["project_dir"] == str(mnist) and record["root_config"] == "root_config.json"
    assert [a["status"] for a in record["attempts"]] == ["done"]
    assert record["command"][:2] == ["dlnest_jupyter", "run"]

    assert json.loads((pkg / "config.json").read_text()) == load_config(mnist / "root_config.json").args

    rows = metrics(pkg)
    accs = [r["acc"] for r in rows if "acc" in r]
    assert len(accs) == 8 and accs[-1] >= 0.9, accs
    assert [r["iter"] for r in rows if "loss" in r] == list(range(1, len(rows) - 7))
    assert rows[-1]["epoch"] == 8

    output = (pkg / "_output.txt").read_text()
    assert "[dlnest] epoch 8" in output and "best validation accuracy" in output
    assert output.count("[dlnest] epoch") == 8

    manifest = json.loads((pkg / "checkpoints" / "manifest.json").read_text())
    assert manifest["latest"] == 8
    best_epoch = 1 + accs.index(max(accs))
    kept = [c["epoch"] for c in manifest["checkpoints"] if "kept" in c["tracks"]]
    fast = [c["epoch"] for c in manifest["checkpoints"] if "fast" in c["tracks"]]
    assert kept == [best_epoch] and fast == [7, 8]
    on_disk = sorted(p.name for p in (pkg / "checkpoints").glob("*.ckpt"))
    assert on_disk == sorted(c["file"] for c in manifest["checkpoints"])

    env = json.loads((pkg / "env" / "env.json").read_text())
    assert env["torch"].startswith("2.") and "python" in env
    assert "torch==" in (pkg / "env" / "pip-freeze.txt").read_text()

    ana = cli("analyze", "-r", str(pkg), "-s", "getAcc", "--cpu")
    assert f"validation accuracy at epoch 8: {accs[-1]:.4f}" in ana.stdout
    assert float(ana.stdout.strip().splitlines()[-1]) == pytest.approx(accs[-1], abs=1e-6)  # float32 in the log


def test_code_snapshot_is_what_the_run_imports(mnist: Path):
    """Edit the live project mid-run: a module first imported after the edit still comes from the snapshot."""
    (mnist / "helper.py").write_text("MARK = 'original'\n")
    (mnist / "LifeCycle.py").write_text((mnist / "LifeCycle.py").read_text() + '''
    def after_epoch(self, epoch):
        import os, time
        if epoch == 1:
            open(os.environ["DLNEST_TEST_READY"], "w").close()
            while not os.path.exists(os.environ["DLNEST_TEST_GO"]):
                time.sleep(0.05)
        if epoch == 2:
            import helper  # first imported only now, after the live file changed
            print("helper:", helper.MARK, helper.__file__)
''')
    ready, go = mnist.parent / "ready", mnist.parent / "go"
    env = {**os.environ, "DLNEST_TEST_READY": str(ready), "DLNEST_TEST_GO": str(go)}
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "dlnest_jupyter", "run", "-c", "root_config.json", "--cpu",
                             *FAST], cwd=mnist, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = 120
        import time

        start = time.monotonic()
        while not ready.exists():
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() - start < deadline
            time.sleep(0.05)
        (mnist / "helper.py").write_text("MARK = 'edited'\n")
        (mnist / "Model" / "MNISTCNN.py").write_text("raise RuntimeError('live code imported')\n")
        go.touch()
        out, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        proc.wait()
    assert proc.returncode == 0, err
    pkg = only_package(mnist)
    line = next(ln for ln in out.splitlines() if ln.startswith("helper:"))
    assert line.split()[1] == "original"
    assert Path(line.split()[2]).resolve().is_relative_to((pkg / "code").resolve())
    assert (pkg / "code" / "helper.py").read_text() == "MARK = 'original'\n"


def _write_idx(path: Path, array) -> None:
    """The IDX format MNIST ships in: zero, zero, dtype 0x08 (ubyte), ndim, big-endian dims, data."""
    import gzip
    import struct

    header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    path.write_bytes(gzip.compress(header + array.astype("uint8").tobytes()))


def test_mnist_example_reads_real_idx_files(mnist: Path):
    """Real MNIST loading: gzipped IDX files under data_root (here small ones made from the digits)."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = np.kron(digits.images, np.ones((3, 3)))[:, 2:-2, 2:-2] * 255 / 16  # 8x8 -> 20x20, 0..255
    data = mnist / "data"
    data.mkdir()
    for prefix, sl in (("train", slice(0, 1400)), ("t10k", slice(1400, None))):
        _write_idx(data / f"{prefix}-images-idx3-ubyte.gz", images[sl])
        _write_idx(data / f"{prefix}-labels-idx1-ubyte.gz", digits.target[sl])
    proc = cli("run", "-c", str(mnist / "root_config.json"), "--cpu", "--set", "dataset.source=mnist",
               "--set", "epochs=3")
    pkg = only_package(mnist)
    accs = [r["acc"] for r in metrics(pkg) if "acc" in r]
    assert accs[-1] >= 0.8, (accs, proc.stdout[-500:])  # it learns from the IDX data (3 short epochs)
    assert not (pkg / "code" / "data").exists()  # data_root is never snapshotted


def test_env_records_git_commit_and_dirty_diff(mnist: Path):
    git = ["git", "-C", str(mnist), "-c", "user.email=t@example.org", "-c", "user.name=t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "start"], check=True)
    commit = subprocess.run([*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
    with open(mnist / "LifeCycle.py", "a") as fh:
        fh.write("# an uncommitted edit\n")
    cli("run", "-c", str(mnist / "root_config.json"), "--cpu", "--set", "epochs=1")
    env_dir = only_package(mnist) / "env"
    info = json.loads((env_dir / "git.json").read_text())
    assert info["commit"] == commit and info["dirty"] is True
    assert "+# an uncommitted edit" in (env_dir / "git-diff.patch").read_text()
