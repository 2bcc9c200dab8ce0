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

    def _store(self, source: str) -> str:
        """Store a file's bytes; hash the very bytes stored, even if the file changes meanwhile."""
        with open(source, "rb") as fh:
            data = fh.read()
        digest = _sha256(data)
        path = self._object_path(digest)
        if not path.exists():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
            tmp.write_bytes(data)
            tmp.chmod(0o444)  # objects are shared by many packages: never edit one in place
            os.replace(tmp, path)
        return digest

    def add_tree(self, project_dir: Path, files: dict[str, os.stat_result]) -> str:
        """Store ``files`` (project-relative posix path -> stat) and return the tree's hash.

        A file whose size, mtime, ctime and inode match the stat cache (git's index rule) is not read."""
        cache = self._load_cache()
        prefix = f"{project_dir}{os.sep}"
        seen: dict[str, list] = {}
        entries: dict[str, str] = {}
        for rel, st in files.items():
            key = prefix + rel
            sig = [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino]
            hit = cache.get(key)
            digest = hit[4] if hit and hit[:4] == sig else self._store(key)
            seen[key] = [*sig, digest]
            entries[rel] = digest
        manifest = json.dumps(sorted(entries.items()), separators=(",", ":"))
        tree_id = _sha256(manifest.encode())[:32]
        tree = self.trees / tree_id
        if not tree.exists():
            self._build_tree(tree, entries, prefix)
        fresh = {k: v for k, v in cache.items() if not k.startswith(prefix)} | seen  # forget deleted files
        if fresh != cache:
            atomic_write_text(self._cache_path, json.dumps(fresh))
        return tree_id

    def _build_tree(self, tree: Path, entries: dict[str, str], prefix: str) -> None:
        tmp = tree.with_name(f".{tree.name}.{os.getpid()}.tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        for rel, digest in entries.items():
            dest = tmp / rel
            dest.parent.mkdir(parents=True, exist_ok=True)
            obj = self._object_path(digest)
            if not obj.exists():  # the cache outlived the store (store pruned by hand): store it again
                digest = self._store(prefix + rel)
                obj = self._object_path(digest)
            try:
                os.link(obj, dest)
            except OSError:  # no hard links on this filesystem: a copy still keeps the promise
                shutil.copyfile(obj, dest)
        tmp.mkdir(parents=True, exist_ok=True)  # an empty project still gets a tree
        try:
            os.rename(tmp, tree)
        except OSError:  # another run built the same tree first
            shutil.rmtree(tmp, ignore_errors=True)


def _ignore_spec(project_dir: Path) -> pathspec.GitIgnoreSpec:
    ignore = project_dir / IGNORE_FILE
    lines = ignore.read_text().splitlines() if ignore.is_file() else []
    return pathspec.GitIgnoreSpec.from_lines(lines)


def _walk(top: str, rel_top: str, spec: pathspec.GitIgnoreSpec, excluded: set[str], any_suffix: bool,
          out: dict[str, os.stat_result]) -> None:
    """Collect files under ``top`` (``rel_top`` relative to the project) into ``out``; strings, not Paths,
    because this runs once per file of projects with thousands of them."""
    with os.scandir(top) as it:
        for entry in it:
            rel = f"{rel_top}{entry.name}"
            if entry.is_dir(follow_symlinks=False):
                if entry.name not in ALWAYS_IGNORED and entry.path not in excluded and not spec.match_file(rel + "/"):
                    _walk(entry.path, rel + "/", spec, excluded, any_suffix, out)
            elif entry.is_file() and (any_suffix or os.path.splitext(entry.name)[1] in SOURCE_SUFFIXES):
                if not spec.match_file(rel):
                    out[rel] = entry.stat()


def project_files(project_dir: Path, listed: Iterable[Path], excluded: Iterable[Path]) -> dict[str, os.stat_result]:
    """The project's source files plus every listed file or folder, as relative posix path -> stat.

    Excluded folders (saves, data), VCS/venv/cache folders and ``.dlnestignore`` patterns are never entered."""
    project_dir = project_dir.resolve()
    spec = _ignore_spec(project_dir)
    skip = {str(p.resolve()) for p in excluded}
    found: dict[str, os.stat_result] = {}
    _walk(str(project_dir), "", spec, skip, False, found)
    for path in listed:
        path = path.resolve()
        if not path.is_relative_to(project_dir):
            raise DLNestError(f"{path} is outside the project folder {project_dir}: snapshots hold only its files")
        rel = path.relative_to(project_dir).as_posix()
        if path.is_dir():
            _walk(str(path), rel + "/", spec, skip, True, found)
        else:
            found[rel] = path.stat()
    return dict(sorted(found.items()))


def snapshot(project_dir: Path, save_root: Path, listed: Iterable[Path], excluded: Iterable[Path],
             dest: Path) -> str:
    """Snapshot the project into the store and point ``dest`` (a package's ``code``) at it. Returns the tree id."""
    project_dir = project_dir.resolve()
    store = CodeStore(save_root)
    tree_id = store.add_tree(project_dir, project_files(project_dir, listed, [save_root, *excluded]))
    os.symlink(os.path.relpath(store.trees / tree_id, dest.parent), dest, target_is_directory=True)
    return tree_id
