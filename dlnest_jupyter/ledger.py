"""The ledger: one SQLite database per user, the single source of truth for tasks and device reservations.

Every kernel, the server extension and the CLI open the same file (WAL, busy timeout, short transactions).
A state change is one transaction; ``transaction()`` takes SQLite's write lock up front (BEGIN IMMEDIATE) so
read-then-write decisions such as placement cannot interleave between processes."""
from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Iterator

from .errors import DLNestError

ACTIVE = ("queued", "starting", "running")
FINAL = ("done", "failed", "cancelled")

#: Each entry migrates the schema from version i to i + 1; append, never edit.
MIGRATIONS = [
    """
    CREATE TABLE tasks (
        seq INTEGER PRIMARY KEY AUTOINCREMENT,
        id TEXT UNIQUE NOT NULL,
        kind TEXT NOT NULL,
        status TEXT NOT NULL,
        priority INTEGER NOT NULL DEFAULT 0,
        project TEXT,
        package TEXT,
        config_hash TEXT,
        request TEXT NOT NULL,
        placement TEXT,
        supervisor_pid INTEGER,
        supervisor_started REAL,
        worker_pid INTEGER,
        worker_started REAL,
        heartbeat REAL,
        exit_code INTEGER,
        error TEXT,
        cancel_requested INTEGER NOT NULL DEFAULT 0,
        description TEXT,
        command TEXT,
        created REAL NOT NULL,
        started REAL,
        ended REAL
    );
    CREATE INDEX tasks_status ON tasks (status, priority, seq);
    CREATE TABLE reservations (
        task_id TEXT NOT NULL REFERENCES tasks (id),
        device TEXT NOT NULL,
        memory_mb INTEGER NOT NULL,
        created REAL NOT NULL,
        PRIMARY KEY (task_id, device)
    );
    CREATE TABLE launches (device TEXT PRIMARY KEY, at REAL NOT NULL);
    CREATE TABLE estimates (config_hash TEXT PRIMARY KEY, peak_mb INTEGER NOT NULL, updated REAL NOT NULL);
    """,
    # 2: analyzer sessions publish the connection file of their kernel
    "ALTER TABLE tasks ADD COLUMN endpoint TEXT",
    # 3: every rank's [pid, create time] (DDP), so del can end them all even without the supervisor
    "ALTER TABLE tasks ADD COLUMN rank_pids TEXT",
    # 4: a task run by Slurm (executor "slurm") is known there by this job id (squeue, scancel)
    "ALTER TABLE tasks ADD COLUMN slurm_job_id TEXT",
]
JSON_COLUMNS = ("request", "placement", "command", "rank_pids")


def dlnest_home() -> Path:
    """``$DLNEST_HOME`` or ``~/.dlnest``, created private to the user (0700)."""
    home = Path(os.environ.get("DLNEST_HOME") or Path.home() / ".dlnest").expanduser()
    home.mkdir(mode=0o700, parents=True, exist_ok=True)
    if home.stat().st_mode & 0o077:
        home.chmod(0o700)
    return home


def _row(row: sqlite3.Row | None) -> dict[str, Any] | None:
    if row is None:
        return None
    out = dict(row)
    for key in JSON_COLUMNS:
        if out.get(key) is not None:
            out[key] = json.loads(out[key])
    return out


class Ledger:
    """A handle on the user's ledger file; safe to share between threads (one connection per thread)."""

    def __init__(self, path: str | Path | None = None):
        self.path = Path(path) if path else self.default_path()
        if not self.path.exists():
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))  # 0600 before SQLite writes a byte
        self._local = threading.local()
        self._migrate()

    @staticmethod
    def default_path() -> Path:
        return dlnest_home() / "ledger.sqlite3"

    @property
    def db(self) -> sqlite3.Connection:
        conn = getattr(self._local, "conn", None)
        if conn is None:
            conn = sqlite3.connect(self.path, timeout=30, isolation_level=None)
            conn.row_factory = sqlite3.Row
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute("PRAGMA foreign_keys=ON")
            self._local.conn = conn
        return conn

    @contextlib.contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """One atomic state change, holding the write lock from its first statement."""
        db = self.db
        db.execute("BEGIN IMMEDIATE")
        try:
            yield db
        except BaseException:
            db.execute("ROLLBACK")
            raise
        db.execute("COMMIT")

    def _migrate(self) -> None:
        with self.transaction() as db:
            version = db.execute("PRAGMA user_version").fetchone()[0]
            if version > len(MIGRATIONS):
                raise DLNestError(f"{self.path} was written by a newer dlnest_jupyter (schema {version}); upgrade")
            for script in MIGRATIONS[version:]:
                for statement in filter(str.strip, script.split(";")):
                    db.execute(statement)
            db.execute(f"PRAGMA user_version = {len(MIGRATIONS)}")

    # -- tasks ----------------------------------------------------------------------------------------
    def insert(self, db: sqlite3.Connection, task: dict[str, Any]) -> None:
        task = {**task, **{k: json.dumps(task[k]) for k in JSON_COLUMNS if task.get(k) is not None}}
        columns = ", ".join(task)
        db.execute(f"INSERT INTO tasks ({columns}) VALUES ({', '.join('?' * len(task))})", list(task.values()))

    def update(self, db: sqlite3.Connection, task_id: str, **fields: Any) -> None:
        fields = {k: (json.dumps(v) if k in JSON_COLUMNS and v is not None else v) for k, v in fields.items()}
        sets = ", ".join(f"{k} = ?" for k in fields)
        db.execute(f"UPDATE tasks SET {sets} WHERE id = ?", [*fields.values(), task_id])

    def get(self, task_id: str, db: sqlite3.Connection | None = None) -> dict[str, Any] | None:
        return _row((db or self.db).execute("SELECT * FROM tasks WHERE id = ?", (task_id,)).fetchone())

    def tasks(self, statuses: tuple[str, ...] | None = None, db: sqlite3.Connection | None = None,
              order: str = "seq DESC", limit: int | None = None) -> list[dict[str, Any]]:
        sql, params = "SELECT * FROM tasks", []
        if statuses:
            sql += f" WHERE status IN ({', '.join('?' * len(statuses))})"
            params = list(statuses)
        sql += f" ORDER BY {order}" + (f" LIMIT {int(limit)}" if limit else "")
        return [_row(r) for r in (db or self.db).execute(sql, params)]

    def finish(self, task_id: str, status: str, exit_code: int | None = None, error: str | None = None) -> bool:
        """Record a task's end (once: a final status is never overwritten) and release its reservations."""
        with self.transaction() as db:
            row = db.execute("SELECT status FROM tasks WHERE id = ?", (task_id,)).fetchone()
            if row is None or row["status"] in FINAL:
                return False
            self.update(db, task_id, status=status, exit_code=exit_code, error=error, ended=time.time())
            db.execute("DELETE FROM reservations WHERE task_id = ?", (task_id,))
        return True

    # -- devices --------------------------------------------------------------------------------------
    def reservations(self, db: sqlite3.Connection | None = None) -> list[dict[str, Any]]:
        return [dict(r) for r in (db or self.db).execute("SELECT * FROM reservations")]

    def estimate(self, config_hash: str | None, db: sqlite3.Connection | None = None) -> int | None:
        if not config_hash:
            return None
        row = (db or self.db).execute("SELECT peak_mb FROM estimates WHERE config_hash = ?", (config_hash,)).fetchone()
        return row[0] if row else None

    def learn(self, config_hash: str, peak_mb: int) -> None:
        with self.transaction() as db:
            db.execute("INSERT INTO estimates VALUES (?, ?, ?) ON CONFLICT (config_hash) DO UPDATE SET "
                       "peak_mb = excluded.peak_mb, updated = excluded.updated", (config_hash, peak_mb, time.time()))
