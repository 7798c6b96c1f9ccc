"""The state database: one SQLite file, ``$AGENT_ORCH_HOME/state.sqlite``, in WAL mode.

SQLite, unlike DuckDB, lets many processes (daemon, CLI, hooks) write one file safely, and one file
means an apply and its audit record commit in one transaction. This module holds the machinery only:
connections, transactions, the schema's registry. The tables belong to the layers that use them, and each
owner registers its own when it is imported (``register``): the applied state and the spec cache
(``runner.reconcile.applied``, ``runner.reconcile.planning``), the live store and the journal
(``runner.ledger.schema``), the trigger state (``runner.supervise.triggers``), the API tokens
(``runner.tokens``).

A connection has the tables registered when it was opened, and the tables of a module imported later
come with the next connection. So a module that queries a table imports its owner (a module's top-level
imports run before any of its code can query), and a process connects after it imported what it will
query through that connection.
"""

from __future__ import annotations

import os
import sqlite3
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path


def register(ddl: str, migrations: Sequence[tuple[str, str, str]] = (),
             then: Callable[[sqlite3.Connection], None] | None = None) -> None:
    """Add tables to the schema: ``ddl`` (CREATE ... IF NOT EXISTS), then ``migrations``, the columns added
    after a table first shipped, as (table, column, type) that SQLite adds in place, then ``then``, for
    what else a file made by an older version needs. Called once, by the module that owns the tables."""
    _SCHEMA.append(_Part(ddl, tuple(migrations), then))


def connect(path: Path) -> sqlite3.Connection:
    """A connection to the state database, created on first use."""
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, timeout=30, isolation_level=None, check_same_thread=False)
    conn.row_factory = sqlite3.Row
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("PRAGMA busy_timeout=30000")
    try:
        key: tuple[str, int, int] | None = (str(path), *_identity(path))
    except OSError:
        key = None
    # Once per file, process and part of the schema: a connection a request costs no DDL, and a part
    # registered after this process first connected is made by its next connection.
    made = _READY.get(key, 0) if key is not None else 0
    parts = _SCHEMA[made:]
    for part in parts:
        conn.executescript(part.ddl)
        _migrate(conn, part)
    if key is not None and parts:
        _READY[key] = made + len(parts)
    return conn


@dataclass(frozen=True)
class _Part:
    ddl: str
    migrations: tuple[tuple[str, str, str], ...]
    then: Callable[[sqlite3.Connection], None] | None


_SCHEMA: list[_Part] = []  # in the order registered
_READY: dict[tuple[str, int, int], int] = {}  # (path, device, inode) of a state file: the parts this process made


def _identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


def _migrate(conn: sqlite3.Connection, part: _Part) -> None:
    for table, column, kind in part.migrations:
        have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
    if part.then is not None:
        part.then(conn)


class PerThread:
    """A connection to the state database for each thread that asks (a connection is not shared by threads)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._local = threading.local()

    def get(self) -> sqlite3.Connection:
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        if conn is None:
            conn = self._local.conn = connect(self.path)
        return conn


class Transaction:
    """``with Transaction(conn):`` BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")
