"""Importing the user's classes from a code snapshot, and reporting their errors without our internals."""
from __future__ import annotations

import ast
import importlib.util
import os
import sys
import traceback
from pathlib import Path
from types import ModuleType
from typing import TYPE_CHECKING, Any, Callable

from .errors import DLNestError

if TYPE_CHECKING:
    from .config import ProjectConfig

ROLES = {  # role -> (file key, class key)
    "Model": ("model_file_path", "model_name"),
    "Dataset": ("dataset_file_path", "dataset_name"),
    "LifeCycle": ("life_cycle_file_path", "life_cycle_name"),
}


class UserCodeError(DLNestError):
    """User code raised: the message names the user's file and line; ``user_traceback`` has its frames only."""

    def __init__(self, message: str, user_traceback: str):
        super().__init__(message)
        self.user_traceback = user_traceback


def _user_frames(exc: BaseException, code_dir: Path) -> list[traceback.FrameSummary]:
    root = code_dir.resolve()
    return [f for f in traceback.extract_tb(exc.__traceback__) if Path(f.filename).resolve().is_relative_to(root)]


def user_error(exc: BaseException, code_dir: Path, what: str) -> UserCodeError:
    """Wrap an exception from user code: one line naming the file, plus a traceback of user frames only."""
    frames = _user_frames(exc, code_dir)
    where = ""
    if frames:
        rel = Path(frames[-1].filename).resolve().relative_to(code_dir.resolve())
        where = f"{rel}:{frames[-1].lineno}: "
    exc_line = "".join(traceback.format_exception_only(type(exc), exc)).strip()
    tb = "Traceback (user code):\n" + "".join(traceback.format_list(frames)) + exc_line + "\n"
    return UserCodeError(f"{where}{what} raised {exc_line}", tb)


def call_user(code_dir: Path, what: str, fn: Callable[..., Any], *args: Any) -> Any:
    try:
        return fn(*args)
    except DLNestError:
        raise
    except Exception as exc:
        raise user_error(exc, code_dir, what) from exc


def _top_level_names(tree: ast.Module) -> set[str]:
    names: set[str] = set()
    for node in tree.body:
        if isinstance(node, (ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            names.add(node.name)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names.update((a.asname or a.name).split(".")[0] for a in node.names)
        elif isinstance(node, (ast.Assign, ast.AnnAssign)):
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            names.update(t.id for t in targets if isinstance(t, ast.Name))
    return names


def check_classes(cfg: ProjectConfig) -> None:
    """Before anything is created: each named file parses and defines its named class (read, not run)."""
    for file_key, class_key in ROLES.values():
        path = cfg.path_of(file_key)
        rel = cfg.args[file_key]
        try:
            tree = ast.parse(path.read_bytes(), filename=str(path))
        except SyntaxError as exc:
            raise DLNestError(f"{path}:{exc.lineno}:{exc.offset}: syntax error: {exc.msg}") from None
        names = _top_level_names(tree)
        if cfg.args[class_key] not in names and "*" not in names:
            raise DLNestError(f"{rel} has no class {cfg.args[class_key]!r} (named by {class_key} in "
                              f"{cfg.root_path.name})")


def _module_name(rel: Path) -> str:
    parts = rel.with_suffix("").parts
    if all(p.isidentifier() for p in parts):
        return ".".join(parts)
    return "_dlnest_user_" + "_".join("".join(c if c.isalnum() else "_" for c in p) for p in parts)


def _load_module(path: Path, name: str) -> ModuleType:
    if name in sys.modules and Path(getattr(sys.modules[name], "__file__", "") or "") == path:
        return sys.modules[name]
    spec = importlib.util.spec_from_file_location(name, path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    return module


def _module_files(module: ModuleType) -> list[str]:
    """A module's file and, for a package, its folders (only real string paths)."""
    paths = [getattr(module, "__file__", None)]
    try:
        paths += list(getattr(module, "__path__", None) or [])
    except TypeError:  # some extension modules expose a non-iterable __path__
        pass
    return [p for p in paths if isinstance(p, str)]


def _owned_by(module: ModuleType, root: Path) -> bool:
    return any(Path(p).resolve().is_relative_to(root) for p in _module_files(module))


#: Code snapshots imported under their plain module names in this process.
_imported_snapshots: set[str] = set()


def _forget_other_snapshots(code_dir: str) -> None:
    """Drop modules and ``sys.path`` entries of snapshots imported earlier in this process, so that
    ``import Model.MNISTCNN`` in this package cannot resolve to another package's module."""
    others = tuple(f"{d}{os.sep}" for d in _imported_snapshots - {code_dir})
    if not others:
        return
    sys.path[:] = [p for p in sys.path if f"{p}{os.sep}" not in others]
    for name, module in list(sys.modules.items()):
        file = getattr(module, "__file__", None)
        if isinstance(file, str) and not file.startswith(others):
            continue  # the common case, decided without looking further
        if any(f.startswith(others) for f in _module_files(module)):
            del sys.modules[name]


def _rename(module: ModuleType, old: str, new: str) -> None:
    """Re-register a module (and the classes it defines) under a new name, so pickling still finds them."""
    del sys.modules[old]
    sys.modules[new] = module
    module.__name__ = new
    for value in vars(module).values():
        if isinstance(value, type) and value.__module__ == old:
            value.__module__ = new


def import_classes(cfg: ProjectConfig, private_prefix: str | None = None) -> dict[str, type]:
    """Import the Model, Dataset and LifeCycle classes from ``cfg.project_dir`` (a package's code snapshot).

    The snapshot goes first on ``sys.path`` so the user's own imports resolve to it. With
    ``private_prefix``, the modules it loaded are renamed ``<prefix>.<name>`` afterwards and the snapshot
    leaves ``sys.path``, so several packages can be loaded in one process (imports made lazily, inside
    functions, then resolve to whatever ``sys.path`` holds at that time)."""
    code_dir = cfg.project_dir
    root = code_dir.resolve()
    if not private_prefix:
        _forget_other_snapshots(str(code_dir))
        _imported_snapshots.add(str(code_dir))
    sys.path.insert(0, str(code_dir))
    before = set(sys.modules)
    classes: dict[str, type] = {}
    try:
        for role, (file_key, class_key) in ROLES.items():
            path = code_dir / cfg.args[file_key]
            rel = path.relative_to(code_dir)
            module = call_user(code_dir, f"importing {rel}", _load_module, path, _module_name(rel))
            cls = getattr(module, cfg.args[class_key], None)
            if not isinstance(cls, type):
                raise DLNestError(f"{rel} has no class {cfg.args[class_key]!r} "
                                  f"(named by {class_key} in {cfg.root_path.name})")
            classes[role] = cls
    finally:
        if private_prefix:
            sys.path.remove(str(code_dir))
            for name in set(sys.modules) - before:
                module = sys.modules[name]
                if _owned_by(module, root):
                    _rename(module, name, f"{private_prefix}.{name}")
    return classes
