"""Plain-text views of the ledger and the devices (``%dlnest_tasks``, ``%dlnest_gpus`` and the CLI)."""
from __future__ import annotations

import time
from typing import Any

from . import devices
from .ledger import ACTIVE


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m" if seconds >= 3600 else f"{seconds // 60}m{seconds % 60:02d}s"


def _table(header: list[str], rows: list[list[Any]]) -> str:
    cells = [header] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in cells)


def task_rows(active_only: bool = False, limit: int | None = None) -> list[dict[str, Any]]:
    """This user's tasks, newest first, with where they run, how long they ran and a note."""
    from .api import ledger
    from .scheduler import refresh_external

    refresh_external(ledger())  # Slurm tasks: their state as squeue says now, even with no dispatcher running
    now = time.time()
    rows = ledger().tasks(ACTIVE if active_only else None)
    for t in rows[:limit]:
        t["where"] = ",".join(t["placement"] or []) or ("cpu" if t["request"].get("cpu") else "-")
        if t["slurm_job_id"]:
            t["where"] = f"slurm:{t['slurm_job_id']}" + (f"@{t['where']}" if t["where"] != "-" else "")
        t["elapsed"] = ((t["ended"] or now) - t["started"]) if t["started"] else None
        t["note"] = t["error"] if t["status"] in ("failed", "cancelled") and t["error"] else (t["description"] or "")
    return rows[:limit]


def tasks_table(active_only: bool = False) -> str:
    rows = task_rows(active_only)
    if not rows:
        return "no tasks" if not active_only else "no active tasks"
    out = [[t["id"], t["kind"], t["status"], t["where"], _age(t["elapsed"]), t["package"], t["note"]] for t in rows]
    return _table(["ID", "KIND", "STATUS", "DEVICE", "ELAPSED", "PACKAGE", "NOTE"], out)


def gpu_rows() -> list[dict[str, Any]]:
    """Each GPU with the memory tasks reserved on it, what is left free, and the tasks placed on it."""
    from .api import ledger

    reserved: dict[str, int] = {}
    for r in ledger().reservations():
        reserved[r["device"]] = reserved.get(r["device"], 0) + r["memory_mb"]
    holders: dict[str, list[str]] = {}
    for t in ledger().tasks(ACTIVE):
        for uuid in t["placement"] or []:
            holders.setdefault(uuid, []).append(t["id"])
    rows = []
    for g in devices.gpus():
        row = g.as_dict()
        row.update(reserved_mb=reserved.get(g.uuid, 0), tasks=holders.get(g.uuid, []))
        row["free_mb"] = max(0, g.total_mb - g.used_mb - row["reserved_mb"])
        rows.append(row)
    return rows


def host_line(h: dict[str, Any]) -> str:
    return (f"CPU: {h['cpus']} cores, {h['cpu_percent']:.0f}% busy; RAM: {h['ram_used_mb']} / "
            f"{h['ram_total_mb']} MiB")


def gpus_table() -> str:
    gpus = gpu_rows()
    lines = []
    if gpus:
        rows = [[g["index"], g["name"], g["total_mb"], g["used_mb"], g["reserved_mb"], g["free_mb"],
                 "-" if g["utilization"] is None else f"{g['utilization']}%", ",".join(g["tasks"]) or "-"]
                for g in gpus]
        lines.append(_table(["GPU", "NAME", "TOTAL MiB", "USED", "RESERVED", "FREE", "UTIL", "TASKS"], rows))
    else:
        lines.append(devices.no_gpu_message())
    lines.append(host_line(devices.host()))
    return "\n".join(lines)
