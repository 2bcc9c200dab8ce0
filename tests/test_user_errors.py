"""Errors raised by user code: one line naming the user's file, user frames only, a failed record."""
from __future__ import annotations

import json
from pathlib import Path

from conftest import FAST, cli, only_package


def _inject(path: Path, after: str, code: str) -> None:
    text = path.read_text()
    assert after in text
    path.write_text(text.replace(after, after + code, 1))


def test_exception_in_user_init_names_the_file(mnist: Path):
    _inject(mnist / "Model" / "Model.py", "    def init(self, args, dataset_info):\n",
            "        1 / 0\n")
    proc = cli("run", "-c", str(mnist / "root_config.json"), "--cpu", *FAST, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "dlnest_jupyter: error: Model/Model.py:10: Model.init raised ZeroDivisionError: division by zero"]
    record = json.loads((only_package(mnist) / "record.json").read_text())
    assert record["status"] == "failed" and "ZeroDivisionError" in record["error"]


def test_exception_in_training_step_shows_user_frames_only(mnist: Path):
    _inject(mnist / "Model" / "Model.py", "    def run_one_step(self, batch, log, iter, epoch):\n",
            "        if iter == 5:\n            raise ValueError(f'bad batch {iter}')\n")
    proc = cli("run", "-c", str(mnist / "root_config.json"), "--cpu", *FAST, check=False)
    assert proc.returncode == 1
    assert "Traceback (user code):" in proc.stderr and "Model/Model.py" in proc.stderr
    assert "raise ValueError(f'bad batch {iter}')" in proc.stderr
    assert "dlnest_jupyter/training.py" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].endswith("Model.run_one_step raised ValueError: bad batch 5")
    pkg = only_package(mnist)
    assert "ValueError: bad batch 5" in (pkg / "_output.txt").read_text()
    assert json.loads((pkg / "record.json").read_text())["status"] == "failed"


def test_clean_template_runs(tmp_path: Path):
    cli("new", str(tmp_path / "clean"))
    proc = cli("run", "-c", str(tmp_path / "clean" / "root_config.json"), "--cpu")
    assert "[dlnest] epoch 1" in proc.stdout
    assert json.loads((only_package(tmp_path / "clean") / "record.json").read_text())["status"] == "done"


def test_new_refuses_a_non_empty_folder_and_accepts_seed_spellings(tmp_path: Path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "keep.txt").write_text("mine")
    proc = cli("new", str(tmp_path / "full"), "--mnist", check=False)
    assert proc.returncode == 2 and "not empty" in proc.stderr
    assert [p.name for p in (tmp_path / "full").iterdir()] == ["keep.txt"]
    cli("new", str(tmp_path / "seed"), "-MNIST")
    for rel in ["AnalyzeScripts/getAcc.py", "AnalyzeScripts/showModel.py", "Dataset/Dataset.py", "Model/Model.py",
                "Model/MNISTCNN.py", "common_config.json", "dataset_config.json", "freq_config.json",
                "model_config.json", "root_config.json", "LifeCycle.py"]:
        assert (tmp_path / "seed" / rel).is_file(), rel
