"""The audit trail of a run, from both ends of its channel.

In the run process, ``Recorder`` turns each step into a channel message. In the supervisor,
``RunRecord`` is the run's watcher (``runner.agent.executor``): it numbers the events, keeps the counts
(tokens, model and tool calls, denials, tool errors), writes the agent's log, and hands rows to the
``LiveWriter``, the one thread that writes runs' live state (``run_progress`` and the ledger journal in
the state database) in batches. The final row, and a log line saying how the run ended, are written
last; the ledger flush archives them into DuckDB and prunes the live rows.
"""

from __future__ import annotations

import contextlib
import functools
import json
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Protocol

from runner.agent.channel import printable
from runner.errors import StorageFullError
from runner.ledger.schema import journal
from runner.sandbox.access import redact
from runner.state import Transaction, connect
from runner.times import utcnow

TERMINAL = ("succeeded", "failed", "timed_out", "budget_exceeded", "stopped", "interrupted", "skipped")


@dataclass(frozen=True)
class Links:
    """Where a run comes from besides its trigger: the run that asked it as a tool, the run whose end
    triggered it, and how deep in such a chain it is. Carried whole from a request to each of its rows."""

    parent_run_id: str | None = None
    trigger_run_id: str | None = None
    chain_depth: int = 0

    def fields(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def of(cls, data: dict[str, Any]) -> Links:
        """The links a recorded row (as_ledger's dict) holds."""
        return cls(data.get("parent_run_id"), data.get("trigger_run_id"), int(data.get("chain_depth") or 0))


NO_LINKS = Links()  # a run started by a user, a schedule or a file


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
    attempt: int = 1  # 1, then 2 for its first retry, ...
    denied: int = 0  # tool calls refused by policy
    tool_errors: int = 0  # tool calls that failed
    cpu_seconds: float | None = None  # what the kernel says the run's processes used
    max_rss_mb: float | None = None
    bytes_written: int | None = None
    node: str | None = None  # the host that ran it
    workflow_run_id: str | None = None  # the workflow run whose step this run is
    step: str | None = None
    parent_run_id: str | None = None  # the run that asked this one as a tool
    trigger_run_id: str | None = None  # the run (or workflow run) whose end triggered this one
    chain_depth: int = 0  # run_completed triggers between this run and one started otherwise
    extra: dict[str, Any] = field(default_factory=dict)  # not in the ledger: output_chars (an answer's full length)

    def as_ledger(self) -> dict[str, Any]:
        row = asdict(self)
        row.pop("extra")
        for key in ("input", "output", "error"):  # what users, tools and models said may hold secrets, as events
            row[key] = redact(row[key])
        return row


def live_row(progress_row: sqlite3.Row, status: str) -> RunRow:
    """A run's row as the live store has it (its counts as of its last recorded event)."""
    r = progress_row
    data = json.loads(r["row"]) if r["row"] else {}
    return RunRow(run_id=r["run_id"], client_id=r["client_id"], agent=r["agent"],
                  spec_revision=data.get("spec_revision"), trigger=data.get("trigger") or "unknown",
                  status=status, queued_at=data.get("queued_at"), started_at=data.get("started_at"),
                  input_tokens=int(r["input_tokens"]), output_tokens=int(r["output_tokens"]),
                  model_calls=int(r["model_calls"]), tool_calls=int(r["tool_calls"]),
                  input=data.get("input"), requested_by=data.get("requested_by"), pid=r["pid"],
                  retry_of=data.get("retry_of"), attempt=int(data.get("attempt") or 1),
                  denied=int(data.get("denied") or 0), tool_errors=int(data.get("tool_errors") or 0),
                  node=data.get("node"), workflow_run_id=data.get("workflow_run_id"), step=data.get("step"),
                  **Links.of(data).fields())


def end_in_flight(conn: sqlite3.Connection, progress_row: sqlite3.Row, status: str, error: str) -> RunRow:
    """Write the final row (and status event) of a run whose supervisor can no longer do it, from what
    the live store knows of it."""
    r = progress_row
    row = replace(live_row(r, status), ended_at=utcnow(), error=error)
    with Transaction(conn) as tx:
        journal(tx, "run_events", _status_event(row, int(r["seq"]) + 1))
        _write_run(tx, row)
    return row


def _status_event(row: RunRow, seq: int) -> dict[str, Any]:
    return {"run_id": row.run_id, "seq": seq, "ts": row.ended_at, "kind": "status", "name": row.status,
            "decision": None, "detail": redact({"error": row.error, "tokens": row.input_tokens + row.output_tokens})}


def write_run(conn: sqlite3.Connection, row: RunRow) -> None:
    with Transaction(conn) as tx:
        _write_run(tx, row)


def _write_run(tx: sqlite3.Connection, row: RunRow) -> None:
    """The run's row into the journal, and its live record (inside the caller's transaction)."""
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


def request_stop(conn: sqlite3.Connection, client_id: str, agent: str) -> int:
    """Ask every in-flight run of ``agent`` to stop, whoever supervises it (the daemon, or a foreground
    ``agentctl run`` in another terminal): each supervisor reads the flag and tells its executor."""
    cur = conn.execute("UPDATE run_progress SET stop_requested = 1 WHERE client_id = ? AND agent = ? "
                       "AND status IN ('queued', 'running')", (client_id, agent))
    return cur.rowcount


def stops_requested(conn: sqlite3.Connection, client_id: str) -> list[str]:
    """Runs in flight that someone asked to stop (request_stop)."""
    return [r[0] for r in conn.execute("SELECT run_id FROM run_progress WHERE client_id = ? AND stop_requested = 1 "
                                       "AND status = 'running'", (client_id,))]


class LogWriter(Protocol):
    def write(self, message: str, level: str = "INFO") -> None: ...


class Recorder:
    """What the run process records with: every step goes to its launcher as one JSON line.

    The run process has no access to the state database or the log folder (its sandbox forbids both):
    it writes ``{"t": "event" | "usage" | "tool" | "log" | "result", ...}`` lines on the pipe to its
    launcher, which applies them (``apply``) in order. Token totals are kept here too, so the budget
    needs no round trip. ``borrowed`` counts the tokens of the agents this run asked as tools: they are
    on this run's budget (``used``), never in its own counts (the ledger has them on the callees' rows).
    """

    def __init__(self, sink: Callable[[dict[str, Any]], None], run_id: str) -> None:
        self.sink, self.run_id = sink, run_id
        self.input_tokens = self.output_tokens = self.borrowed = 0
        self.log = _PipeLog(sink)

    @property
    def used(self) -> int:
        return self.input_tokens + self.output_tokens + self.borrowed

    def borrow(self, tokens: int) -> None:
        self.borrowed += max(0, tokens)

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


_LOG_FAILED: set[str] = set()  # agent logs whose last write failed: one warning each until one succeeds


class AgentLog:
    """Append-only per-agent log, one line per step: ``TS run=ID LEVEL message``.

    Lines are written with O_APPEND in one write each, so the daemon and foreground runs can share
    the file. Rotated by size: past ``max_bytes`` the file becomes NAME.log.1 (older ones shift up).
    """

    def __init__(self, path: Path, run_id: str, max_bytes: int = 10 * 1024 * 1024, backups: int = 5) -> None:
        self.path, self.run_id, self.max_bytes, self.backups = path, run_id, max_bytes, backups
        path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, message: str, level: str = "INFO") -> None:
        stamp = utcnow()
        # Redacted like the ledger's details: a denial's reason or a tool's error can quote an argument.
        # Shown, not obeyed: an escape sequence in a tool's error would reach the terminal of `agentctl logs`.
        line = f"{stamp} run={self.run_id} {level} {printable(redact(message))}" + "\n"
        try:
            fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
            try:
                os.write(fd, line.encode("utf-8", "replace"))
                size = os.fstat(fd).st_size
            finally:
                os.close(fd)
            if size > self.max_bytes:
                self._rotate()
        except OSError as exc:  # a full or broken log disk loses log lines, never a run's record or its end
            if str(self.path) not in _LOG_FAILED:
                _LOG_FAILED.add(str(self.path))
                log.warning("agent log %s cannot be written (%s): lines are dropped until it can", self.path,
                            exc.strerror or exc)
            return
        _LOG_FAILED.discard(str(self.path))

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


log = logging.getLogger("runner.agent")
Write = Callable[[sqlite3.Connection], None]


class LiveWriter:
    """The one thread that writes runs' live state: writes are queued (``put``) and committed in
    batches, one transaction for whatever is queued when the thread takes it. So a run's dozen messages
    cost a share of a transaction, not a dozen. ``then`` callbacks run once their write is durable.

    A full disk or a locked database keeps the batch and tries it again (the writes wait in memory, in
    order); a write that fails by itself (a bug) is dropped alone, with the error in the log."""

    RETRY = 0.5  # seconds between two tries of a batch the database refused

    def __init__(self, state_path: Path) -> None:
        self.conn = connect(state_path)
        self._cond = threading.Condition()
        self._queue: list[tuple[Write, Callable[[], None] | None]] = []
        self._busy = False
        self._closed = False
        self._thread = threading.Thread(target=self._loop, name="live-writer", daemon=True)
        self._thread.start()

    def put(self, write: Write, then: Callable[[], None] | None = None) -> None:
        with self._cond:
            self._queue.append((write, then))
            self._cond.notify_all()

    def settle(self, timeout: float | None = None) -> bool:
        """Wait until every write queued so far is committed."""
        with self._cond:
            return self._cond.wait_for(lambda: not self._queue and not self._busy, timeout)

    def close(self) -> None:
        self.settle(60)
        with self._cond:
            self._closed = True
            self._cond.notify_all()
        self._thread.join(timeout=10)
        self.conn.close()

    def _loop(self) -> None:
        while True:
            with self._cond:
                self._cond.wait_for(lambda: self._queue or self._closed)
                if not self._queue and self._closed:
                    return
                batch, self._queue = self._queue, []
                self._busy = True
            self._commit(batch)
            for _write, then in batch:
                if then is not None:
                    try:
                        then()
                    except Exception:
                        log.exception("after a live write")
            with self._cond:
                self._busy = False
                self._cond.notify_all()

    def _commit(self, batch: list[tuple[Write, Callable[[], None] | None]]) -> None:
        warned = False
        while True:
            try:
                with Transaction(self.conn) as tx:
                    for write, _then in batch:
                        write(tx)
                return
            except sqlite3.Error as exc:  # locked past the busy timeout, or the disk is full (FULL or IOERR)
                if not isinstance(exc, sqlite3.OperationalError) and StorageFullError.of(exc) is None:
                    self._one_by_one(batch)  # a write that fails by itself (a bug): the others still land
                    return
                if not warned:
                    log.warning("live state: %d write(s) wait: %s", len(batch), exc)
                    warned = True
                time.sleep(self.RETRY)
            except Exception:
                self._one_by_one(batch)
                return

    def _one_by_one(self, batch: list[tuple[Write, Callable[[], None] | None]]) -> None:
        log.exception("a batch of live writes failed: writing them one by one")
        for write, _then in batch:
            try:
                with Transaction(self.conn) as tx:
                    write(tx)
            except Exception:
                log.exception("a live write was dropped")


class RunRecord:
    """The supervisor's record of one run: the watcher its executor reports to."""

    def __init__(self, writer: LiveWriter, row: RunRow, logs_dir: Path,
                 on_end: Callable[[RunRow], None] | None = None,
                 on_message: Callable[[dict[str, Any]], None] | None = None,
                 on_ask: Callable[[dict[str, Any]], None] | None = None) -> None:
        self.writer, self.row, self.on_end, self.on_message = writer, row, on_end, on_message
        self.on_ask = on_ask  # answers the run's questions (runner.agent.asking)
        # (status, error) a stop on its supervisor's behalf ends it with, instead of "stopped on request" (a
        # workflow's deadline: timed_out)
        self.stop_as: tuple[str, str] | None = None
        self.seq = 0
        self.skip = 0  # events on record already (a run followed again after a daemon's crash): not written again
        self.durable = threading.Event()  # set once the final row is on disk
        # Messages come from the executor's thread, one at a time; the supervisor adds a few of its own from
        # the threads that answer the run's asks (an egress decision of a remote agent's call) while the run
        # waits: the lock keeps their numbering in order.
        self._lock = threading.RLock()
        self.started = time.monotonic()
        self.log = AgentLog(agent_log_path(logs_dir, row.client_id, row.agent), row.run_id)

    @classmethod
    def resume(cls, writer: LiveWriter, progress_row: sqlite3.Row, logs_dir: Path,
               on_end: Callable[[RunRow], None] | None = None,
               on_ask: Callable[[dict[str, Any]], None] | None = None) -> RunRecord:
        """The record of a run a dead supervisor was following, to be fed the run's messages again from the
        first: those up to its last recorded event are counted (denials, tool errors), not recorded twice."""
        record = cls(writer, live_row(progress_row, progress_row["status"]), logs_dir, on_end=on_end, on_ask=on_ask)
        record.row.denied = record.row.tool_errors = 0  # counted again from the events replayed
        record.seq = record.skip = int(progress_row["seq"])
        return record

    def begin(self, conn: sqlite3.Connection, executor: str = "local") -> None:
        """The row says running, and which executor has it, durably, before the run is submitted: a crash from
        here on leaves a record that says so (the next daemon marks it interrupted or, for a cluster's run, asks
        the nodes for it; it never starts it again)."""
        row = self.row
        row.status, row.started_at = "running", utcnow()
        with Transaction(conn) as tx:
            _write_run(tx, row)
            tx.execute("UPDATE run_progress SET executor = ? WHERE run_id = ?", (executor, row.run_id))

    def message(self, message: dict[str, Any]) -> None:
        with self._lock:
            self._message(message)

    def _message(self, message: dict[str, Any]) -> None:
        row, kind = self.row, message["t"]
        if self.skip:
            if kind == "event":
                self.skip -= 1
                _count(row, message)
            return  # what came before the last recorded event is on record (its counts with that event)
        if kind == "event":
            self.seq += 1
            event = {"run_id": row.run_id, "seq": self.seq, "ts": message.get("ts") or utcnow(),
                     "kind": str(message["kind"]), "name": message.get("name"), "decision": message.get("decision"),
                     "detail": redact(message.get("detail"))}
            _count(row, event)
            counts = (self.seq, row.input_tokens, row.output_tokens, row.model_calls, row.tool_calls)
            self.writer.put(functools.partial(_event, run_id=row.run_id, event=event, counts=counts))
            if self.on_message is not None:
                self.on_message(event)
        elif kind == "waiting":  # its executor has no node for it yet: queued again, as far as the record goes
            if row.pid is None and row.status == "running":
                row.status, row.started_at = "queued", None
                self.writer.put(functools.partial(_write_run, row=replace(row)))
        elif kind == "placed":  # the live row learns where the run is (the ledger, with its final row)
            if row.status == "queued":  # it waited for a node: it starts now
                row.status, row.started_at = "running", utcnow()
                self.writer.put(functools.partial(_write_run, row=replace(row)))
            row.pid, row.node = message.get("pid"), message.get("node")
            self.writer.put(functools.partial(_placed, run_id=row.run_id, pid=row.pid, node=row.node,
                                              executor=message.get("executor", "local")))
        elif kind == "usage":
            row.input_tokens += int(message["input"])
            row.output_tokens += int(message["output"])
            row.model_calls += 1
        elif kind == "tool":
            row.tool_calls += 1
        elif kind == "log":
            self.log.write(str(message.get("message", ""))[:4000], str(message.get("level", "INFO")))
        elif kind == "ask" and self.on_ask is not None and not message.get("answered"):
            self.on_ask(message)

    def ended(self, outcome: Any) -> None:
        """The final event and row, one log line saying how it ended, then ``on_end`` once they are durable."""
        if outcome.status == "stopped" and self.stop_as is not None:
            outcome = replace(outcome, status=self.stop_as[0], error=self.stop_as[1])
        row = self.row
        row.status, row.output, row.error, row.ended_at = outcome.status, outcome.output, outcome.error, utcnow()
        row.cpu_seconds, row.max_rss_mb, row.bytes_written = outcome.cpu_seconds, outcome.max_rss_mb, \
            outcome.bytes_written
        if outcome.output_chars is not None:
            row.extra["output_chars"] = outcome.output_chars
        self.seq += 1
        event = _status_event(row, self.seq)
        final = replace(row)
        self.log.write(end_line(final, time.monotonic() - self.started),
                       "INFO" if row.status == "succeeded" else "WARNING")
        on_end = self.on_end

        def then() -> None:
            self.durable.set()
            if on_end is not None:
                on_end(final)

        self.writer.put(lambda tx: _final(tx, event, final), then=then)

    def fail(self, error: str) -> None:
        """The run never started (its executor refused it): failed, with the reason."""
        from runner.agent.executor import Outcome

        self.ended(Outcome("failed", error=error))


def _count(row: RunRow, event: dict[str, Any]) -> None:
    if event["kind"] == "tool_call":
        if event["decision"] == "denied":
            row.denied += 1
        elif isinstance(event.get("detail"), dict) and event["detail"].get("error"):
            row.tool_errors += 1


def _placed(tx: sqlite3.Connection, run_id: str, pid: int | None, node: str | None, executor: str) -> None:
    tx.execute("UPDATE run_progress SET pid = ?, executor = ?, row = json_set(row, '$.pid', ?, '$.node', ?) "
               "WHERE run_id = ?", (pid, executor, pid, node, run_id))


def _final(tx: sqlite3.Connection, event: dict[str, Any], final: RunRow) -> None:
    journal(tx, "run_events", event)
    _write_run(tx, final)
    tx.execute("UPDATE run_progress SET seq = ? WHERE run_id = ?", (event["seq"], final.run_id))


def _event(tx: sqlite3.Connection, run_id: str, event: dict[str, Any], counts: tuple[int, ...]) -> None:
    journal(tx, "run_events", event)
    tx.execute("""UPDATE run_progress SET seq = ?, input_tokens = ?, output_tokens = ?, model_calls = ?,
                  tool_calls = ?, updated_at = ? WHERE run_id = ?""", (*counts, event["ts"], run_id))


def end_line(row: RunRow, seconds: float) -> str:
    """How a run ended, in one line of its agent's log."""
    parts = [f"run ended: {row.status} in {seconds:.2f}s", f"tokens {row.input_tokens}+{row.output_tokens}",
             f"{row.model_calls} model call(s)", f"{row.tool_calls} tool call(s)"]
    if row.denied or row.tool_errors:
        parts.append(f"{row.denied} denied, {row.tool_errors} tool error(s)")
    if row.cpu_seconds is not None:
        parts.append(f"cpu {row.cpu_seconds:.2f}s, peak {row.max_rss_mb or 0:.0f} MB, "
                     f"{row.bytes_written or 0} bytes written")
    if row.error:
        parts.append(f"error: {row.error[:300]}")
    return "; ".join(parts)
