"""Move journal rows from the state database into the DuckDB ledger.

DuckDB lets one process hold its file for writing, and a reader (``duckdb -readonly``) blocks every
writer while it has the file open. So nobody keeps the ledger open: writers append to the SQLite
journal, and ``flush`` opens DuckDB only for the few milliseconds of one ingest transaction. When the
file is busy the rows simply stay in the journal for the next flush; nothing is lost, nothing fails.

Order matters (a run row is written when it starts and again when it ends), so flushes are
serialized with a file lock and rows are applied in journal order, last write per key winning.

A full disk (the home's, which holds both files) is a pause, not a failure: the batch stays in the
journal, ``flush`` returns None as for a busy ledger, one warning says so for the whole episode, and the
first flush that moves rows again says it resumed. A crash of DuckDB's commit or of the journal delete
half-way leaves nothing to repair: the rows are upserted again by the next flush.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sqlite3
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import duckdb

from runner.errors import StorageFullError
from runner.ledger.schema import TABLES, column_types, columns

LIVE = ("queued", "running")  # a run in these states stays in the live store when its row is archived
KEYS = {"runs": ("run_id",), "run_events": ("run_id", "seq"), "reconciles": ("reconcile_id",),
        "audit": ("audit_id",), "workflow_runs": ("workflow_run_id",), "approvals": ("approval_id",),
        "deliveries": ("delivery_id",)}
BATCH = 5000
CHECKPOINT_WAL = "8MB"  # WAL size past which a flush's commit folds it into the ledger file
log = logging.getLogger("runner.ledger")
# Every DuckDB connection this process opens goes through this lock: DuckDB refuses a second connection
# to a file with another configuration (read-only beside read-write) or while another is being opened
# ("Unique file handle conflict"), and a flush and an API read in two threads would do just that.
LEDGER_LOCK = threading.RLock()
# What DuckDB raises about a row's data (a value it cannot convert or store): only these set a row
# aside. Anything else (a lock, a connection, the disk) is the file's state, and the rows wait.
DATA_ERRORS: tuple[type[Exception], ...] = (duckdb.ConversionException, duckdb.ConstraintException,
                                            duckdb.InvalidInputException, duckdb.OutOfRangeException,
                                            duckdb.TypeMismatchException)


Observer = Callable[[str, dict[str, Any]], None]


def flush(state: sqlite3.Connection, ledger_path: Path, *, wait: bool = False,
          observe: Observer | None = None) -> int | None:
    """Ingest pending journal rows. Returns how many, or None when the ledger is busy right now or the
    disk is full (the rows wait in the journal either way)."""
    lock_path = ledger_path.with_suffix(".lock")
    try:
        lock_path.parent.mkdir(parents=True, exist_ok=True)
        with open(lock_path, "a") as lock:
            return _flush_locked(state, ledger_path, lock, wait, observe)
    except OSError as exc:  # creating the lock file found the disk full (anything else is raised again)
        return _paused(state, ledger_path, exc, 0)


def _flush_locked(state: sqlite3.Connection, ledger_path: Path, lock: IO[str], wait: bool,
                  observe: Observer | None) -> int | None:
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | (0 if wait else fcntl.LOCK_NB))
    except BlockingIOError:
        return None  # another process is flushing; it will take our rows too
    total = 0
    # The rows there now, not those that arrive meanwhile: under load a flush would otherwise never end, and
    # spend itself on many small DuckDB transactions instead of one per tick.
    last = state.execute("SELECT max(id) FROM journal").fetchone()[0] or 0
    while True:
        rows = state.execute("SELECT id, tbl, row FROM journal WHERE id <= ? ORDER BY id LIMIT ?",
                             (last, BATCH)).fetchall()
        if not rows:
            _resumed(ledger_path, total)
            return total
        try:
            ingested = _move(state, ledger_path, rows)
        except _Busy:
            return None if total == 0 else total  # a reader holds the file; try again later
        except Exception as exc:
            return _paused(state, ledger_path, exc, total)
        total += len(rows)
        if observe is not None:
            for tbl, row in ingested:
                observe(tbl, row)


class _Busy(Exception):
    """A reader holds the ledger file."""


def _move(state: sqlite3.Connection, ledger_path: Path, rows: list[sqlite3.Row]) -> list[tuple[str, dict[str, Any]]]:
    """One batch into DuckDB, then out of the journal."""
    try:
        ingested = _ingest(ledger_path, rows)
    except duckdb.Error as exc:
        if StorageFullError.of(exc) is not None:
            raise  # never taken for a bad row: the batch waits for space, whole
        if not isinstance(exc, DATA_ERRORS):
            _busy_once(ledger_path, exc)
            raise _Busy() from exc
        ingested = _one_by_one(state, ledger_path, rows)
    # Archived: out of the live store, in one transaction. A run whose final row went in leaves
    # run_progress with its last journal row (its events came before it, so they are in DuckDB too).
    ended = [row["run_id"] for tbl, row in ingested if tbl == "runs" and row.get("status") not in LIVE]
    state.execute("BEGIN IMMEDIATE")
    try:
        state.execute("DELETE FROM journal WHERE id <= ?", (rows[-1][0],))
        for i in range(0, len(ended), 500):
            part = ended[i:i + 500]
            state.execute(f"DELETE FROM run_progress WHERE run_id IN ({','.join('?' * len(part))}) "
                          "AND status NOT IN ('queued', 'running')", part)
        state.execute("COMMIT")
    except BaseException:
        state.execute("ROLLBACK")
        raise
    return ingested


# Ledgers whose last flush found the disk full: one warning per episode, one line when it ends.
_FULL: set[str] = set()


def _paused(state: sqlite3.Connection, ledger_path: Path, exc: Exception, total: int) -> int | None:
    """A flush stopped by ``exc``: re-raised unless it says the disk is full."""
    full = StorageFullError.of(exc)
    if full is None:
        raise exc
    if str(ledger_path) not in _FULL:
        _FULL.add(str(ledger_path))
        log.warning("ledger flush paused: the disk holding %s is full (%s); %d row(s) wait in the journal and "
                    "are retried at every flush until space is freed", ledger_path.parent, full.details[0],
                    pending(state))
    return None if total == 0 else total


def _resumed(ledger_path: Path, total: int) -> None:
    # Only a flush that wrote rows proves there is space again; an empty journal proves nothing.
    if total and str(ledger_path) in _FULL:
        _FULL.discard(str(ledger_path))
        log.info("ledger flush resumed: %d row(s) moved to %s", total, ledger_path)


def _one_by_one(state: sqlite3.Connection, ledger_path: Path, rows: list[sqlite3.Row]
                ) -> list[tuple[str, dict[str, Any]]]:
    """A batch DuckDB refused: ingest row by row, and set aside (journal_rejected) the rows it cannot
    store, with the reason, so one bad row never blocks the journal behind it."""
    state.execute("CREATE TABLE IF NOT EXISTS journal_rejected (id INTEGER PRIMARY KEY, tbl TEXT, row TEXT, "
                  "error TEXT)")
    ingested: list[tuple[str, dict[str, Any]]] = []
    rejected = 0
    for row in rows:
        try:
            ingested += _ingest(ledger_path, [row])
        except DATA_ERRORS as exc:
            rejected += 1
            state.execute("INSERT OR REPLACE INTO journal_rejected VALUES (?, ?, ?, ?)",
                          (row[0], row[1], row[2], str(exc)[:1000]))
        except duckdb.Error as exc:
            raise _Busy() from exc
    if rejected:
        log.warning("ledger: %d row(s) DuckDB refused were set aside in journal_rejected (state.sqlite), with "
                    "the reason; they are tried again at every daemon start", rejected)
    return ingested


_BUSY: set[str] = set()  # ledgers whose last flush found the file busy for a reason other than a lock


def _busy_once(ledger_path: Path, exc: Exception) -> None:
    if not is_lock_error(exc) and str(ledger_path) not in _BUSY:
        _BUSY.add(str(ledger_path))
        log.warning("ledger flush deferred: %s; rows wait in the journal", str(exc).splitlines()[0][:300])


# This process's read-only connection to each ledger, kept between reads (opening one costs about ten
# times a query) and dropped, under LEDGER_LOCK, before this process writes the file.
_READERS: dict[str, duckdb.DuckDBPyConnection] = {}


def reader(ledger_path: Path) -> duckdb.DuckDBPyConnection:
    """The kept read-only connection (call under LEDGER_LOCK)."""
    key = str(ledger_path)
    con = _READERS.get(key)
    if con is None:
        con = _READERS[key] = duckdb.connect(key, read_only=True)
    return con


def drop_reader(ledger_path: Path) -> None:
    con = _READERS.pop(str(ledger_path), None)
    if con is not None:
        con.close()


def checkpoint(ledger_path: Path) -> None:
    """Fold the WAL into the ledger file (the daemon, as it stops): readers then open it without replaying."""
    with LEDGER_LOCK:
        drop_reader(ledger_path)
        try:
            con = duckdb.connect(str(ledger_path))
        except duckdb.Error:
            return  # busy, or no ledger: the WAL waits for the next one
        try:
            con.execute("CHECKPOINT")
        except duckdb.Error as exc:
            log.warning("ledger checkpoint skipped: %s", str(exc).splitlines()[0][:300])
        finally:
            con.close()


def retry_rejected(state: sqlite3.Connection) -> int:
    """Put the rows set aside back in the journal, for the next flush to try again (at every daemon
    start: a newer version may store what an older one refused). Returns how many."""
    if state.execute("SELECT 1 FROM sqlite_master WHERE name = 'journal_rejected'").fetchone() is None:
        return 0
    state.execute("BEGIN IMMEDIATE")
    try:
        moved = state.execute("INSERT INTO journal (tbl, row, run_id) SELECT tbl, row, json_extract(row, '$.run_id') "
                              "FROM journal_rejected ORDER BY id").rowcount
        state.execute("DELETE FROM journal_rejected")
        state.execute("COMMIT")
    except BaseException:
        state.execute("ROLLBACK")
        raise
    if moved:
        log.warning("ledger: %d row(s) set aside earlier (journal_rejected) go back to the journal to be tried again",
                    moved)
    return int(moved)


def rejected(state: sqlite3.Connection) -> int:
    """How many rows wait set aside (for health and metrics)."""
    if state.execute("SELECT 1 FROM sqlite_master WHERE name = 'journal_rejected'").fetchone() is None:
        return 0
    return int(state.execute("SELECT count(*) FROM journal_rejected").fetchone()[0])


def is_lock_error(exc: Exception) -> bool:
    """DuckDB says 'Could not set lock on file' when another process holds it."""
    return "lock" in str(exc).lower()


def pending(state: sqlite3.Connection) -> int:
    return int(state.execute("SELECT count(*) FROM journal").fetchone()[0])


_ENSURED: set[str] = set()  # ledger files whose tables this process has created or seen


def ensure_schema(con: duckdb.DuckDBPyConnection, path: Path | None = None) -> None:
    key = str(path) if path else ""
    if key and key in _ENSURED:
        return
    for ddl in TABLES.values():
        con.execute(ddl)
    if key:
        _ENSURED.add(key)


def _ingest(ledger_path: Path, rows: list[sqlite3.Row]) -> list[tuple[str, dict[str, Any]]]:
    by_table: dict[str, dict[tuple[Any, ...], dict[str, Any]]] = {}
    seen: list[tuple[str, dict[str, Any]]] = []
    for _id, tbl, raw in rows:
        row = json.loads(raw)
        seen.append((tbl, row))
        key = tuple(row.get(k) for k in KEYS[tbl])
        bucket = by_table.setdefault(tbl, {})
        bucket.pop(key, None)  # keep journal order for the last write of each key
        bucket[key] = row
    with LEDGER_LOCK:
        drop_reader(ledger_path)  # a read-only connection beside a writing one: DuckDB refuses the second
        con = _connect(ledger_path)
        try:
            # No checkpoint at every close: it rewrites the primary keys' indexes whole, so a flush would cost
            # more the larger the ledger (120 ms at 100,000 runs). The WAL takes the rows; DuckDB checkpoints
            # once it passes CHECKPOINT_WAL, and the daemon once more as it stops (checkpoint).
            con.execute("PRAGMA disable_checkpoint_on_shutdown")
            con.execute(f"SET checkpoint_threshold = '{CHECKPOINT_WAL}'")
            ensure_schema(con, ledger_path)
            con.execute("BEGIN")
            for tbl, bucket in by_table.items():
                _insert(con, tbl, list(bucket.values()), ledger_path.parent)
            con.execute("COMMIT")
        finally:
            con.close()
    _BUSY.discard(str(ledger_path))
    return seen


def _connect(ledger_path: Path) -> duckdb.DuckDBPyConnection:
    try:
        return duckdb.connect(str(ledger_path))
    except duckdb.IOException:
        # DuckDB creating the file on a full disk leaves it empty, and from then on refuses it as "not a
        # valid DuckDB database file". An empty file holds no rows: remove it and create the ledger again.
        try:
            empty = ledger_path.stat().st_size == 0
        except OSError:
            empty = False
        if not empty:
            raise
        ledger_path.unlink(missing_ok=True)
        _ENSURED.discard(str(ledger_path))
        return duckdb.connect(str(ledger_path))


def _insert(con: duckdb.DuckDBPyConnection, table: str, rows: list[dict[str, Any]], folder: Path) -> None:
    """Bulk upsert through a newline-delimited JSON file: DuckDB's reader is its fast path (binding
    thousands of parameters in one INSERT is its slow one: 1.7 s for 2,600 rows against 20 ms)."""
    cols = columns(table)
    types = column_types(table)
    fd, name = tempfile.mkstemp(prefix=f".ingest-{table}-", suffix=".ndjson", dir=folder)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as out:
            for row in rows:
                out.write(json.dumps({c: _cell(row.get(c)) for c in cols}) + "\n")
        spec = "{" + ", ".join(f"'{c}': '{types[c]}'" for c in cols) + "}"
        quoted = ", ".join(f'"{c}"' for c in cols)
        con.execute(f"INSERT OR REPLACE INTO {table} ({quoted}) SELECT {quoted} FROM "
                    f"read_json('{name}', format = 'newline_delimited', columns = {spec})")
    finally:
        os.unlink(name)


def _cell(value: Any) -> Any:
    return json.dumps(value) if isinstance(value, dict | list) else value
