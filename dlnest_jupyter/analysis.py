"""Loading a finished (or running) package into this process and running analysis scripts against it."""
from __future__ import annotations

import importlib.util
import itertools
from pathlib import Path
from typing import Any, Callable

from .engine import Run, prepare_import_path, resolve_device
from .errors import DLNestError
from .package import SavePackage
from .usercode import call_user

_loads = itertools.count(1)


def _load(package: SavePackage, checkpoint: int | None, cpu: bool, private: bool) -> Run:
    prefix = f"_dlnest_pkg{next(_loads)}_{package.record()['id']}" if private else None
    run = Run.build(package, resolve_device(cpu), private_prefix=prefix)
    run.restore(checkpoint, rng=False)
    run.model.eval()
    return run


def load(record_path: str | Path, checkpoint: int | None = None, cpu: bool = True) -> Run:
    """Load a save package: its code snapshot imported under private module names, the user's ``init``
    hooks run, and the newest (or ``checkpoint``'s) weights loaded. Several packages can be loaded side by side.

    The result has ``.model``, ``.dataset``, ``.args``, ``.record``, ``.device`` (and the loaders)."""
    return _load(SavePackage.open(record_path), checkpoint, cpu, private=True)


def load_for_session(record_path: str | Path, checkpoint: int | None, cpu: bool) -> Run:
    """An analyzer session's load: one package per process, so the snapshot keeps its plain module names."""
    package = SavePackage.open(record_path)
    prepare_import_path(Path(package.record()["project_dir"]))
    return _load(package, checkpoint, cpu, private=False)


def find_script(run: Run, script: str) -> Path:
    """A path, or a name looked up in the live project's ``AnalyzeScripts/`` and then in the snapshot's."""
    direct = Path(script).expanduser()
    if direct.suffix == ".py" and direct.is_file():
        return direct.resolve()
    name = direct.name if direct.suffix == ".py" else f"{direct.name}.py"
    places = [Path(run.record["project_dir"]) / "AnalyzeScripts", run.code_dir / "AnalyzeScripts"]
    for folder in places:
        if (folder / name).is_file():
            return folder / name
    raise DLNestError(f"analysis script {script!r} not found (looked in {', '.join(map(str, places))})")


def script_function(path: Path) -> Callable[[Any], Any]:
    spec = importlib.util.spec_from_file_location(f"_dlnest_script_{path.stem}", path)
    assert spec and spec.loader
    module = importlib.util.module_from_spec(spec)
    call_user(path.parent, f"importing {path.name}", spec.loader.exec_module, module)
    func = getattr(module, "experience", None)
    if not callable(func):
        raise DLNestError(f"{path}: an analysis script must define experience(self)")
    return func


def run_experience(run: Run, func: Callable[[Any], Any]) -> Any:
    """Call ``func(run)``; an exception is reported with the script's frames only."""
    return call_user(Path(func.__code__.co_filename).parent, getattr(func, "__name__", "experience"), func, run)


def _run_script(run: Run, exp_func: Callable[[Any], Any] | str) -> Any:
    if isinstance(exp_func, str):
        exp_func = script_function(find_script(run, exp_func))
    return run_experience(run, exp_func)


def analyze(record_path: str | Path, exp_func: Callable[[Any], Any] | str, checkpoint: int | None = None,
            cpu: bool = True) -> Any:
    """Load the package and run ``exp_func(self)`` (a function, or a script name/path) against it."""
    return _run_script(load(record_path, checkpoint, cpu), exp_func)


def analyze_in_foreground(record_path: str | Path, script: str, checkpoint: int | None, cpu: bool) -> Any:
    """The CLI's ``analyze``: like a session's load, then one script."""
    return _run_script(load_for_session(record_path, checkpoint, cpu), script)
