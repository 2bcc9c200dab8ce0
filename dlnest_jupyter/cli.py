"""``python -m dlnest_jupyter VERB ...``: the engine from a terminal.

User mistakes print one ``dlnest_jupyter: error: ...`` line and exit with status 2; a failing training prints
the user code's traceback (its frames only) and exits with status 1."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
from pathlib import Path
from typing import Iterator, Sequence, TextIO

from .errors import DLNestError

PROG = "dlnest_jupyter"


class _Tee:
    """Writes to the terminal and to the package's output file (the seed's _output.txt)."""

    def __init__(self, stream: TextIO, sink: TextIO):
        self._stream, self._sink = stream, sink

    def write(self, text: str) -> int:
        self._stream.write(text)
        self._sink.write(text)
        return len(text)

    def flush(self) -> None:
        self._stream.flush()
        self._sink.flush()

    def isatty(self) -> bool:
        return False

    def __getattr__(self, name: str):
        return getattr(self._stream, name)


@contextlib.contextmanager
def tee_output(path: Path) -> Iterator[None]:
    with open(path, "a", encoding="utf-8", buffering=1) as sink:
        old = sys.stdout, sys.stderr
        sys.stdout, sys.stderr = _Tee(old[0], sink), _Tee(old[1], sink)
        try:
            yield
        finally:
            sys.stdout, sys.stderr = old


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="DLNest-style experiments: save packages, "
                                "resumable training and analysis.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB")

    new = sub.add_parser("new", help="scaffold a project (clean, or the complete MNIST example)")
    new.add_argument("directory", metavar="DIR")
    new.add_argument("-d", dest="directory_flag", metavar="DIR", help=argparse.SUPPRESS)  # seed spelling
    new.add_argument("--mnist", "-MNIST", action="store_true", help="the complete MNIST-style example")

    run = sub.add_parser("run", help="train in the foreground into a new save package")
    run.add_argument("-c", "--config", required=True, metavar="ROOT", help="the project's root_config.json")
    run.add_argument("-f", "--freq", metavar="FREQ", help="a freq config merged last (before --set)")
    run.add_argument("-d", "--description", default="", metavar="DESC", help="kept in record.json")
    run.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config value (dotted key, JSON value); repeatable")

    cont = sub.add_parser("continue", help="resume a package from its newest (or --ckpt N) checkpoint")
    cont.add_argument("-r", "--record", required=True, metavar="PKG", help="the save package folder")
    cont.add_argument("--ckpt", type=int, metavar="N", help="continue from epoch N's checkpoint")

    ana = sub.add_parser("analyze", help="run one analysis script against a package")
    ana.add_argument("-r", "--record", required=True, metavar="PKG", help="the save package folder")
    ana.add_argument("-s", "--script", required=True, metavar="SCRIPT",
                     help="a name in AnalyzeScripts/ (e.g. getAcc) or a path to a .py file")
    ana.add_argument("--ckpt", type=int, metavar="N", help="load epoch N's checkpoint (default: newest)")

    for cmd in (run, cont, ana):
        cmd.add_argument("--cpu", "-CPU", action="store_true", help="run on the CPU")
    return p


def _new(ns: argparse.Namespace) -> int:
    from .scaffold import new_project

    dest = new_project(ns.directory, ns.mnist)
    kind = "MNIST example" if ns.mnist else "project"
    print(f"created {kind} in {dest}\nnext: python -m {PROG} run -c {dest / 'root_config.json'} --cpu")
    return 0


def _train(pkg, ns: argparse.Namespace, resume: bool) -> int:
    from .engine import prepare_import_path, resolve_device
    from .training import train

    device = resolve_device(ns.cpu)
    prepare_import_path(Path(pkg.record()["project_dir"]))
    with tee_output(pkg.output_path()):
        print(f"[dlnest] save package: {pkg.path}", flush=True)
        try:
            train(pkg, device, resume=resume, ckpt=getattr(ns, "ckpt", None), command=[PROG, *sys.argv[1:]],
                  progress_stream=sys.__stderr__)
        except DLNestError as exc:  # reported inside the tee, so the package's output keeps it too
            return _report(exc)
        print(f"[dlnest] done: {pkg.path}", flush=True)
    return 0


def _run(ns: argparse.Namespace) -> int:
    from .config import load_config
    from .engine import resolve_device
    from .package import SavePackage

    cfg = load_config(ns.config, ns.freq, ns.overrides)
    resolve_device(ns.cpu)  # fail before creating a package that could never run here
    pkg = SavePackage.create(cfg, command=[PROG, *sys.argv[1:]], description=ns.description)
    from .envinfo import capture_env

    capture_env(pkg.env_dir, cfg.project_dir)
    return _train(pkg, ns, resume=False)


def _continue(ns: argparse.Namespace) -> int:
    from .package import SavePackage

    return _train(SavePackage.open(ns.record), ns, resume=True)


def _analyze(ns: argparse.Namespace) -> int:
    from .analysis import analyze_in_foreground

    result = analyze_in_foreground(ns.record, ns.script, ns.ckpt, ns.cpu)
    if result is not None:
        print(repr(result))
    return 0


def _report(exc: DLNestError) -> int:
    """One error line; user code that failed mid-run also gets its own frames (ours would not help)."""
    from .usercode import UserCodeError

    if isinstance(exc, UserCodeError):
        sys.stderr.write(exc.user_traceback)
    print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
    return 1 if isinstance(exc, UserCodeError) else 2


VERBS = {"new": _new, "run": _run, "continue": _continue, "analyze": _analyze}


def main(argv: Sequence[str] | None = None) -> int:
    ns = _parser().parse_args(argv)
    if ns.verb == "new" and ns.directory_flag:
        ns.directory = ns.directory_flag
    try:
        return VERBS[ns.verb](ns)
    except DLNestError as exc:
        return _report(exc)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
