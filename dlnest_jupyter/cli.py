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


class Parser(argparse.ArgumentParser):
    """Bad arguments become a ``DLNestError`` (one line), in a terminal and in a notebook alike."""

    def error(self, message: str):  # type: ignore[override]
        raise DLNestError(f"{self.prog}: {message}")


def _positive_mb(text: str) -> int:
    try:
        value = int(float(text))
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"-m must be a positive number of MiB, got {text!r}")
    return value


def add_run_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-c", "--config", required=True, metavar="ROOT", help="the project's root_config.json")
    p.add_argument("-f", "--freq", metavar="FREQ", help="a freq config merged last (before --set)")
    p.add_argument("-d", "--description", default="", metavar="DESC", help="kept in record.json")
    p.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                   help="override a config value (dotted key, JSON value); repeatable")


def add_continue_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-r", "--record", required=True, metavar="PKG", help="the save package folder")
    p.add_argument("--ckpt", type=int, metavar="N", help="continue from epoch N's checkpoint")


def add_queue_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("-m", "--memory", type=_positive_mb, metavar="MB", help="GPU memory to reserve (MiB)")
    p.add_argument("--priority", type=int, default=0, metavar="N", help="higher starts first (default 0)")
    p.add_argument("--attached", action="store_true", help="end the task when this process ends")


def add_ddp_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--ddp", "-DDP", action="store_true", help="DistributedDataParallel over several devices")
    p.add_argument("--gpus", type=int, metavar="N", help="with --ddp: this many GPUs, each with MB free; with "
                   "--executor slurm: GPUs per node")
    p.add_argument("--procs", type=int, metavar="N", help="with --cpu --ddp: this many CPU ranks (gloo)")


def add_executor_arguments(p: argparse.ArgumentParser) -> None:
    """Where a queued task runs (default: the root config's "executor" block, else this machine)."""
    p.add_argument("--executor", choices=("local", "slurm"), help="local (a supervisor here, the default) or slurm "
                   "(a Slurm job through submitit)")
    p.add_argument("--partition", metavar="P", help="with --executor slurm: the Slurm partition")
    p.add_argument("--nodes", type=int, metavar="K", help="with --executor slurm --ddp: ranks on K nodes")
    p.add_argument("--time", metavar="HH:MM:SS", help="with --executor slurm: the job's time limit")


def add_cpu_argument(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cpu", "-CPU", action="store_true", help="run on the CPU")


def add_new_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("directory", metavar="DIR")
    p.add_argument("--mnist", "-MNIST", action="store_true", help="the complete MNIST example")


class HelpShown(Exception):
    """``-h`` printed its help: the magic stops there (argparse would exit the kernel's process)."""


class MagicParser(Parser):
    def exit(self, status: int = 0, message: str | None = None):  # type: ignore[override]
        raise HelpShown


def magic_parser(prog: str, *adders) -> Parser:
    """A parser for a magic, built from the same argument definitions as the CLI verb."""
    p = MagicParser(prog=prog, add_help=True)
    for add in adders:
        add(p)
    return p


def _parser() -> argparse.ArgumentParser:
    p = Parser(prog=PROG, description="DLNest-style experiments: save packages, resumable training, analysis "
               "and a GPU task queue.")
    sub = p.add_subparsers(dest="verb", required=True, metavar="VERB", parser_class=Parser)

    add_new_arguments(sub.add_parser("new", help="scaffold a project (clean, or the complete MNIST example)"))
    run = sub.add_parser("run", help="train in the foreground into a new save package")
    add_run_arguments(run)
    cont = sub.add_parser("continue", help="resume a package in the foreground from its newest (or --ckpt N) "
                          "checkpoint")
    add_continue_arguments(cont)
    ana = sub.add_parser("analyze", help="run one analysis script against a package")
    ana.add_argument("-r", "--record", required=True, metavar="PKG", help="the save package folder")
    ana.add_argument("-s", "--script", required=True, metavar="SCRIPT",
                     help="a name in AnalyzeScripts/ (e.g. getAcc) or a path to a .py file")
    ana.add_argument("--ckpt", type=int, metavar="N", help="load epoch N's checkpoint (default: newest)")
    submit = sub.add_parser("submit", help="queue a training task (placed on a GPU, run in the background)")
    add_run_arguments(submit)
    add_queue_arguments(submit)
    add_ddp_arguments(submit)
    add_executor_arguments(submit)
    resubmit = sub.add_parser("resubmit", help="queue a continue of a package (background)")
    add_continue_arguments(resubmit)
    add_queue_arguments(resubmit)
    add_ddp_arguments(resubmit)
    add_executor_arguments(resubmit)
    tasks = sub.add_parser("tasks", help="list this user's tasks, newest first")
    tasks.add_argument("--active", action="store_true", help="only queued, starting and running tasks")
    dele = sub.add_parser("del", help="stop a task (its whole process tree)")
    dele.add_argument("task_id", metavar="ID")
    sub.add_parser("gpus", help="list GPUs (memory used/reserved/free) and CPU/RAM")
    session = sub.add_parser("session", help="start an analyzer session (A_...) on a package; prints its id")
    session.add_argument("-r", "--record", required=True, metavar="PKG", help="the save package folder")
    session.add_argument("--ckpt", type=int, metavar="N", help="load epoch N's checkpoint (default: newest)")
    add_queue_arguments(session)
    exp = sub.add_parser("exp", help="run AnalyzeScripts/NAME.py in an analyzer session")
    exp.add_argument("session_id", metavar="ID")
    exp.add_argument("name", metavar="NAME")
    serve = sub.add_parser("serve", help="keep the queue moving without Jupyter: dispatch until SIGTERM or Ctrl-C")
    serve.add_argument("--poll", type=float, default=1.0, metavar="S", help="seconds between queue checks (default 1)")
    worker = sub.add_parser("worker")  # the supervisor's child: trains a package whose output it redirects
    worker.add_argument("--package", required=True)
    worker.add_argument("--resume", action="store_true")
    worker.add_argument("--ckpt", type=int)
    worker.add_argument("--rank", type=int, default=0)
    worker.add_argument("--world-size", type=int, default=1)
    worker.add_argument("--local-rank", type=int, help="DDP: this rank's GPU on its node (default: --rank)")
    worker.add_argument("--rendezvous", help="DDP: the FileStore path all ranks meet at, or a tcp:// URL (Slurm, "
                        "several nodes)")
    for cmd in (run, cont, ana, submit, resubmit, worker, session):
        add_cpu_argument(cmd)
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


def _submit(ns: argparse.Namespace) -> int:
    from . import api

    task = api.submit(ns.config, freq=ns.freq, overrides=ns.overrides, description=ns.description, cpu=ns.cpu,
                      memory_mb=ns.memory, priority=ns.priority, attached=ns.attached, ddp=ns.ddp, gpus=ns.gpus,
                      procs=ns.procs, executor=ns.executor, partition=ns.partition, nodes=ns.nodes, time=ns.time,
                      command=[PROG, *sys.argv[1:]])
    print(task.id)
    return 0


def _resubmit(ns: argparse.Namespace) -> int:
    from . import api

    task = api.continue_(ns.record, cpu=ns.cpu, memory_mb=ns.memory, ckpt=ns.ckpt, priority=ns.priority,
                         attached=ns.attached, ddp=ns.ddp, gpus=ns.gpus, procs=ns.procs, executor=ns.executor,
                         partition=ns.partition, nodes=ns.nodes, time=ns.time, command=[PROG, *sys.argv[1:]])
    print(task.id)
    return 0


def _tasks(ns: argparse.Namespace) -> int:
    from .listing import tasks_table

    print(tasks_table(active_only=ns.active))
    return 0


def _del(ns: argparse.Namespace) -> int:
    from . import api

    print(repr(api.cancel(ns.task_id)))
    return 0


def _gpus(ns: argparse.Namespace) -> int:
    from .listing import gpus_table

    print(gpus_table())
    return 0


def _session(ns: argparse.Namespace) -> int:
    from . import sessions

    print(sessions.start(ns.record, ckpt=ns.ckpt, cpu=ns.cpu, memory_mb=ns.memory, attached=ns.attached,
                         command=[PROG, *sys.argv[1:]]).id)
    return 0


def _exp(ns: argparse.Namespace) -> int:
    from . import sessions

    return 0 if sessions.run_experiment(ns.session_id, ns.name, rich=False)["status"] == "ok" else 1


def _worker(ns: argparse.Namespace) -> int:
    """Runs under a supervisor (one per DDP rank): output already goes to the package; SIGTERM ends
    training cleanly (an in-flight checkpoint still lands)."""
    import torch

    from .engine import prepare_import_path, resolve_device
    from .package import SavePackage
    from .training import stop_on_sigterm, train

    stop_on_sigterm()
    pkg = SavePackage.open(ns.package)
    prepare_import_path(Path(pkg.record()["project_dir"]))
    device = resolve_device(ns.cpu)
    if ns.world_size > 1:
        import torch.distributed as dist

        if device.type == "cuda":  # the supervisor (or Slurm) made exactly this node's task GPUs visible
            device = torch.device("cuda", ns.rank if ns.local_rank is None else ns.local_rank)
            torch.cuda.set_device(device)
        init = ns.rendezvous if "://" in ns.rendezvous else f"file://{ns.rendezvous}"
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo", init_method=init,
                                rank=ns.rank, world_size=ns.world_size)
    if not ns.resume and ns.rank == 0:
        from .envinfo import capture_env

        capture_env(pkg.env_dir, Path(pkg.record()["project_dir"]))
    rank_note = f" rank {ns.rank}/{ns.world_size}" if ns.world_size > 1 else ""
    print(f"[dlnest] {os.environ.get('DLNEST_TASK_ID', 'task')}{rank_note} on {device}: {pkg.path}", flush=True)
    try:
        run = train(pkg, device, resume=ns.resume, ckpt=ns.ckpt, command=[PROG, *sys.argv[1:]], rank=ns.rank,
                    world_size=ns.world_size)
    except DLNestError as exc:
        return _report(exc)
    print(f"[dlnest] done: {pkg.path}", flush=True)
    if ns.world_size > 1:  # gloo aborts now and then when a rank exits with its group alive (DESIGN, section 8)
        import gc

        import torch.distributed as dist

        del run
        gc.collect()
        dist.destroy_process_group()
    sys.stderr.flush()
    os._exit(0)  # everything is on disk; skipping interpreter teardown (seconds with torch) frees the device now


def _analyze(ns: argparse.Namespace) -> int:
    from .analysis import analyze_in_foreground

    result = analyze_in_foreground(ns.record, ns.script, ns.ckpt, ns.cpu)
    if result is not None:
        print(repr(result))
    return 0


def _serve(ns: argparse.Namespace) -> int:
    from .server import serve

    return serve(ns.poll)


def _report(exc: DLNestError) -> int:
    """One error line; user code that failed mid-run also gets its own frames (ours would not help)."""
    from .usercode import UserCodeError

    if isinstance(exc, UserCodeError):
        sys.stderr.write(exc.user_traceback)
    print(f"{PROG}: error: {exc}", file=sys.stderr, flush=True)
    return 1 if isinstance(exc, UserCodeError) else 2


VERBS = {"new": _new, "run": _run, "continue": _continue, "analyze": _analyze, "submit": _submit,
         "resubmit": _resubmit, "tasks": _tasks, "del": _del, "gpus": _gpus, "worker": _worker, "session": _session, "exp": _exp,
         "serve": _serve}


def main(argv: Sequence[str] | None = None) -> int:
    try:
        ns = _parser().parse_args(argv)
        return VERBS[ns.verb](ns)
    except DLNestError as exc:
        return _report(exc)
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130
