"""IPython magics: ``%load_ext dlnest_jupyter`` registers them, opens the ledger and starts the dispatcher.

Bad input prints one ``dlnest: error:`` line and changes nothing; no magic ever blocks on a running task."""
from __future__ import annotations

import shlex
import sys
from typing import Any, Callable

from IPython.core.magic import Magics, cell_magic, line_magic, magics_class

from . import api
from .cli import (HelpShown, add_continue_arguments, add_cpu_argument, add_ddp_arguments, add_executor_arguments,
                  add_new_arguments, add_queue_arguments, add_run_arguments, magic_parser)
from .errors import DLNestError

_dispatcher = None


class SessionCellError(Exception):
    """The cell failed inside the session (its traceback is already shown): fail this cell too, so that
    "Run All" stops, without a second traceback of our own frames."""

    def __init__(self, session_id: str):
        super().__init__(f"the cell failed in session {session_id}")

    def _render_traceback_(self) -> list[str]:  # IPython shows this instead of a traceback
        return [f"dlnest: {self}"]


def _parse(prog: str, line: str, *adders: Callable) -> Any:
    parser = magic_parser(prog, *adders)
    return parser.parse_args(shlex.split(line))


def _guard(fn: Callable) -> Callable:
    """One clear line instead of a traceback for user mistakes."""
    def wrapper(self: Any, line: str = "", *cell: str) -> Any:
        try:
            return fn(self, line, *cell)
        except HelpShown:
            return None
        except DLNestError as exc:
            print(f"dlnest: error: {exc}", file=sys.stderr)
            return None
        except ValueError as exc:  # shlex: unbalanced quotes
            print(f"dlnest: error: {exc}", file=sys.stderr)
            return None
    wrapper.__name__, wrapper.__doc__ = fn.__name__, fn.__doc__
    return wrapper


@magics_class
class DLNestMagics(Magics):
    @line_magic
    @_guard
    def dlnest_run(self, line: str) -> api.Task:
        """Queue a training task: %dlnest_run -c ROOT [--cpu] [-m MB] [--priority N] [--attached] [-f FREQ]
        [-d DESC] [--set k=v ...] [--ddp [--gpus N | --procs N]] [--executor slurm [--partition P] [--gpus N]
        [--nodes K] [--time HH:MM:SS]]. Returns its Task handle."""
        ns = _parse("%dlnest_run", line, add_run_arguments, add_queue_arguments, add_ddp_arguments,
                    add_executor_arguments, add_cpu_argument)
        return api.submit(ns.config, freq=ns.freq, overrides=ns.overrides, description=ns.description, cpu=ns.cpu,
                          memory_mb=ns.memory, priority=ns.priority, attached=ns.attached, ddp=ns.ddp,
                          gpus=ns.gpus, procs=ns.procs, executor=ns.executor, partition=ns.partition,
                          nodes=ns.nodes, time=ns.time, command=["%dlnest_run", *shlex.split(line)])

    @line_magic
    @_guard
    def dlnest_continue(self, line: str) -> api.Task:
        """Queue a continue: %dlnest_continue -r PKG [--cpu] [-m MB] [--ckpt N] [--priority N] [--attached]."""
        ns = _parse("%dlnest_continue", line, add_continue_arguments, add_queue_arguments, add_ddp_arguments,
                    add_executor_arguments, add_cpu_argument)
        return api.continue_(ns.record, cpu=ns.cpu, memory_mb=ns.memory, ckpt=ns.ckpt, priority=ns.priority,
                             attached=ns.attached, ddp=ns.ddp, gpus=ns.gpus, procs=ns.procs, executor=ns.executor,
                             partition=ns.partition, nodes=ns.nodes, time=ns.time,
                             command=["%dlnest_continue", *shlex.split(line)])

    @line_magic
    @_guard
    def dlnest_del(self, line: str) -> api.Task:
        """Stop a task and its whole process tree: %dlnest_del ID."""
        ns = _parse("%dlnest_del", line, lambda p: p.add_argument("task_id", metavar="ID"))
        return api.cancel(ns.task_id)

    @line_magic
    @_guard
    def dlnest_tasks(self, line: str) -> None:
        """List this user's tasks (all kernels), newest first: %dlnest_tasks [--active]."""
        from .listing import tasks_table

        ns = _parse("%dlnest_tasks", line, lambda p: p.add_argument("--active", action="store_true"))
        print(tasks_table(ns.active))

    @line_magic
    @_guard
    def dlnest_gpus(self, line: str) -> None:
        """GPU memory (used, reserved by tasks, free), utilisation, and CPU/RAM: %dlnest_gpus."""
        from .listing import gpus_table

        _parse("%dlnest_gpus", line)
        print(gpus_table())

    @line_magic
    @_guard
    def dlnest_analyze(self, line: str) -> api.Task:
        """Start an analyzer session (A_...) on a package: %dlnest_analyze -r PKG [--ckpt N] [--cpu] [-m MB].
        It becomes this notebook's current session."""
        from . import sessions

        def add(p: Any) -> None:
            p.add_argument("-r", "--record", required=True, metavar="PKG", help="the save package folder")
            p.add_argument("--ckpt", type=int, metavar="N", help="load epoch N's checkpoint (default: newest)")

        ns = _parse("%dlnest_analyze", line, add, add_queue_arguments, add_cpu_argument)
        return sessions.start(ns.record, ckpt=ns.ckpt, cpu=ns.cpu, memory_mb=ns.memory, attached=ns.attached,
                              command=["%dlnest_analyze", *shlex.split(line)])

    @line_magic
    @_guard
    def runExp(self, line: str) -> None:  # noqa: N802 - the seed's name
        """Run experience(self) of AnalyzeScripts/NAME.py in the current (or named) session: %runExp [ID] NAME."""
        from . import sessions

        def add(p: Any) -> None:
            p.add_argument("args", nargs="+", metavar="[ID] NAME")

        ns = _parse("%runExp", line, add)
        if len(ns.args) > 2:
            raise DLNestError("%runExp takes [ID] NAME")
        task_id, name = (None, ns.args[0]) if len(ns.args) == 1 else ns.args
        sessions.run_experiment(task_id, name)

    @cell_magic
    @_guard
    def dlnest_exp(self, line: str, cell: str) -> None:
        """Run this cell inside the current (or named) session, with ``self`` bound: %%dlnest_exp [ID]."""
        from . import sessions

        ns = _parse("%%dlnest_exp", line, lambda p: p.add_argument("task_id", nargs="?", metavar="ID"))
        if sessions.execute(ns.task_id, cell)["status"] == "error":
            raise SessionCellError(sessions.resolve(ns.task_id))

    @line_magic
    @_guard
    def dlnest_watch(self, line: str) -> None:
        """Show a task's (or session's) output live in this cell: %dlnest_watch ID [-n LINES] [--rank R]."""
        from .watch import watch

        def add(p: Any) -> None:
            p.add_argument("task_id", metavar="ID")
            p.add_argument("-n", "--lines", type=int, default=40, help="lines of tail shown (default 40)")
            p.add_argument("--rank", type=int, default=0, help="a DDP task's rank to show (default 0)")

        ns = _parse("%dlnest_watch", line, add)
        watch(ns.task_id, ns.lines, ns.rank)

    @line_magic
    @_guard
    def dlnest_withdraw(self, line: str) -> None:
        """Stop the live output of %dlnest_watch (the task keeps running)."""
        from .watch import withdraw

        _parse("%dlnest_withdraw", line)
        withdraw()

    @line_magic
    @_guard
    def dlnest_panel(self, line: str) -> None:
        """Show the panel: GPUs, tasks (stop/continue/watch/analyze), live output and metric plots."""
        from IPython.display import display

        from .panels import panel

        _parse("%dlnest_panel", line)
        display(panel())

    @line_magic
    @_guard
    def dlnest_new(self, line: str) -> None:
        """Scaffold a project: %dlnest_new DIR [--mnist]."""
        from .scaffold import new_project

        ns = _parse("%dlnest_new", line, add_new_arguments)
        print(f"created {'MNIST example' if ns.mnist else 'project'} in {new_project(ns.directory, ns.mnist)}")


def load(ipython: Any) -> None:
    """Register the magics, start this kernel's dispatcher, and end ``--attached`` tasks with the kernel."""
    global _dispatcher
    import atexit

    from .scheduler import Dispatcher

    ipython.register_magics(DLNestMagics)
    if _dispatcher is None:
        _dispatcher = Dispatcher(api.ledger())
        api.set_waker(_dispatcher.wake)
        atexit.register(_end_attached)


def unload(ipython: Any) -> None:
    """``%unload_ext dlnest_jupyter``: stop this kernel's dispatcher (tasks keep running)."""
    global _dispatcher
    import atexit

    if _dispatcher is not None:
        _dispatcher.stop()
        _dispatcher = None
        api.set_waker(None)
        atexit.unregister(_end_attached)


def _end_attached() -> None:
    import os

    if api._ledger is None or not api._ledger.path.exists():  # never recreate a ledger at exit
        return
    for t in api._ledger.tasks(("queued", "starting", "running")):
        owner = t["request"].get("attached")
        if owner and owner["pid"] == os.getpid():
            try:
                api.cancel(t["id"], timeout=5)
            except Exception:
                pass
