"""The state database: one SQLite file, ``$AGENT_ORCH_HOME/state.sqlite``, in WAL mode.

It holds what this machine has applied (agents and their conditions), the spec validation cache,
and the ledger journal: audit rows waiting to be ingested into DuckDB. Keeping the journal here
means an apply and its audit record commit in one transaction, and SQLite, unlike DuckDB, lets many
processes (daemon, CLI, hooks) write one file safely.
"""

from __future__ import annotations

import json
import os
import sqlite3
from collections.abc import Iterator, MutableMapping
from pathlib import Path
from typing import Any

SCHEMA = """
CREATE TABLE IF NOT EXISTS agents (
    client_id TEXT NOT NULL,
    name TEXT NOT NULL,
    path TEXT,                      -- file in the source folder that defines it
    blob TEXT,                      -- git blob id of that file when last validated
    spec TEXT,                      -- applied spec (JSON); NULL while it was never valid
    generation INTEGER NOT NULL DEFAULT 0,
    applied_revision TEXT,          -- commit its applied spec came from
    attempted_revision TEXT,        -- last commit reconciled
    fingerprint TEXT,               -- validation context when last validated
    conditions TEXT NOT NULL DEFAULT '[]',
    suspended INTEGER NOT NULL DEFAULT 0,
    updated_at TEXT,
    PRIMARY KEY (client_id, name)
);
CREATE TABLE IF NOT EXISTS sources (
    client_id TEXT PRIMARY KEY,
    location TEXT,
    revision TEXT,                  -- last revision reconciled
    reconciled_at TEXT,
    error TEXT,                     -- last failure to read the source, NULL when fine
    invalid TEXT                    -- JSON: broken files that name no agent (nothing to mark Invalid)
);
CREATE TABLE IF NOT EXISTS trigger_state (   -- the last schedule slot fired, so a restart never fires it twice
    client_id TEXT NOT NULL,
    agent TEXT NOT NULL,
    trigger_key TEXT NOT NULL,
    last_slot TEXT NOT NULL,
    PRIMARY KEY (client_id, agent, trigger_key)
);
CREATE TABLE IF NOT EXISTS applied_changes ( -- bumped with every change to a client's applied agents (any process)
    client_id TEXT PRIMARY KEY,
    generation INTEGER NOT NULL DEFAULT 0,   -- the daemon re-arms its triggers when it moves
    changed_at TEXT
);
CREATE TABLE IF NOT EXISTS spec_cache (key TEXT PRIMARY KEY, entry TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS run_progress (   -- runs in flight (and just ended), shared by launcher and run
    run_id TEXT PRIMARY KEY,
    client_id TEXT NOT NULL,
    agent TEXT NOT NULL,
    pid INTEGER,
    seq INTEGER NOT NULL DEFAULT 0,      -- last run_events.seq handed out
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    model_calls INTEGER NOT NULL DEFAULT 0,
    tool_calls INTEGER NOT NULL DEFAULT 0,
    status TEXT NOT NULL,
    stop_requested INTEGER NOT NULL DEFAULT 0,
    started_at TEXT,
    updated_at TEXT
);
CREATE INDEX IF NOT EXISTS run_progress_by_client ON run_progress (client_id, run_id);
CREATE INDEX IF NOT EXISTS run_progress_by_agent ON run_progress (client_id, agent, run_id);
CREATE TABLE IF NOT EXISTS tokens (         -- API tokens, by SHA-256 of the token (runner.api.tokens)
    hash TEXT PRIMARY KEY,
    client_id TEXT NOT NULL,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    created_at TEXT NOT NULL,       -- UTC, ISO 8601 with Z (tokens of older homes: without the Z)
    id TEXT,                        -- what users name a token by (list, revoke): never the token or its hash
    expires_at TEXT,                -- UTC, ISO 8601 with Z; NULL: never
    last_used_at TEXT               -- UTC, ISO 8601 with Z, to the minute or so (runner.api.tokens.lookup)
);
CREATE TABLE IF NOT EXISTS journal (        -- ledger rows not archived yet (runner.ledger.ingesting)
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tbl TEXT NOT NULL,
    row TEXT NOT NULL,
    run_id TEXT                     -- the run a runs or run_events row belongs to: its live events are read by it
);
"""


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
    if key is None or key not in _READY:  # once per file and process: a connection a request costs no DDL
        conn.executescript(SCHEMA)
        _migrate(conn)
        if key is not None:
            _READY.add(key)
    return conn


_READY: set[tuple[str, int, int]] = set()  # (path, device, inode) of state files whose schema this process made


def _identity(path: Path) -> tuple[int, int]:
    st = os.stat(path)
    return st.st_dev, st.st_ino


# Columns added after a table first shipped: (table, column, type). SQLite adds them in place.
MIGRATIONS = [("sources", "invalid", "TEXT"), ("run_progress", "launcher_pid", "INTEGER"),
              ("run_progress", "row", "TEXT"), ("tokens", "id", "TEXT"), ("tokens", "expires_at", "TEXT"),
              ("tokens", "last_used_at", "TEXT"), ("run_progress", "retry_of", "TEXT"),
              ("journal", "run_id", "TEXT")]


def _migrate(conn: sqlite3.Connection) -> None:
    for table, column, kind in MIGRATIONS:
        have = {r[1] for r in conn.execute(f"PRAGMA table_info({table})")}
        if column not in have:
            conn.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
    # Tokens made before they had an id get one, random like a new token's, so they too can be listed and
    # revoked. Checked first: an UPDATE, even of no row, would take the write lock at every connect.
    if conn.execute("SELECT 1 FROM tokens WHERE id IS NULL LIMIT 1").fetchone():
        conn.execute("UPDATE tokens SET id = 'tok_' || lower(hex(randomblob(8))) WHERE id IS NULL")
    conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS tokens_by_id ON tokens (id)")
    conn.execute("CREATE INDEX IF NOT EXISTS journal_by_run ON journal (run_id) WHERE run_id IS NOT NULL")


class Transaction:
    """``with Transaction(conn):`` BEGIN IMMEDIATE ... COMMIT, or ROLLBACK on error."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn

    def __enter__(self) -> sqlite3.Connection:
        self.conn.execute("BEGIN IMMEDIATE")
        return self.conn

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self.conn.execute("COMMIT" if exc_type is None else "ROLLBACK")


def journal(conn: sqlite3.Connection, table: str, row: dict[str, Any]) -> None:
    """Queue a ledger row; the ledger ingests it into DuckDB (see runner.ledger.ingesting)."""
    conn.execute("INSERT INTO journal (tbl, row, run_id) VALUES (?, ?, ?)",
                 (table, json.dumps(row, default=str), row.get("run_id") if table in ("runs", "run_events") else None))


class SpecCache(MutableMapping[str, dict[str, Any]]):
    """Validation results by (blob, path, context) key; writes are batched until ``save()``."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.conn = conn
        self.pending: dict[str, dict[str, Any]] = {}

    def __getitem__(self, key: str) -> dict[str, Any]:
        if key in self.pending:
            return self.pending[key]
        row = self.conn.execute("SELECT entry FROM spec_cache WHERE key = ?", (key,)).fetchone()
        if row is None:
            raise KeyError(key)
        return dict(json.loads(row[0]))

    def __contains__(self, key: object) -> bool:
        try:
            self[str(key)]
            return True
        except KeyError:
            return False

    def __setitem__(self, key: str, value: dict[str, Any]) -> None:
        self.pending[key] = value

    def __delitem__(self, key: str) -> None:
        self.pending.pop(key, None)
        self.conn.execute("DELETE FROM spec_cache WHERE key = ?", (key,))

    def __iter__(self) -> Iterator[str]:
        raise NotImplementedError("the spec cache is looked up by key only")

    def __len__(self) -> int:
        return int(self.conn.execute("SELECT count(*) FROM spec_cache").fetchone()[0]) + len(self.pending)

    def save(self) -> None:
        if not self.pending:
            return
        with Transaction(self.conn) as c:
            c.executemany("INSERT OR REPLACE INTO spec_cache (key, entry) VALUES (?, ?)",
                          [(k, json.dumps(v)) for k, v in self.pending.items()])
        self.pending.clear()
