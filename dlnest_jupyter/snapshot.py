"""Content-addressed code snapshots.

Every save package must import the code it was started with, yet 100 runs of an unchanged project should cost
about one copy. Files are stored once by SHA-256 under ``<save_root>/.dlnest_store/objects``; a snapshot is a
*tree* of hard links to those objects, itself named by the hash of its manifest, and a package's ``code`` is a
relative symlink to its tree. An unchanged project therefore costs one ``stat`` per file and one symlink.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable

import pathspec

from .errors import DLNestError
from .fsutil import atomic_write_text

STORE_DIR = ".dlnest_store"
IGNORE_FILE = ".dlnestignore"
#: Files of these kinds are source; anything else (data, weights, images) is left out unless listed.
SOURCE_SUFFIXES = frozenset(
    ".py .pyi .pyx .pxd .json .yaml .yml .toml .cfg .ini .txt .md .sh .c .cc .cpp .h .hpp .cu .cuh".split()
)
ALWAYS_IGNORED = frozenset(
    ".git .hg .svn __pycache__ .ipynb_checkpoints .venv venv env node_modules .mypy_cache .pytest_cache "
    ".ruff_cache .tox build dist".split()
)


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


class CodeStore:
    """The object store and trees shared by all packages of one save root."""

    def __init__(self, save_root: Path):
        self.root = save_root / STORE_DIR
        self.objects = self.root / "objects"
        self.trees = self.root / "trees"
        self._cache_path = self.root / "statcache.json"

    def _load_cache(self) -> dict[str, list]:
        try:
            return json.loads(self._cache_path.read_text())
        except (OSError, ValueError):
            return {}

    def _object_path(self, digest: str) -> Path:
        return self.objects / digest[:2] / digest[2:]

    def _ensure_object(self, digest: str, data: bytes) -> None:
        path = self._object_path(digest)
        if path.exists():
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        tmp.write_bytes(data)
        tmp.chmod(0o444)  # objects are shared by many packages: never edit one in place
        os.replace(tmp, path)

    def add_tree(self, project_dir: Path, files: Iterable[Path]) -> str:
        """Store ``files`` (absolute, inside ``project_dir``) and return the tree's hash."""
        cache = self._load_cache()
        entries: dict[str, str] = {}
        for path in files:
            rel = path.relative_to(project_dir).as_posix()
            st = path.stat()
            key = str(path)
            sig = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]  # as git's index does
            hit = cache.get(key)
            if hit and hit[:4] == sig and self._object_path(hit[4]).exists():
                entries[rel] = hit[4]
                continue
            data = path.read_bytes()  # hash the very bytes we store, even if the file changes meanwhile
            digest = _sha256(data)
            self._ensure_object(digest, data)
            cache[key] = [*sig, digest]
            entries[rel] = digest
        manifest = json.dumps(sorted(entries.items()), separators=(",", ":"))
        tree_id = _sha256(manifest.encode())[:32]
        tree = self.trees / tree_id
        if not tree.exists():
            self._build_tree(tree, entries)
        atomic_write_text(self._cache_path, json.dumps(cache))
        return tree_id

    def _build_tree(self, tree: Path, entries: dict[str, str]) -> None:
        tmp = tree.with_name(f".{tree.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for rel, digest in entries.items():
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            try:
                os.link(self._object_path(digest), dest)
            except OSError:  # no hard links on this filesystem: a copy still keeps the promise
                shutil.copyfile(self._object_path(digest), dest)
        tmp.mkdir(parents=True, exist_ok=True)  # an empty project still gets a tree
        try:
            os.rename(tmp, tree)
        except OSError:  # another run built the same tree first
            shutil.rmtree(tmp, ignore_errors=True)


def _ignore_spec(project_dir: Path) -> pathspec.GitIgnoreSpec:
    ignore = project_dir / IGNORE_FILE
    lines = ignore.read_text().splitlines() if ignore.is_file() else []
    return pathspec.GitIgnoreSpec.from_lines(lines)


def project_files(project_dir: Path, listed: Iterable[Path], excluded: Iterable[Path]) -> list[Path]:
    """The project's source files plus every listed file; excluded folders (saves, data) are never entered."""
    project_dir = project_dir.resolve()
    excluded = {p.resolve() for p in excluded}
    spec = _ignore_spec(project_dir)
    found: set[Path] = set()
    for dirpath, dirnames, filenames in os.walk(project_dir):
        here = Path(dirpath)
        rel_dir = here.relative_to(project_dir)
        dirnames[:] = sorted(
            d
            for d in dirnames
            if d not in ALWAYS_IGNORED
            and (here / d) not in excluded
            and not spec.match_file((rel_dir / d).as_posix() + "/")
        )
        for name in filenames:
            rel = (rel_dir / name).as_posix()
            if Path(name).suffix in SOURCE_SUFFIXES and not spec.match_file(rel):
                found.add(here / name)
    for path in listed:
        path = path.resolve()
        if not path.is_relative_to(project_dir):
            raise DLNestError(f"{path} is outside the project folder {project_dir}: snapshots hold only its files")
        found.update(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else found.add(path)
    return sorted(found)


def snapshot(project_dir: Path, save_root: Path, listed: Iterable[Path], excluded: Iterable[Path],
             dest: Path) -> str:
    """Snapshot the project into the store and point ``dest`` (a package's ``code``) at it. Returns the tree id."""
    store = CodeStore(save_root)
    tree_id = store.add_tree(project_dir, project_files(project_dir, listed, [save_root, *excluded]))
    os.symlink(os.path.relpath(store.trees / tree_id, dest.parent), dest, target_is_directory=True)
    return tree_id
