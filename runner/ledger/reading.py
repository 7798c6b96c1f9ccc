"""Read the ledger while others write it: short read-only connections, retried while a flush runs."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import duckdb

from runner.errors import LedgerError, SqlError, TransientError
from runner.ledger.ingesting import LEDGER_LOCK, ensure_schema, is_lock_error, reader


def user_query(ledger_path: Path, sql: str) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run a query a user wrote (``agentctl history --sql``): its errors are theirs, said as SQL errors.
    The ledger is opened read-only, so a statement that writes is one of them."""
    try:
        return query(ledger_path, sql, fresh=True)
    except duckdb.Error as exc:
        first, *rest = [line for line in str(exc).splitlines() if line.strip()] or [type(exc).__name__]
        raise SqlError(f"SQL: {first}", details=rest) from None


# Whether this process keeps its read-only connection between reads: only the ledger's one writer may
# (the daemon: it drops it before each flush). Another process keeping one would lock the writer out.
KEEP_READER = False


def query(ledger_path: Path, sql: str, params: list[Any] | None = None, *, timeout: float = 10.0,
          fresh: bool = False) -> tuple[list[str], list[tuple[Any, ...]]]:
    """Run ``sql`` read-only; returns (column names, rows). In the daemon, on its kept read-only connection
    (``ingesting.reader``: opening the ledger costs ten times the query); elsewhere, or with ``fresh`` (a
    query someone wrote gets nothing another read left behind), on one of its own."""
    if not ledger_path.exists():  # no ledger yet: the same tables, empty, and no file made (reads never write)
        with LEDGER_LOCK:
            con = duckdb.connect(":memory:")
            try:
                ensure_schema(con)
                cur = con.execute(sql, params or [])
                return [d[0] for d in cur.description or []], cur.fetchall()
            finally:
                con.close()
    deadline = time.monotonic() + timeout
    delay = 0.01
    while True:
        with LEDGER_LOCK:  # never beside this process's own flush (see ingesting.LEDGER_LOCK)
            try:
                kept = KEEP_READER and not fresh
                con = reader(ledger_path) if kept else duckdb.connect(str(ledger_path), read_only=True)
            except duckdb.IOException as exc:  # another process's flush holds the file for a few milliseconds
                if not is_lock_error(exc):
                    raise LedgerError(f"cannot open the ledger {ledger_path}: {str(exc).splitlines()[0]}") from None
                if time.monotonic() > deadline:
                    raise TransientError(f"the ledger {ledger_path} stays locked: {exc}") from None
            else:
                try:
                    cur = con.execute(sql, params or [])
                    names = [d[0] for d in cur.description or []]
                    return names, cur.fetchall()
                finally:
                    if not kept:
                        con.close()
        time.sleep(delay)
        delay = min(delay * 2, 0.2)


def create_empty(ledger_path: Path) -> None:
    """The ledger file with its tables, when there is none yet (its writer, at start)."""
    if not ledger_path.exists():
        _create_empty(ledger_path)


def _create_empty(ledger_path: Path) -> None:
    ledger_path.parent.mkdir(parents=True, exist_ok=True)
    with LEDGER_LOCK:
        try:
            con = duckdb.connect(str(ledger_path))
        except duckdb.IOException:
            return
        try:
            ensure_schema(con)
        finally:
            con.close()
