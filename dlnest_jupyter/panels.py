"""``%dlnest_panel``: GPUs, tasks, live output and metric plots in one ipywidgets panel.

Standard ipywidgets only (no front-end build), so it renders wherever widgets do: JupyterLab, Notebook 7,
VS Code. One panel per kernel: showing it again shows the same models, so every view stays correct and the
update rate stays bounded.

Threading, because ipykernel 7 routes messages by the parent header in a context variable: widgets are
built and displayed in the cell; afterwards one pump thread alone changes their values, inside a copy of
the displaying cell's context (so its messages carry that cell's parent header), and never calls
``display()``. Front-end events (clicks, selection) only queue work for the pump. Every view is refreshed
at its own bounded rate and sent only when it changed, whatever the tasks print."""
from __future__ import annotations

import contextvars
import html
import io
import queue
import threading
import time
from pathlib import Path
from typing import Any, Callable

import ipywidgets as w

from . import api, devices
from .ledger import ACTIVE
from .listing import _age, gpu_rows, host_line, task_rows
from .tails import MetricsTail, OutputTail, output_file, read_progress

#: seconds between refreshes of each view (the pump wakes at the shortest)
RATES = {"output": 0.5, "tasks": 1.0, "gpus": 2.0, "plot": 5.0}
PLOT_SHARE = 0.05  #: a plot that takes long to draw is redrawn less often: at most this share of a core
ROWS = 50  #: tasks listed at most
TAIL_LINES = 25
PLOT_POINTS = 1000  #: a series is thinned to this many points before plotting
PLOT_SERIES = 4

_panel: "Panel | None" = None

_STYLE = """<style>
.dlnest-panel table {border-collapse: collapse; font-size: 12px; width: 100%}
.dlnest-panel th, .dlnest-panel td {padding: 2px 6px; text-align: left; white-space: nowrap}
.dlnest-panel tr.dlnest-selected {background: rgba(66, 133, 244, .15)}
.dlnest-panel pre {font-size: 11px; margin: 0; white-space: pre-wrap}
.dlnest-bar {display: flex; width: 160px; height: 10px; background: #ddd}
.dlnest-bar span {display: block; height: 100%}
.dlnest-error {color: #c00}
</style>"""


def _esc(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _bar(parts: list[tuple[float, str, str]], label: str) -> str:
    """A horizontal bar of (fraction, colour, name) segments."""
    spans = "".join(f'<span class="dlnest-bar-{n}" style="width:{100 * max(0.0, min(f, 1.0)):.1f}%;background:{c}">'
                    "</span>" for f, c, n in parts)
    return f'<div class="dlnest-bar" title="{_esc(label)}">{spans}</div>'


def _number(v: float) -> str:
    return f"{v:.4g}"


def gpus_html(gpus: list[dict[str, Any]], host: dict[str, Any]) -> str:
    rows = []
    for g in gpus:
        t = g["total_mb"] or 1
        label = f"used {g['used_mb']} / reserved {g['reserved_mb']} / free {g['free_mb']} of {g['total_mb']} MiB"
        bar = _bar([(g["used_mb"] / t, "#e8710a", "used"), (g["reserved_mb"] / t, "#f9ab00", "reserved")], label)
        name = _esc(g["name"]) + (' <i class="dlnest-simulated">(simulated)</i>' if g["simulated"] else "")
        util = "-" if g["utilization"] is None else f"{g['utilization']}%"
        rows.append(f'<tr class="dlnest-gpu" data-uuid="{_esc(g["uuid"])}"><td>{g["index"]}</td><td>{name}</td>'
                    f"<td>{bar}</td><td>{_esc(label)}</td><td>{util}</td>"
                    f"<td>{_esc(', '.join(g['tasks']) or '-')}</td></tr>")
    if not gpus:
        rows.append(f'<tr><td colspan="6">{_esc(devices.no_gpu_message())}</td></tr>')
    ram = host["ram_used_mb"] / (host["ram_total_mb"] or 1)
    rows.append(f'<tr class="dlnest-host"><td>CPU</td><td>{host["cpus"]} cores</td>'
                f'<td>{_bar([(host["cpu_percent"] / 100, "#1a73e8", "cpu")], "CPU busy")}'
                f'{_bar([(ram, "#188038", "ram")], "RAM used")}</td><td colspan="3">{_esc(host_line(host))}</td></tr>')
    return (f"{_STYLE}<b>GPUs</b><table><tr><th>#</th><th>device</th><th>memory</th><th></th><th>util</th>"
            f"<th>tasks</th></tr>{''.join(rows)}</table>")


def tasks_html(rows: list[dict[str, Any]], selected: str | None, more: int) -> str:
    body = []
    for t in rows:
        p, latest = t.get("progress"), t.get("latest") or {}
        if p and p.get("fraction") is not None:
            where = f"epoch {p['epoch'] + 1}" + (f"/{p['epochs']}" if p.get("epochs") else "")
            where += f", step {p['step']}" + (f"/{p['steps']}" if p.get("steps") else "")
            eta = f", ETA {_age(p['eta'])}" if p.get("eta") is not None and t["status"] in ACTIVE else ""
            progress = (f'<progress class="dlnest-progress" max="1" value="{p["fraction"]:.4f}"></progress> '
                        f"{_esc(where + eta)}")
        else:
            progress = "-"
        metrics = ", ".join(f"{_esc(k)} {_number(v)}" for k, v in list(latest.items())[:4]) or "-"
        cls = "dlnest-task dlnest-selected" if t["id"] == selected else "dlnest-task"
        body.append(f'<tr class="{cls}" data-task="{_esc(t["id"])}" data-status="{_esc(t["status"])}">'
                    f"<td>{_esc(t['id'])}</td><td>{_esc(t['status'])}</td><td>{_esc(t['where'])}</td>"
                    f"<td>{progress}</td><td>{_age(t['elapsed'])}</td><td>{metrics}</td>"
                    f"<td>{_esc(t['note'])}</td></tr>")
    if not rows:
        body.append('<tr><td colspan="7">no tasks</td></tr>')
    if more:
        body.append(f'<tr><td colspan="7">… {more} more (%dlnest_tasks lists all)</td></tr>')
    return ("<b>Tasks</b><table><tr><th>id</th><th>status</th><th>device</th><th>progress</th><th>elapsed</th>"
            f"<th>latest metrics</th><th>note</th></tr>{''.join(body)}</table>")


def output_html(title: str, text: str) -> str:
    # the whole bounded tail, unclipped: its newest line is always in view
    return f"<b>{_esc(title)}</b><pre>{_esc(text) or '(no output yet)'}</pre>"


def plot_svg(series: dict[str, tuple[list[int], list[float]]], title: str) -> str:
    """Small multiples (one axes a series, x = iteration) as inline SVG; each line's group has the id
    ``dlnest-series-NAME``."""
    from matplotlib.figure import Figure

    names = list(series)[:PLOT_SERIES]
    if not names:
        return f"<b>Metrics</b><div>{_esc(title)}: no metrics yet</div>"
    fig = Figure(figsize=(3.0 * len(names), 2.2))
    for i, name in enumerate(names):
        xs, ys = series[name]
        step = max(1, len(xs) // PLOT_POINTS)
        ax = fig.add_subplot(1, len(names), i + 1)
        (line,) = ax.plot(xs[::step] + xs[-1:] * (step > 1), ys[::step] + ys[-1:] * (step > 1),
                          marker="." if len(xs) < 30 else None, linewidth=1.2)
        line.set_gid(f"dlnest-series-{name}")
        ax.set_title(name, fontsize=9)
        ax.tick_params(labelsize=7)
        ax.set_xlabel("iter", fontsize=7)
    width = 3.0 * len(names)
    fig.subplots_adjust(left=0.5 / width, right=1 - 0.15 / width, bottom=0.2, top=0.86, wspace=0.45)
    buf = io.StringIO()
    import matplotlib

    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "dlnest"}):
        fig.savefig(buf, format="svg")
    svg = buf.getvalue()
    return f"<b>Metrics: {_esc(title)}</b><div>{svg[svg.index('<svg'):]}</div>"


class Panel(w.VBox):
    """The widgets and their pump, which starts when the panel is first shown and stops when it is closed."""

    def __init__(self) -> None:
        self.filter = w.ToggleButtons(options=[("active", "active"), ("all", "all")], value="all",
                                      style={"button_width": "60px"})
        self.select = w.Dropdown(options=[], description="task", layout=w.Layout(width="360px"))
        self.actions = {name: w.Button(description=name, tooltip=tip, layout=w.Layout(width="90px"))
                        for name, tip in [("stop", "stop the selected task"),
                                          ("continue", "queue a continue of the selected task's package"),
                                          ("watch", "follow the selected task's output below"),
                                          ("analyze", "start an analyzer session on the selected package")]}
        self.close_button = w.Button(description="close", tooltip="close the panel and stop its refresher",
                                     layout=w.Layout(width="70px"))
        self.gpus, self.tasks, self.output, self.session_output, self.plot, self.status = (w.HTML() for _ in range(6))
        for name, button in self.actions.items():
            button.add_class(f"dlnest-action-{name}")
            button.on_click(lambda _b, name=name: self._queue.put(("action", name)))
        self.close_button.on_click(lambda _b: self.close())
        self.select.observe(self._on_select, "value")
        self.filter.observe(lambda change: self._queue.put(("filter", change["new"])), "value")
        bar = w.HBox([self.filter, self.select, *self.actions.values(), self.close_button])
        super().__init__([self.gpus, bar, self.tasks, w.HBox([self.output, self.session_output]), self.plot,
                          self.status])
        self.add_class("dlnest-panel")
        self.gpus.add_class("dlnest-panel-gpus")
        self.tasks.add_class("dlnest-panel-tasks")
        self.close_button.add_class("dlnest-panel-close")
        self.output.add_class("dlnest-output")
        self.session_output.add_class("dlnest-session-output")
        self.plot.add_class("dlnest-plot")
        self.status.add_class("dlnest-status")

        self._queue: queue.SimpleQueue[tuple[str, Any]] = queue.SimpleQueue()
        self._stop = threading.Event()
        self._context: contextvars.Context | None = None
        self._thread: threading.Thread | None = None
        # pump state
        self._filter, self._selected, self._pinned = "all", None, None  # output: the pinned or selected task
        self._quiet = False  #: the pump is changing the selection itself: not a user's choice
        self._due = dict.fromkeys(RATES, 0.0)
        self._metrics: dict[str, MetricsTail] = {}
        self._settled: set[str] = set()
        self._tails: dict[tuple[str, str], OutputTail] = {}
        self._plotted: tuple[str | None, int] = (None, -1)
        self._options: list[tuple[str, str]] = []
        self._message = ""  #: what the last action did
        self._problems: dict[str, str] = {}  #: view -> its refresh error, until it refreshes again
        self.errors = 0  #: refreshes that failed (the tests read it)

    # -- the cell's side ------------------------------------------------------------------------------------
    def _repr_mimebundle_(self, **kwargs: Any) -> Any:
        """Shown in a cell (again): that cell's context becomes the pump's, and the pump starts."""
        self._context = contextvars.copy_context()
        if self._thread is None:
            self._thread = threading.Thread(target=self._pump, name="dlnest-panel", daemon=True)
            self._thread.start()
        self._queue.put(("refresh", None))
        return super()._repr_mimebundle_(**kwargs)

    def __repr__(self) -> str:  # the text/plain a front end without widgets (or a terminal) shows
        return "<dlnest panel: GPUs, tasks, output and metrics; shown live by a notebook front end>"

    def _on_select(self, change: dict[str, Any]) -> None:
        if not self._quiet:
            self._queue.put(("select", change["new"]))

    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and self.comm is not None

    def close(self) -> None:
        """Stop the refresher, then close every widget of the panel."""
        global _panel
        self._stop.set()
        self._queue.put(("stop", None))
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(10)
        for child in [self.filter, self.select, *self.actions.values(), self.close_button, self.gpus, self.tasks,
                      self.output, self.session_output, self.plot, self.status, *self.children]:
            child.close()
        super().close()
        if _panel is self:
            _panel = None

    # -- the pump -------------------------------------------------------------------------------------------
    def _pump(self) -> None:
        period = min(RATES.values())
        event: tuple[str, Any] | None = None
        while not self._stop.is_set():
            started = time.monotonic()
            try:
                self._context.run(self._tick, event)
            except Exception as exc:  # not a view's refresh: the panel itself; still shown, still going
                self._failed("panel", exc)
            try:  # wait for the next due view, or for work from the front end
                event = self._queue.get(timeout=max(0.0, period - (time.monotonic() - started)))
            except queue.Empty:
                event = None

    def _set(self, widget: w.Widget, value: Any, name: str = "value") -> None:
        if getattr(widget, name) != value:
            setattr(widget, name, value)

    def _failed(self, view: str, exc: Exception) -> None:
        self.errors += 1
        self._problems[view] = f"refresh error ({view}): {type(exc).__name__}: {exc}"
        try:
            self._context.run(self._show_status)
        except Exception:
            pass

    def _show_status(self) -> None:
        """The last action's message, then each view's error until that view refreshes again."""
        lines = [self._message] + [f'<span class="dlnest-error">{_esc(p)}</span>' for p in self._problems.values()]
        self._set(self.status, "<br>".join(filter(None, lines)))

    def _tick(self, event: tuple[str, Any] | None) -> None:
        now = time.monotonic()
        refresh = False
        while event is not None or not self._queue.empty():
            kind, arg = event or self._queue.get_nowait()
            event = None
            if kind == "stop":
                return
            if kind == "select" and arg != self._selected:
                self._selected, refresh = arg, True
            elif kind == "filter":
                self._filter, refresh = arg, True
            elif kind == "refresh":
                refresh = True
            elif kind == "action":
                self._start_action(arg)
            elif kind == "done":  # an action's result: a message, and maybe a task to select
                self._message, new_task = arg
                if new_task:
                    self._selected = new_task
                refresh = True
        if refresh:
            self._due = dict.fromkeys(RATES, 0.0)
        for view, refresh_view in [("tasks", self._refresh_tasks), ("gpus", self._refresh_gpus),
                                   ("output", self._refresh_output), ("plot", self._refresh_plot)]:
            if now >= self._due[view]:
                self._due[view] = now + RATES[view]
                try:
                    refresh_view()
                    self._problems.pop(view, None)
                except Exception as exc:  # shown on the status line; the other views and the pump go on
                    self._failed(view, exc)
        self._show_status()

    def _refresh_gpus(self) -> None:
        self._set(self.gpus, gpus_html(gpu_rows(), devices.host()))

    def _refresh_tasks(self) -> None:
        rows = task_rows(self._filter == "active")
        shown, more = rows[:ROWS], max(0, len(rows) - ROWS)
        newest: dict[str, str] = {}  # package -> its newest training task: the one its files describe now
        for t in shown:
            if t["kind"] != "analyze" and t["package"] in newest:
                t["note"] = "; ".join(filter(None, [t["note"], f"continued by {newest[t['package']]}"]))
            elif t["kind"] != "analyze" and t["package"]:
                newest[t["package"]] = t["id"]
                t["progress"] = read_progress(Path(t["package"]))
                settled = t["package"] in self._settled  # ended, and read to its end since
                t["latest"] = self._metrics_of(t["package"], refresh=not settled).latest()
                if t["status"] not in ACTIVE:
                    self._settled.add(t["package"])
                else:
                    self._settled.discard(t["package"])
        options = [(f"{t['id']}  {Path(t['package'] or '-').name}", t["id"]) for t in shown]
        ids = [t["id"] for t in shown]
        if self._selected not in ids:  # nothing chosen yet, or filtered out: the newest task
            self._selected = ids[0] if ids else None
        if options != self._options or self.select.value != self._selected:
            self._options, self._quiet = options, True
            try:
                with self.select.hold_sync():
                    self.select.options = options
                    self.select.value = self._selected
            finally:
                self._quiet = False
        self._set(self.tasks, tasks_html(shown, self._selected, more))

    def _metrics_of(self, package: str, refresh: bool = True) -> MetricsTail:
        tail = self._metrics.get(package)
        if tail is None:
            tail = self._metrics[package] = MetricsTail(Path(package) / "metrics.jsonl")
        if refresh:
            tail.update()
        return tail

    def _tail_of(self, task_id: str | None) -> str:
        if task_id is None:
            return ""
        row = api.ledger().get(task_id)
        if row is None or not row["package"]:
            return ""
        key = (task_id, row["package"])
        tail = self._tails.get(key)
        if tail is None:
            tail = self._tails[key] = OutputTail(output_file(Path(row["package"]), task_id), TAIL_LINES)
        tail.update()
        return f"[{task_id} {row['status']}]\n{tail.text()}"

    def _refresh_output(self) -> None:
        from . import sessions

        shown = self._pinned or self._selected
        title = f"Output: {shown or '-'}" + (" (pinned: watch again to follow the selection)" if self._pinned else "")
        self._set(self.output, output_html(title, self._tail_of(shown)))
        session = sessions.current
        self._set(self.session_output, output_html(f"Analyzer session: {session or '-'}", self._tail_of(session)))

    def _refresh_plot(self) -> None:
        row = api.ledger().get(self._selected) if self._selected else None
        if row is None or row["kind"] == "analyze" or not row["package"]:
            key = (self._selected, 0)
            if key != self._plotted:
                self._plotted = key
                self._set(self.plot, "<b>Metrics</b><div>select a training task</div>")
            return
        tail = self._metrics_of(row["package"])
        key = (self._selected, tail.offset)
        if key != self._plotted:  # re-render only when the series grew
            self._plotted = key
            started = time.monotonic()
            self._set(self.plot, plot_svg(tail.series, self._selected))
            spent = time.monotonic() - started
            self._due["plot"] = max(self._due["plot"], started + spent / PLOT_SHARE)

    def _start_action(self, name: str) -> None:
        """Run a button's action off the pump (a stop may wait for a process tree); its result comes back
        through the queue."""
        task_id = self._selected
        if task_id is None:
            self._message = "select a task first"
            return
        if name == "watch":  # pin the output pane to this task, or unpin it
            self._pinned = None if self._pinned == task_id else task_id
            self._message = f"output follows {self._pinned or 'the selected task'}"
            self._due["output"] = 0.0
            return
        self._message = f"{name} {task_id}…"
        threading.Thread(target=self._action, args=(name, task_id), name=f"dlnest-panel-{name}", daemon=True).start()

    def _action(self, name: str, task_id: str) -> None:
        from .errors import DLNestError

        try:
            result, new = _ACTIONS[name](task_id)
            self._queue.put(("done", (_esc(result), new)))
        except DLNestError as exc:
            self._queue.put(("done", (f'<span class="dlnest-error">dlnest: error: {_esc(exc)}</span>', None)))
        except Exception as exc:
            self._queue.put(("done", (f'<span class="dlnest-error">{name} failed: {_esc(type(exc).__name__)}: '
                                      f"{_esc(exc)}</span>", None)))


def _stop(task_id: str) -> tuple[str, str | None]:
    return f"{task_id}: {api.cancel(task_id).status}", None


def _continue(task_id: str) -> tuple[str, str | None]:
    row = api.ledger().get(task_id)
    req = row["request"]
    task = api.continue_(row["package"], cpu=req.get("cpu", False), memory_mb=req.get("memory_mb"),
                         ddp=req.get("ddp", False), gpus=req.get("gpus"),
                         procs=req.get("procs") if req.get("ddp") else None, executor=req.get("executor"),
                         command=["panel: continue", task_id])
    return f"{task.id}: continue of {task_id} queued", task.id


def _analyze(task_id: str) -> tuple[str, str | None]:
    from . import sessions

    row = api.ledger().get(task_id)
    task = sessions.start(row["package"], cpu=row["request"].get("cpu", False), command=["panel: analyze", task_id])
    return f"{task.id}: analyzer session on {Path(row['package']).name} (now the current session)", None


_ACTIONS: dict[str, Callable[[str], tuple[str, str | None]]] = {
    "stop": _stop, "continue": _continue, "analyze": _analyze}


def panel() -> Panel:
    """This kernel's panel (the same one each time, until it is closed): display it, or end a cell with it."""
    global _panel
    if _panel is None or _panel.comm is None:
        _panel = Panel()
    return _panel
