"""An analyzer session's process: a save package loaded into a real IPython kernel.

The package's code snapshot is imported and the model loaded from a checkpoint *before* the kernel starts,
so a broken package fails the task with its error instead of leaving a kernel without ``self``. The kernel
listens on ipc sockets in the user's private session folder; its connection file (0600) carries the HMAC key.

Usage (by the supervisor only): ``python -m dlnest_jupyter.session_kernel CONNECTION_FILE PACKAGE CKPT|- [--cpu]``.
"""
from __future__ import annotations

import sys
from pathlib import Path
from typing import Any


def _tee_streams(log_path: Path, shell: Any) -> None:
    """Everything the session prints also goes to the session's log file (the kernel's streams go to clients).

    Block-buffered and flushed after each request: a write per printed line would halve print throughput."""
    log = open(log_path, "a", encoding="utf-8")
    shell.events.register("post_execute", log.flush)
    for stream in (sys.stdout, sys.stderr):
        write = stream.write

        def tee(text: str, _write: Any = write) -> int:
            log.write(text)
            return _write(text)

        stream.write = tee  # type: ignore[method-assign]


def run_experiment(run: Any, name: str) -> Any:
    """``%runExp NAME``: call ``experience(self)`` of the script; its failure prints the script's frames only
    and leaves the session alive."""
    from .analysis import find_script, run_experience, script_function
    from .errors import DLNestError
    from .usercode import UserCodeError

    try:
        return run_experience(run, script_function(find_script(run, name)))
    except UserCodeError as exc:
        sys.stderr.write(exc.user_traceback)
    except DLNestError as exc:
        print(f"dlnest: error: {exc}", file=sys.stderr)
    return None


def main(argv: list[str]) -> None:
    connection_file, package, ckpt = argv[:3]
    cpu = "--cpu" in argv[3:]
    from .analysis import load_for_session

    run = load_for_session(package, None if ckpt == "-" else int(ckpt), cpu)
    print(f"[dlnest] session loaded {package} (epoch {run.epoch}) on {run.device}", flush=True)

    from ipykernel.kernelapp import IPKernelApp

    app = IPKernelApp.instance(connection_file=connection_file, transport="ipc",
                               ip=str(Path(connection_file).with_suffix("")), user_ns={"self": run})
    app.user_ns["__dlnest_exp__"] = lambda name: run_experiment(run, name)
    import importlib.util

    if importlib.util.find_spec("matplotlib") is not None:
        app.matplotlib = "inline"  # figures come back to the notebook as display data
    app.initialize([])
    _tee_streams(Path(package) / f"_session_{Path(connection_file).stem}.txt", app.shell)
    app.start()


if __name__ == "__main__":
    main(sys.argv[1:])
