"""Config merging and every config error, in-process and through the CLI (one clear line, nothing created)."""
from __future__ import annotations

import json
from pathlib import Path

import pytest

from conftest import cli, edit_json, packages
from dlnest_jupyter.config import deep_merge, load_config
from dlnest_jupyter.errors import DLNestError


def test_children_merge_in_order_deeply_then_freq_then_set(mnist: Path):
    (mnist / "extra.json").write_text(json.dumps({"model": {"lr": 0.5, "new": 1}, "epochs": 2}))
    root = json.loads((mnist / "root_config.json").read_text())
    edit_json(mnist / "root_config.json", child_jsons=root["child_jsons"] + ["./extra.json"])
    (mnist / "f.json").write_text(json.dumps({"freq": {"save_every": 3}}))
    cfg = load_config(mnist / "root_config.json", mnist / "f.json",
                      ["model.lr=0.1", "dataset.source=mnist", "epochs=4", "a.b.c=[1, 2]"])
    assert cfg.args["model"] == {"lr": 0.1, "hidden": 64, "dropout": 0.25, "new": 1}
    assert cfg.args["freq"] == {"visualize_every": 20, "save_every": 3}
    assert cfg.args["dataset"]["source"] == "mnist" and cfg.args["epochs"] == 4
    assert cfg.args["a"] == {"b": {"c": [1, 2]}}
    assert [p.name for p in cfg.sources][-2:] == ["extra.json", "f.json"]


def test_nested_children_are_relative_to_their_parent(tmp_path: Path, mnist: Path):
    (mnist / "sub").mkdir()
    (mnist / "sub" / "a.json").write_text(json.dumps({"x": 1, "child_jsons": ["b.json"]}))
    (mnist / "sub" / "b.json").write_text(json.dumps({"x": 2, "y": 3}))
    root = json.loads((mnist / "root_config.json").read_text())
    edit_json(mnist / "root_config.json", child_jsons=root["child_jsons"] + ["sub/a.json"])
    args = load_config(mnist / "root_config.json").args
    assert (args["x"], args["y"]) == (2, 3)


def test_deep_merge_does_not_alias_inputs():
    base, over = {"a": {"b": 1}}, {"a": {"c": [1]}}
    merged = deep_merge(base, over)
    merged["a"]["c"].append(2)
    assert base == {"a": {"b": 1}} and over == {"a": {"c": [1]}}


def _break(mnist: Path, case: str) -> str:
    """Damage the project one way; return a fragment the error line must contain."""
    root = mnist / "root_config.json"
    if case == "missing root":
        root.unlink()
        return "config file not found"
    if case == "missing child":
        (mnist / "model_config.json").unlink()
        return "child_jsons names a missing file: ./model_config.json"
    if case == "bad json":
        (mnist / "model_config.json").write_text('{\n  "model": {"lr": 0.1,}\n}\n')
        return "model_config.json:2:"
    if case == "cycle":
        (mnist / "model_config.json").write_text(json.dumps({"child_jsons": ["./dataset_config.json"]}))
        (mnist / "dataset_config.json").write_text(json.dumps({"child_jsons": ["./model_config.json"]}))
        return "cycle"
    if case == "unknown file key":
        edit_json(root, modle_file_path="./Model/Model.py")
        return "unknown file key 'modle_file_path'"
    if case == "missing model file":
        (mnist / "Model" / "Model.py").unlink()
        return "model_file_path names a missing file"
    if case == "missing class":
        edit_json(root, model_name="NoSuchModel")
        return "Model.py has no class 'NoSuchModel'"
    if case == "syntax error":
        (mnist / "LifeCycle.py").write_text("class LifeCycle(:\n")
        return "LifeCycle.py:1"
    if case == "bad set":
        return "--set expects key=value"
    raise AssertionError(case)


CASES = ["missing root", "missing child", "bad json", "cycle", "unknown file key", "missing model file",
         "missing class", "syntax error", "bad set"]


@pytest.mark.parametrize("case", CASES)
def test_config_errors_are_one_line_and_create_nothing(mnist: Path, case: str):
    fragment = _break(mnist, case)
    extra = ["--set", "novalue"] if case == "bad set" else []
    with pytest.raises(DLNestError, match=None) as err:
        load_config(mnist / "root_config.json", overrides=extra[1:])
    assert fragment in str(err.value)
    proc = cli("run", "-c", str(mnist / "root_config.json"), "--cpu", *extra, check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dlnest_jupyter: error: ") and fragment in lines[0], proc.stderr
    assert "Traceback" not in proc.stdout + proc.stderr
    assert packages(mnist) == []


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="this machine has a GPU")
def test_gpu_run_without_gpu_is_a_clear_error(mnist: Path):
    proc = cli("run", "-c", str(mnist / "root_config.json"), check=False)
    assert proc.returncode == 2
    assert "no CUDA GPU" in proc.stderr and "--cpu" in proc.stderr and "Traceback" not in proc.stderr
    assert packages(mnist) == []
