"""Analyzer sessions: round-trip latency of an empty ``%%dlnest_exp`` cell and throughput of streamed output.

Goals (from the issue): an empty cell's round trip <= 20 ms (median); streamed output >= 50,000 lines/s
"without freezing the kernel".

Set-up: a temporary DLNEST_HOME and IPYTHONDIR (the user's ledger and history are untouched); the MNIST
example trained for one epoch on the CPU; a real IPython shell in this process loads the extension (this
"notebook kernel" runs the dispatcher) and starts a session with ``%dlnest_analyze -r PKG --cpu``. The first
``%%dlnest_exp`` waits for the session to load its package (reported, not part of any goal).

Latency: N_CELLS empty cells, each timed with perf_counter around ``ip.run_cell_magic('dlnest_exp', '', 'pass')``
(argument parsing, ledger look-ups, execute request, iopub messages until "idle"). Side by side, interleaved
with it (order swapped every round), the same ``pass`` through a bare ``jupyter_client.BlockingKernelClient``
on the same session's connection file (``execute_interactive``: the floor set by ZMQ + ipykernel). Before each
timed call both clients' iopub queues are drained, so neither pays for the other's broadcast messages. The
ledger look-ups a cell does before sending (``sessions.resolve`` + ``sessions.client``) are also timed alone.

Throughput: a cell printing N_LINES lines (``for i in range(N): print(i)``) runs in the session; the output is
received by ``sessions.execute(..., out=StringIO)`` (what ``%%dlnest_exp`` runs) in a background thread, and
lines/s = N_LINES / wall time of the whole request. All lines must arrive, in order. The session's own time to
print the lines (its producer loop, timed inside the session) and the same cell through the bare client are
shown as context. "Without freezing the kernel" is measured two ways while the stream is received:
  - main-thread stall: this process's main thread (the notebook kernel's, which must stay able to run its
    event loop) sleeps 10 ms in a loop; the worst overshoot of those wake-ups is the longest it was held off
    (the GIL taken by the receiving thread: deserialising messages, writing text);
  - message gaps: ipykernel batches a session's stream output (one message per 0.2 s flush interval), so the
    largest gap between consecutive stream messages and the largest message (lines) say how bursty and how
    big a single update a notebook front end would have to render at once.
Wall-clock numbers on a noisy 2-core machine: read them as orders of magnitude.
"""
from __future__ import annotations

import io
import os
import queue
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

N_CELLS, N_LINES, STREAM_ROUNDS = 200, 200_000, 2
LATENCY_GOAL_S, LINES_GOAL = 0.020, 50_000
STREAM_CELL = f"""import sys as _sys, time as _time
_t0 = _time.perf_counter()
for i in range({N_LINES}):
    print(i)
_n = _sys.stderr.write(f"producer_s {{_time.perf_counter() - _t0}}\\n")
"""


def _median(xs):
    return statistics.median(xs) if xs else float("nan")


def _p90(xs):
    return sorted(xs)[min(len(xs) - 1, int(0.9 * len(xs)))] if xs else float("nan")


def _drain(kc) -> None:
    while True:
        try:
            kc.get_iopub_msg(timeout=0)
        except queue.Empty:
            return


class _Recorder(io.StringIO):
    """An ``out`` that notes when each chunk (one stream message) arrives and how many lines it held."""

    def __init__(self):
        super().__init__()
        self.chunks: list[tuple[float, int]] = []

    def write(self, text: str) -> int:
        self.chunks.append((time.perf_counter(), text.count("\n")))
        return super().write(text)


def _stream_dlnest(sessions, session_id: str) -> dict:
    """Receive the stream in a thread while the main thread measures how long its 10 ms sleeps overshoot."""
    out, err, stalls, box = _Recorder(), io.StringIO(), [], {}

    def receive():
        box["reply"] = sessions.execute(session_id, STREAM_CELL, rich=False, out=out, err=err)

    t0 = time.perf_counter()
    th = threading.Thread(target=receive, daemon=True)
    th.start()
    while th.is_alive():
        t = time.perf_counter()
        time.sleep(0.010)
        stalls.append(time.perf_counter() - t - 0.010)
    wall = time.perf_counter() - t0
    th.join()
    lines = out.getvalue().splitlines()
    assert box["reply"]["status"] == "ok", err.getvalue()
    assert lines == [str(i) for i in range(N_LINES)], f"{len(lines)} lines, not all {N_LINES} in order"
    times = [t0] + [t for t, _ in out.chunks]
    producer = float(err.getvalue().split("producer_s ")[1].split()[0])
    return {"wall": wall, "producer": producer, "messages": len(out.chunks),
            "max_lines": max(n for _, n in out.chunks), "max_gap": max(b - a for a, b in zip(times, times[1:])),
            "max_stall": max(stalls), "p99_stall": sorted(stalls)[int(0.99 * (len(stalls) - 1))]}


def _stream_bare(kc) -> tuple[float, float]:
    """The same cell through the bare client: (wall time, the session's print loop)."""
    got = {"stdout": [], "stderr": []}

    def hook(msg):
        if msg["msg_type"] == "stream":
            got[msg["content"]["name"]].append(msg["content"]["text"])

    t0 = time.perf_counter()
    reply = kc.execute_interactive(STREAM_CELL, timeout=120, output_hook=hook)
    wall = time.perf_counter() - t0
    assert reply["content"]["status"] == "ok" and "".join(got["stdout"]).count("\n") == N_LINES
    return wall, float("".join(got["stderr"]).split("producer_s ")[1].split()[0])


def main() -> None:
    with tempfile.TemporaryDirectory(prefix="dlnest_bench_analyzer_") as tmp:
        os.environ["DLNEST_HOME"] = str(Path(tmp) / "home")
        os.environ["IPYTHONDIR"] = str(Path(tmp) / "ipython")
        from IPython.core.interactiveshell import InteractiveShell
        from jupyter_client import BlockingKernelClient
        from traitlets.config import Config

        from dlnest_jupyter import api, sessions
        from dlnest_jupyter.scaffold import new_project

        project = new_project(Path(tmp) / "mnist", mnist=True)
        t = time.perf_counter()
        subprocess.run([sys.executable, "-m", "dlnest_jupyter", "run", "-c", str(project / "root_config.json"),
                        "--cpu", "--set", "epochs=1"], check=True, capture_output=True, timeout=180)
        (pkg,) = [p for p in (project / "Saves").iterdir() if p.is_dir() and not p.name.startswith(".")]
        print(f"trained a 1-epoch package on the CPU in {time.perf_counter() - t:.1f} s")

        cfg = Config()
        cfg.HistoryManager.enabled = False
        ip = InteractiveShell.instance(config=cfg)
        ip.run_line_magic("load_ext", "dlnest_jupyter")
        task, bare = None, None
        try:
            t = time.perf_counter()
            task = ip.run_line_magic("dlnest_analyze", f"-r {shlex.quote(str(pkg))} --cpu")
            ip.run_cell_magic("dlnest_exp", "", "pass")  # waits for the session's kernel
            print(f"session {task.id} answered its first cell {time.perf_counter() - t:.1f} s after %dlnest_analyze")
            kc = sessions.client(task.id)
            bare = BlockingKernelClient(connection_file=task.row["endpoint"])
            bare.load_connection_file()
            bare.start_channels()
            bare.wait_for_ready(timeout=30)

            # -- latency ----------------------------------------------------------------------------------
            dl, base, lookups = [], [], []
            for i in range(N_CELLS):
                for which in ((0, 1) if i % 2 == 0 else (1, 0)):
                    _drain(kc)
                    _drain(bare)
                    t = time.perf_counter()
                    if which == 0:
                        ip.run_cell_magic("dlnest_exp", "", "pass")
                        dl.append(time.perf_counter() - t)
                    else:
                        bare.execute_interactive("pass", timeout=30, output_hook=lambda m: None)
                        base.append(time.perf_counter() - t)
            for _ in range(N_CELLS):
                t = time.perf_counter()
                sessions.client(sessions.resolve(None))
                lookups.append(time.perf_counter() - t)

            # -- throughput -------------------------------------------------------------------------------
            runs, bare_runs = [], []
            for _ in range(STREAM_ROUNDS):
                _drain(kc)
                _drain(bare)
                runs.append(_stream_dlnest(sessions, task.id))
                _drain(kc)
                _drain(bare)
                bare_runs.append(_stream_bare(bare))
            best = min(runs, key=lambda r: r["wall"])
        finally:
            if bare is not None:
                bare.stop_channels()
            if task is not None:
                api.cancel(task.id)
                print(f"session {task.id}: {api.task(task.id).status}")
            for c in sessions._clients.values():
                c.stop_channels()
            ip.run_line_magic("unload_ext", "dlnest_jupyter")

    ms = lambda s: f"{s * 1e3:8.2f} ms"  # noqa: E731
    print(f"\nlatency of an empty cell, {N_CELLS} each, interleaved     median       p90")
    print(f"  %%dlnest_exp pass                              {ms(_median(dl))}  {ms(_p90(dl))}")
    print(f"  bare BlockingKernelClient.execute_interactive   {ms(_median(base))}  {ms(_p90(base))}")
    print(f"  ledger look-ups alone (resolve + client)       {ms(_median(lookups))}  {ms(_p90(lookups))}")
    print(f"  dlnest / bare (medians)                        {_median(dl) / _median(base):8.2f} x")

    rate = N_LINES / best["wall"]
    print(f"\nstreamed output, {N_LINES:,} lines, best of {STREAM_ROUNDS} (all arrived, in order)")
    for r in runs:
        print(f"  sessions.execute: {r['wall']:6.2f} s = {N_LINES / r['wall']:9,.0f} lines/s   "
              f"(session's print loop {r['producer']:.2f} s = {N_LINES / r['producer']:9,.0f} lines/s)")
    for wall, producer in bare_runs:
        print(f"  bare client     : {wall:6.2f} s = {N_LINES / wall:9,.0f} lines/s   "
              f"(session's print loop {producer:.2f} s = {N_LINES / producer:9,.0f} lines/s)")
    print(f"  stream messages {best['messages']}, largest {best['max_lines']:,} lines, "
          f"largest gap between messages {best['max_gap'] * 1e3:.0f} ms")
    print(f"  main-thread stall while receiving (10 ms sleeps' overshoot): max {best['max_stall'] * 1e3:.1f} ms, "
          f"p99 {best['p99_stall'] * 1e3:.1f} ms")

    met = lambda ok: "met" if ok else "NOT met"  # noqa: E731
    print(f"\ngoal: empty cell <= {LATENCY_GOAL_S * 1e3:.0f} ms median: {_median(dl) * 1e3:.2f} ms -> "
          f"{met(_median(dl) <= LATENCY_GOAL_S)}")
    print(f"goal: >= {LINES_GOAL:,} lines/s: {rate:,.0f} lines/s -> {met(rate >= LINES_GOAL)}")


if __name__ == "__main__":
    main()
