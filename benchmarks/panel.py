"""The panel's cost to the kernel: CPU used by its refresher, latency of a trivial cell, messages sent.

Goals (from the issue): refresher CPU <= 10% of one core with 4 tasks printing as fast as they can, <= 1%
idle; a trivial cell's round trip <= 50 ms median under that load; <= 10 messages a second to the front end.

Set-up: a temporary DLNEST_HOME; a real IPython kernel (jupyter_client, as a notebook front end talks to it)
with the extension loaded; four simulated 16 GiB GPUs so four tasks run at once (on the CPU). The tasks are the
MNIST example with a step that prints 2,000 lines of 70 characters, so each prints as fast as it can for
as long as the benchmark lasts.

Measured in windows of WINDOW seconds, interleaved so the machine's noise hits both sides alike: a window
with the panel displayed and a window with it closed (the kernel's dispatcher still runs: that is the
baseline). In each window: the kernel process's CPU time (psutil, user + system) / wall time; the round trip
of ``1`` executed every 0.25 s (execute request to its reply); the widget comm messages the kernel sent per
second. The refresher's CPU is the difference between the two sides' medians. Idle: the same with no task.
"""
from __future__ import annotations

import os
import queue
import statistics
import sys
import tempfile
import time
from pathlib import Path

import psutil
from jupyter_client import KernelManager

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from dlnest_jupyter.scaffold import new_project  # noqa: E402

WINDOW = float(os.environ.get("WINDOW", 15))
ROUNDS = int(os.environ.get("ROUNDS", 2))


class Kernel:
    def __init__(self, env: dict[str, str], cwd: str):
        self.km = KernelManager(kernel_name="python3")
        self.km.start_kernel(env=env, cwd=cwd)
        self.kc = self.km.client()
        self.kc.start_channels()
        self.kc.wait_for_ready(timeout=120)
        self.proc = psutil.Process(self.km.provisioner.process.pid)
        self.comm_msgs = 0

    def run(self, code: str, timeout: float = 120) -> float:
        """Execute and wait for the reply; the round trip in seconds."""
        started = time.perf_counter()
        msg_id = self.kc.execute(code)
        while True:
            reply = self.kc.get_shell_msg(timeout=timeout)
            if reply["parent_header"].get("msg_id") == msg_id:
                assert reply["content"]["status"] == "ok", reply["content"]
                return time.perf_counter() - started

    def drain(self) -> None:
        while True:
            try:
                msg = self.kc.get_iopub_msg(timeout=0)
            except queue.Empty:
                return
            if msg["msg_type"] == "comm_msg":
                self.comm_msgs += 1

    def window(self, seconds: float) -> dict[str, float]:
        self.drain()
        self.comm_msgs = 0
        cpu0, wall0 = sum(self.proc.cpu_times()[:2]), time.monotonic()
        latencies = []
        while time.monotonic() - wall0 < seconds:
            latencies.append(self.run("1"))
            self.drain()
            time.sleep(0.25)
        wall = time.monotonic() - wall0
        self.drain()
        return {"cpu": (sum(self.proc.cpu_times()[:2]) - cpu0) / wall, "latency": statistics.median(latencies),
                "msgs": self.comm_msgs / wall}

    def close(self) -> None:
        self.kc.stop_channels()
        self.km.shutdown_kernel(now=True)


def compare(k: Kernel, label: str) -> None:
    sides: dict[str, list[dict[str, float]]] = {"panel": [], "none": []}
    for r in range(ROUNDS):
        for side in (["panel", "none"] if r % 2 == 0 else ["none", "panel"]):
            k.run("from dlnest_jupyter import panels as _p\n"
                  + ("display(_p.panel())" if side == "panel" else "_p._panel and _p._panel.close()"))
            time.sleep(2)  # the first refresh (and the plot's first draw) is not the steady state
            sides[side].append(k.window(WINDOW))
    med = {s: {m: statistics.median(w[m] for w in ws) for m in ("cpu", "latency", "msgs")} for s, ws in sides.items()}
    p, n = med["panel"], med["none"]
    print(f"\n{label} ({ROUNDS} rounds x {WINDOW:.0f} s a side)")
    print(f"  kernel CPU, % of one core: panel {100 * p['cpu']:.1f}  none {100 * n['cpu']:.1f}"
          f"  -> refresher {100 * (p['cpu'] - n['cpu']):.1f}")
    print(f"  trivial cell round trip, median ms: panel {1000 * p['latency']:.1f}  none {1000 * n['latency']:.1f}"
          f"  (ratio {p['latency'] / n['latency']:.2f})")
    print(f"  widget messages per second: panel {p['msgs']:.1f}  none {n['msgs']:.1f}")


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        env = {**os.environ, "DLNEST_HOME": f"{tmp}/home", "IPYTHONDIR": f"{tmp}/ipython",
               "DLNEST_SIMULATED_GPUS": "16384,16384,16384,16384"}
        project = new_project(f"{tmp}/loud", mnist=True)
        model = project / "Model" / "Model.py"
        model.write_text(model.read_text().replace(
            "        x, y = batch\n", "        x, y = batch\n        print(('x' * 70 + '\\n') * 2000, end='')\n", 1))
        k = Kernel(env, tmp)
        try:
            k.run("%load_ext dlnest_jupyter")
            compare(k, "idle: no task")
            k.run("ts = [get_ipython().run_line_magic('dlnest_run', %r) for _ in range(4)]"
                  % f"-c {project / 'root_config.json'} -m 8000 --set epochs=100000")
            k.run("import time\nwhile sum(t.status == 'running' for t in ts) < 4: time.sleep(0.5)", timeout=300)
            sizes = [sum(p.stat().st_size for p in project.glob("Saves/*/_output.txt"))]
            compare(k, "load: 4 tasks printing flat out")
            sizes.append(sum(p.stat().st_size for p in project.glob("Saves/*/_output.txt")))
            print(f"  (the tasks printed {(sizes[1] - sizes[0]) / 2**20:.0f} MiB meanwhile)")
            k.run("for t in ts: t.cancel()", timeout=300)
        finally:
            k.close()


if __name__ == "__main__":
    main()
