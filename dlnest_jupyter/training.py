"""The training loop: the user's hooks in the seed's order, metrics, checkpoints and the package record."""
from __future__ import annotations

import json
import math
import signal
import sys
import threading
import time
from pathlib import Path
from typing import Any, TextIO

import torch

from .checkpoint import Checkpoints
from .engine import Run, seed_everything
from .errors import DLNestError
from .fsutil import atomic_write_json, atomic_write_text
from .model import to_device
from .package import SavePackage, now_iso
from .usercode import call_user


def _scalar(value: Any) -> float | int | None:
    if isinstance(value, torch.Tensor):
        return value.item() if value.numel() == 1 else None
    if isinstance(value, bool):
        return int(value)
    if isinstance(value, (int, float)):
        return value
    try:  # numpy scalars
        return float(value)
    except (TypeError, ValueError):
        return None


class MetricsWriter:
    """Appends one JSON line per step in which log lists grew, with the newest value of each grown list.

    Lines reach the file at most ``flush_every`` seconds late: readers tail it, and a flush per step would
    cost the training loop a system call per step."""

    def __init__(self, path: Path, log: dict[str, Any], flush_every: float = 0.5):
        self.path = path
        self._seen = {k: len(v) for k, v in log.items() if isinstance(v, list)}
        self._fh = open(path, "a", encoding="utf-8")
        self._flush_every = flush_every
        self._flushed = time.monotonic()

    def truncate_after(self, iter: int) -> None:
        """On continue: drop lines the interrupted attempt wrote after the checkpoint (they are replayed)."""
        self._fh.close()
        kept = []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                row = json.loads(line)
            except ValueError:  # a line cut short by the kill
                continue
            if row.get("iter", 0) <= iter:
                kept.append(line + "\n")
        atomic_write_text(self.path, "".join(kept), durable=True)
        self._fh = open(self.path, "a", encoding="utf-8")

    def update(self, log: dict[str, Any], iter: int, epoch: int) -> dict[str, Any]:
        row: dict[str, Any] = {}
        for key, values in log.items():
            if isinstance(values, list) and len(values) > self._seen.get(key, 0):
                self._seen[key] = len(values)
                value = _scalar(values[-1])
                if value is not None and not (isinstance(value, float) and math.isnan(value)):
                    row[key] = value
        if row:
            self._fh.write(json.dumps({"iter": iter, "epoch": epoch, "time": round(time.time(), 3), **row}) + "\n")
            if time.monotonic() - self._flushed >= self._flush_every:
                self.flush()
        return row

    def flush(self) -> None:
        self._fh.flush()
        self._flushed = time.monotonic()

    def close(self) -> None:
        self._fh.close()


class Progress:
    """Where training is: a tqdm bar on the terminal's stderr when it is a TTY, and ``_progress.json`` in the
    package (rewritten at most once a second) for the panel's progress bar and ETA."""

    def __init__(self, stream: TextIO | None, path: Path | None = None, every: float = 1.0):
        self._stream = stream if stream is not None and stream.isatty() else None
        self._path, self._every = path, every
        self._bar = None
        self._state: dict[str, Any] = {}
        self._first = self._written = 0.0
        self._steps = 0  #: steps taken by this attempt, for its rate

    def start_epoch(self, epoch: int, epochs: int | None, total: int | None, iter: int) -> None:
        self._state = {"epoch": epoch, "epochs": epochs, "step": 0, "steps": total, "iter": iter}
        self._first = self._first or time.monotonic()
        self._write(force=True)
        if self._stream is None:
            return
        from tqdm import tqdm

        label = f"epoch {epoch + 1}" + (f"/{epochs}" if epochs else "")
        self._bar = tqdm(total=total, desc=label, file=self._stream, leave=False, dynamic_ncols=True)

    def step(self, metrics: dict[str, Any]) -> None:
        self._steps += 1
        self._state["step"] += 1
        self._state["iter"] += 1
        self._write()
        if self._bar is not None:
            if metrics:
                self._bar.set_postfix({k: f"{v:.4g}" for k, v in metrics.items()}, refresh=False)
            self._bar.update()

    def _write(self, force: bool = False) -> None:
        now = time.monotonic()
        if self._path is None or (not force and now - self._written < self._every):
            return
        self._written = now
        elapsed = now - self._first
        rate = self._steps / elapsed if self._steps and elapsed > 0 else None
        try:  # not durable: it is rewritten a second later, and a lost one costs nothing
            atomic_write_json(self._path, {**self._state, "steps_per_second": rate, "time": time.time()},
                              durable=False)
        except OSError:
            pass

    def close(self) -> None:
        self._write(force=True)
        if self._bar is not None:
            self._bar.close()
            self._bar = None


def _summary(run: Run, seconds: float) -> str:
    latest = {}
    for key, values in run.log.items():
        if isinstance(values, list) and values:
            v = _scalar(values[-1])
            if v is not None:
                latest[key] = v
    parts = [f"epoch {run.epoch}", f"iter {run.iter}"] + [f"{k} {v:.4g}" for k, v in latest.items()]
    return "[dlnest] " + " | ".join(parts) + f" | {seconds:.1f}s"


def _agreed(run: Run, value: Any) -> Any:
    """Rank 0's decision, for every rank: the life cycle's predicates may see per-rank logs, and ranks that
    disagree on stopping or saving would deadlock in the next collective."""
    if run.world_size == 1:
        return value
    import torch.distributed as dist

    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def train_loop(run: Run, metrics: MetricsWriter | None, progress: Progress) -> None:
    """Train until ``LifeCycle.need_continue`` says stop, saving checkpoints as the life cycle asks.

    Under DDP only rank 0 writes (metrics, checkpoints); every rank runs the hooks."""
    lc, model, args, code = run.life_cycle, run.model, run.args, run.code_dir
    hook = lambda name, *a: call_user(code, f"{type(lc).__name__}.{name}", getattr(lc, name), *a)  # noqa: E731
    user = lambda name, *a: call_user(code, f"{type(model).__name__}.{name}", getattr(model, name), *a)  # noqa: E731
    epochs = args.get("epochs") if isinstance(args.get("epochs"), int) else None
    sampler = getattr(run.train_loader, "sampler", None)
    hook("before_all")
    while _agreed(run, hook("need_continue", run.epoch, run.log, args)):
        started = time.monotonic()
        hook("before_epoch", run.epoch)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(run.epoch)
        model.train()
        try:
            total = len(run.train_loader)
        except TypeError:
            total = None
        progress.start_epoch(run.epoch, epochs, total, run.iter)
        for batch in run.train_loader:
            hook("before_step", run.iter, run.epoch)
            user("run_one_step", to_device(batch, run.device), run.log, run.iter, run.epoch)
            hook("after_step", run.iter, run.epoch)
            if hook("need_visualize", run.epoch, run.iter, run.log, args):
                user("visualize", run.log, run.iter, run.epoch)
            run.iter += 1
            progress.step(metrics.update(run.log, run.iter, run.epoch) if metrics else {})
        progress.close()
        run.epoch += 1
        hook("after_epoch", run.epoch)
        if _agreed(run, hook("need_validation", run.epoch, run.log, args)):
            hook("before_validation")
            model.eval()
            user("validate", run.val_loader, run.log)
            model.train()
            hook("after_validation")
            if metrics:
                metrics.update(run.log, run.iter, run.epoch)
        if metrics:
            metrics.flush()
        if _agreed(run, hook("need_save", run.epoch, run.log, args)):
            hook("before_save")
            hold = _agreed(run, bool(hook("hold_checkpoint", run.epoch, run.log, args)))
            state = run.state()  # a collective under DDP: every rank takes part
            if run.rank == 0:
                run.checkpoints.save_in_background(state, run.epoch, run.iter, hold=hold)
            hook("after_save")
        print(_summary(run, time.monotonic() - started), flush=True)
    run.checkpoints.wait()
    hook("after_all")


_stop_requested = threading.Event()


def stop_on_sigterm() -> None:
    """Make SIGTERM (a del, or Slurm's stop) end this process's training as cancelled, never as failed.

    The same SIGTERM also ends the data-loader workers, and torch's SIGCHLD handler then raises "DataLoader
    worker ... killed by signal" wherever the interrupted loop happens to be (a ``finally`` that waits for a
    checkpoint, say). So the handler stands torch's down and remembers the stop: whatever ends the loop after
    it counts as the cancellation it is."""

    def stop(*_: object) -> None:
        _stop_requested.set()
        signal.signal(signal.SIGCHLD, signal.SIG_DFL)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def train(package: SavePackage, device: torch.device, *, resume: bool = False, ckpt: int | None = None,
          command: list[str] | None = None, progress_stream: TextIO | None = None, rank: int = 0,
          world_size: int = 1) -> Run:
    """Run (or, with ``resume``, continue) the package's training in this process, recording the attempt.

    A continued run restores every RNG stream at the checkpoint's epoch boundary before building any data
    iterator, so it ends bit-identical to an uninterrupted run on the same hardware. Under DDP this is one
    rank (the process group already initialised); rank 0 alone writes the record, metrics and checkpoints."""
    lead = rank == 0
    record = package.record()
    attempts = list(record.get("attempts", []))
    for earlier in attempts:  # an attempt that never recorded its end was killed
        if "ended" not in earlier:
            earlier["status"] = "interrupted"
    attempt = {"n": len(attempts) + 1, "started": now_iso(), "command": command or sys.argv,
               "device": str(device), "world_size": world_size, "resumed_from": None}
    attempts.append(attempt)
    if lead:
        package.update_record(status="running", started=record.get("started") or attempt["started"],
                              attempts=attempts, devices=[str(device)], world_size=world_size)

    def finish(status: str, error: str | None = None) -> None:
        if not lead:
            return
        attempt.update(ended=now_iso(), status=status, error=error)
        extra = {}
        if device.type == "cuda":  # the scheduler learns this config's memory need from it
            extra["peak_gpu_mb"] = torch.cuda.max_memory_reserved(device) // 2**20
        package.update_record(status=status, ended=attempt["ended"], attempts=attempts, error=error, **extra)

    try:
        cfg = package.config()
        resuming = resume and bool(Checkpoints(package.checkpoints_dir, cfg.checkpoint_args).entries())
        if isinstance(cfg.args.get("seed"), int) and not resuming:
            # + rank: ranks draw different dropout masks (DDP copies rank 0's initial weights to all anyway);
            # a continue with nothing saved yet replays the fresh start
            seed_everything(cfg.args["seed"] + rank)
        run = Run.build(package, device, rank=rank, world_size=world_size)
        if lead:
            run.checkpoints.clean_partial()
            if resume and ckpt is not None:
                run.checkpoints.rewind(ckpt, attempt["n"])
        if resuming:
            run.restore(ckpt)
            attempt["resumed_from"] = run.epoch
            print(f"[dlnest] continuing from the checkpoint of epoch {run.epoch} (iter {run.iter})", flush=True)
        elif resume:
            print("[dlnest] no checkpoint yet: starting from the beginning", flush=True)
        metrics = MetricsWriter(package.metrics_path, run.log) if lead else None
        if metrics and resume:
            metrics.truncate_after(run.iter)
        try:
            progress = Progress(progress_stream, package.progress_path) if lead else Progress(None)
            train_loop(run, metrics, progress)
        finally:
            if metrics:
                metrics.close()
            run.checkpoints.wait(raise_errors=False)  # an in-flight save still lands if the loop failed
    except (KeyboardInterrupt, Exception) as exc:
        if isinstance(exc, KeyboardInterrupt) or _stop_requested.is_set():
            finish("cancelled", "interrupted")
        else:
            finish("failed", str(exc) if isinstance(exc, DLNestError) else f"{type(exc).__name__}: {exc}")
        raise
    finish("done")
    return run
