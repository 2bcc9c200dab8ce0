"""The content-addressed code store: what goes in, and that unchanged files are shared, not copied."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from dlnest_jupyter.errors import DLNestError
from dlnest_jupyter.snapshot import CodeStore, project_files, snapshot


def _project(root: Path) -> Path:
    files = {
        "train.py": "print('hi')\n",
        "pkg/mod.py": "X = 1\n",
        "pkg/conf.yaml": "a: 1\n",
        "data/big.bin": "0" * 1000,
        "data/labels.txt": "1 2 3\n",
        "Saves/old/record.json": "{}",
        "notes/weights.pt": "w",
        "notes/readme.md": "# notes\n",
        "scratch/tmp.py": "junk\n",
        ".git/config": "[core]\n",
        "pkg/__pycache__/mod.cpython-311.pyc": "x",
        "assets/vocab.bin": "v",
    }
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)
    (root / ".dlnestignore").write_text("scratch/\n*.md\n")
    return root


def test_selection_follows_sources_listed_files_and_ignores(tmp_path: Path):
    root = _project(tmp_path / "proj")
    files = project_files(root, listed=[root / "assets/vocab.bin"], excluded=[root / "Saves", root / "data"])
    assert list(files) == ["assets/vocab.bin", "pkg/conf.yaml", "pkg/mod.py", "train.py"]
    (root / "pkg" / "blob.bin").write_text("listed folders take any file, minus ignores")
    files = project_files(root, listed=[root / "pkg"], excluded=[root / "Saves", root / "data"])
    assert list(files) == ["pkg/blob.bin", "pkg/conf.yaml", "pkg/mod.py", "train.py"]


def test_listed_file_outside_project_is_refused(tmp_path: Path):
    root = _project(tmp_path / "proj")
    (tmp_path / "outside.py").write_text("")
    with pytest.raises(DLNestError, match="outside the project folder"):
        project_files(root, listed=[tmp_path / "outside.py"], excluded=[])


def _snap(root: Path, save_root: Path, name: str) -> tuple[str, Path]:
    dest = save_root / name
    dest.mkdir(parents=True)
    tree = snapshot(root, save_root, [], [root / "data"], dest / "code")
    return tree, dest / "code"


def test_unchanged_project_shares_one_tree_and_changed_files_share_objects(tmp_path: Path):
    root = _project(tmp_path / "proj")
    saves = root / "Saves"
    t1, c1 = _snap(root, saves, "run1")
    t2, c2 = _snap(root, saves, "run2")
    assert t1 == t2 and c1.resolve() == c2.resolve() and c1.is_symlink()
    assert (c1 / "pkg/mod.py").read_text() == "X = 1\n"
    assert not os.access(c1 / "pkg/mod.py", os.W_OK) or os.geteuid() == 0
    assert (c1 / "pkg/mod.py").stat().st_mode & 0o222 == 0

    (root / "train.py").write_text("print('changed')\n")
    t3, c3 = _snap(root, saves, "run3")
    assert t3 != t1
    assert (c3 / "train.py").read_text() == "print('changed')\n"
    assert (c1 / "train.py").read_text() == "print('hi')\n"  # the old snapshot is untouched
    assert (c3 / "pkg/mod.py").stat().st_ino == (c1 / "pkg/mod.py").stat().st_ino  # shared, not copied
    objects = [p for p in CodeStore(saves).objects.rglob("*") if p.is_file()]
    assert len(objects) == 4  # conf.yaml, mod.py and two versions of train.py


def test_same_size_same_mtime_edit_is_still_seen(tmp_path: Path):
    """The stat cache keys on size, mtime and inode; a rewrite through a new inode must not be missed."""
    root = _project(tmp_path / "proj")
    _, c1 = _snap(root, root / "Saves", "run1")
    st = (root / "pkg/mod.py").stat()
    (root / "pkg/mod.py").unlink()
    (root / "pkg/mod.py").write_text("X = 2\n")
    os.utime(root / "pkg/mod.py", ns=(st.st_atime_ns, st.st_mtime_ns))
    _, c2 = _snap(root, root / "Saves", "run2")
    assert (c2 / "pkg/mod.py").read_text() == "X = 2\n"
