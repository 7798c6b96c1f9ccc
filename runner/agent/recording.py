"""The audit trail of a run.

Two writers, one rule each: the launcher (parent) writes the ``runs`` row at every state change, and
the run process (child) writes ``run_events``. Both go through the ledger journal. Event numbers,
token counts and call counts live in ``run_progress`` in the state database, so the parent can
number its own final event and report tokens of a run it had to kill.
"""

from __future__ import annotations

import contextlib
import json
import os
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from runner.agent.access import redact
from runner.state import Transaction, journal

TERMINAL = ("succeeded", "failed", "timed_out", "budget_exceeded", "stopped", "interrupted", "skipped")


def utcnow() -> str:
    return datetime.now(UTC).replace(tzinfo=None).isoformat(timespec="milliseconds")


@dataclass
class RunRow:
    """One row of the ``runs`` table; written whole at each state change."""

    run_id: str
    client_id: str
    agent: str
    spec_revision: str | None
    trigger: str
    status: str
    queued_at: str | None = None
    started_at: str | None = None
    ended_at: str | None = None
    input_tokens: int = 0
    output_tokens: int = 0
    model_calls: int = 0
    tool_calls: int = 0
    error: str | None = None
    input: str | None = None
    output: str | None = None
    requested_by: str | None = None
    pid: int | None = None
    retry_of: str | None = None  # the run this one retries
    extra: dict[str, Any] = field(default_factory=dict)

    def as_ledger(self) -> dict[str, Any]:
        row = asdict(self)
        row.pop("extra")
        for key in ("input", "error"):  # what users and tools typed may hold secrets; redact as events are
            row[key] = redact(row[key])
        return row


def end_in_flight(conn: sqlite3.Connection, progress_row: sqlite3.Row, status: str, error: str) -> None:
    """Write the final row of a run whose launcher can no longer do it, from what is known of it."""
    r = progress_row
    data = json.loads(r["row"]) if r["row"] else {}
    write_run(conn, RunRow(run_id=r["run_id"], client_id=r["client_id"], agent=r["agent"],
                           spec_revision=data.get("spec_revision"), trigger=data.get("trigger") or "unknown",
                           status=status, queued_at=data.get("queued_at"), started_at=data.get("started_at"),
                           ended_at=utcnow(), input_tokens=int(r["input_tokens"]),
                           output_tokens=int(r["output_tokens"]), model_calls=int(r["model_calls"]),
                           tool_calls=int(r["tool_calls"]), error=error, input=data.get("input"),
                           requested_by=data.get("requested_by"), pid=r["pid"], retry_of=data.get("retry_of")))


def write_run(conn: sqlite3.Connection, row: RunRow) -> None:
    with Transaction(conn) as tx:
        journal(tx, "runs", row.as_ledger())
        tx.execute(
            """INSERT INTO run_progress (run_id, client_id, agent, pid, launcher_pid, status, started_at, updated_at,
                   row)
               VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)
               ON CONFLICT(run_id) DO UPDATE SET status = excluded.status, pid = coalesce(excluded.pid, pid),
                   started_at = coalesce(excluded.started_at, started_at), launcher_pid = excluded.launcher_pid,
                   updated_at = excluded.updated_at, row = excluded.row""",
            (row.run_id, row.client_id, row.agent, row.pid, os.getpid(), row.status, row.started_at, utcnow(),
             json.dumps(row.as_ledger())))


def next_seq(conn: sqlite3.Connection, run_id: str) -> int:
    row = conn.execute("UPDATE run_progress SET seq = seq + 1 WHERE run_id = ? RETURNING seq", (run_id,)).fetchone()
    return int(row[0]) if row else 0


def progress(conn: sqlite3.Connection, run_id: str) -> dict[str, Any]:
    row = conn.execute("SELECT * FROM run_progress WHERE run_id = ?", (run_id,)).fetchone()
    return dict(row) if row else {}


class LogWriter(Protocol):
    def write(self, message: str, level: str = "INFO") -> None: ...


class Recorder:
    """What the run process records with: every step goes to its launcher as one JSON line.

    The run process has no access to the state database or the log folder (its sandbox forbids both):
    it writes ``{"t": "event" | "usage" | "tool" | "log" | "result", ...}`` lines on the pipe to its
    launcher, which applies them (``apply``) in order. Token totals are kept here too, so the budget
    needs no round trip.
    """

    def __init__(self, sink: Callable[[dict[str, Any]], None], run_id: str) -> None:
        self.sink, self.run_id = sink, run_id
        self.input_tokens = self.output_tokens = 0
        self.log = _PipeLog(sink)

    @property
    def used(self) -> int:
        return self.input_tokens + self.output_tokens

    def event(self, kind: str, name: str | None = None, decision: str | None = None,
              detail: dict[str, Any] | None = None) -> None:
        self.sink({"t": "event", "ts": utcnow(), "kind": kind, "name": name, "decision": decision,
                   "detail": redact(detail or {})})

    def usage(self, input_tokens: int, output_tokens: int) -> tuple[int, int]:
        self.input_tokens += input_tokens
        self.output_tokens += output_tokens
        self.sink({"t": "usage", "input": input_tokens, "output": output_tokens})
        return self.input_tokens, self.output_tokens

    def tool_called(self) -> None:
        self.sink({"t": "tool"})


class _PipeLog:
    def __init__(self, sink: Callable[[dict[str, Any]], None]) -> None:
        self.sink = sink

    def write(self, message: str, level: str = "INFO") -> None:
        self.sink({"t": "log", "level": level, "message": message})


def apply(conn: sqlite3.Connection, run_id: str, log: AgentLog, message: dict[str, Any]) -> None:
    """The launcher's side: one line from the run process into the journal, progress and log."""
    kind = message.get("t")
    if kind == "event":
        with Transaction(conn) as tx:
            seq = next_seq(tx, run_id)
            if message.get("kind") == "tool_call":
                tx.execute("""INSERT INTO tool_stats (client_id, tool, decision, count)
                              SELECT client_id, ?, ?, 1 FROM run_progress WHERE run_id = ?
                              ON CONFLICT (client_id, tool, decision) DO UPDATE SET count = count + 1""",
                           (str(message.get("name")), str(message.get("decision")), run_id))
            journal(tx, "run_events", {"run_id": run_id, "seq": seq, "ts": message.get("ts") or utcnow(),
                                       "kind": str(message.get("kind")), "name": message.get("name"),
                                       "decision": message.get("decision"), "detail": redact(message.get("detail"))})
    elif kind == "usage":
        conn.execute("""UPDATE run_progress SET input_tokens = input_tokens + ?, output_tokens = output_tokens + ?,
                        model_calls = model_calls + 1, updated_at = ? WHERE run_id = ?""",
                     (int(message.get("input", 0)), int(message.get("output", 0)), utcnow(), run_id))
    elif kind == "tool":
        conn.execute("UPDATE run_progress SET tool_calls = tool_calls + 1 WHERE run_id = ?", (run_id,))
    elif kind == "log":
        log.write(str(message.get("message", ""))[:4000], str(message.get("level", "INFO")))


class AgentLog:
    """Append-only per-agent log, one line per step: ``TS run=ID LEVEL message``.

    Lines are written with O_APPEND in one write each, so the daemon and foreground runs can share
    the file. Rotated by size: past ``max_bytes`` the file becomes NAME.log.1 (older ones shift up).
    """

    def __init__(self, path: Path, run_id: str, max_bytes: int = 10 * 1024 * 1024, backups: int = 5) -> None:
        self.path, self.run_id, self.max_bytes, self.backups = path, run_id, max_bytes, backups
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, message: str, level: str = "INFO") -> None:
        stamp = datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")
        # Redacted like the ledger's details: a denial's reason or a tool's error can quote an argument.
        line = f"{stamp} run={self.run_id} {level} {redact(message)}".replace("\n", "\\n") + "\n"
        fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:
            os.write(fd, line.encode("utf-8", "replace"))
            size = os.fstat(fd).st_size
        finally:
            os.close(fd)
        if size > self.max_bytes:
            self._rotate()

    def _rotate(self) -> None:
        for i in range(self.backups - 1, 0, -1):
            older = self.path.with_name(f"{self.path.name}.{i}")
            if older.exists():
                os.replace(older, self.path.with_name(f"{self.path.name}.{i + 1}"))
        with contextlib.suppress(FileNotFoundError):  # another process rotated it first
            os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))


def agent_log_path(logs_dir: Path, client_id: str, agent: str) -> Path:
    """logs/agents/NAME.log for the default client, logs/clients/ID/agents/NAME.log for others."""
    if client_id == "default":
        return logs_dir / "agents" / f"{agent}.log"
    return logs_dir / "clients" / client_id / "agents" / f"{agent}.log"


def new_run_id() -> str:
    """Time-ordered and unique: milliseconds since the epoch in hex, then 48 random bits."""
    return f"{int(time.time() * 1000):012x}{os.urandom(6).hex()}"
