"""Loading packages into one process: side by side under private names, and runs that import their own code."""
from __future__ import annotations

import contextlib
import io
import sys
from pathlib import Path

import pytest
import torch

import dlnest_jupyter
from conftest import cli, packages
from dlnest_jupyter.config import load_config
from dlnest_jupyter.package import SavePackage
from dlnest_jupyter.training import train


def _mark(project: Path, mark: str) -> None:
    path = project / "Model" / "MNISTCNN.py"
    path.write_text(path.read_text().split("\nMARK =")[0] + f"\nMARK = {mark!r}\n")


def test_two_packages_load_side_by_side(mnist: Path):
    _mark(mnist, "first")
    cli("run", "-c", str(mnist / "root_config.json"), "--cpu", "--set", "epochs=1")
    _mark(mnist, "second")
    cli("run", "-c", str(mnist / "root_config.json"), "--cpu", "--set", "epochs=2", "--set", "model.hidden=32")
    first, second = packages(mnist)
    a, b = dlnest_jupyter.load(first), dlnest_jupyter.load(second / "record.json")
    mod_a, mod_b = sys.modules[type(a.model.net).__module__], sys.modules[type(b.model.net).__module__]
    assert mod_a is not mod_b and (mod_a.MARK, mod_b.MARK) == ("first", "second")
    assert a.model.net.classifier[2].out_features == 64 and b.model.net.classifier[2].out_features == 32
    assert (a.epoch, b.epoch) == (1, 2) and a.record["id"] != b.record["id"]
    assert a.args["epochs"] == 1 and a.device == torch.device("cpu")
    assert "Model.MNISTCNN" not in sys.modules  # nothing left under the plain names

    acc_a = dlnest_jupyter.analyze(first, "getAcc")
    assert acc_a == pytest.approx(a.log["acc"][-1], abs=1e-6)
    assert dlnest_jupyter.analyze(second, lambda self: self.model.net.training) is False
    older = dlnest_jupyter.load(second, checkpoint=1)
    assert older.epoch == 1 and not torch.equal(older.model.net.classifier[5].weight, b.model.net.classifier[5].weight)


def test_runs_in_one_process_each_import_their_own_snapshot(mnist: Path):
    """A second in-process run must not reuse the first run's modules (same names, other snapshot)."""
    seen = []
    for mark in ("A", "B"):
        _mark(mnist, mark)
        pkg = SavePackage.create(load_config(mnist / "root_config.json", overrides=["epochs=1"]), command=["test"])
        with contextlib.redirect_stdout(io.StringIO()):
            run = train(pkg, torch.device("cpu"))
        seen.append(sys.modules[type(run.model.net).__module__].MARK)
    assert seen == ["A", "B"]
    assert sum(p.endswith("/code") for p in sys.path) == 1
