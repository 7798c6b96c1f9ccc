"""The ledger's tables. Column names are part of the outside interface (users query them).

The archive's are DuckDB's (``runs.duckdb``); the live store's are in the state database
(``state.sqlite``): ``run_progress``, a row per run queued or running (until its final row is archived),
and the ``journal`` of rows not archived yet, which ``journal`` queues and ``ingesting.flush`` moves.
"""

from __future__ import annotations

import json
import sqlite3
from typing import Any

from runner.state import register

# Each table has a primary key so ingesting the same journal row twice (after a crash between the
# DuckDB commit and the journal delete) replaces instead of duplicating. A column added after a table
# first shipped is in its CREATE and in an ALTER ... IF NOT EXISTS after it (ensure_schema runs both), so
# ledgers made before it get it too; the column parsers below read the CREATE only.
TABLES: dict[str, str] = {
    "runs": """
        CREATE TABLE IF NOT EXISTS runs (
            run_id VARCHAR PRIMARY KEY,
            client_id VARCHAR NOT NULL,
            agent VARCHAR NOT NULL,
            spec_revision VARCHAR,
            trigger VARCHAR,
            status VARCHAR NOT NULL,
            queued_at TIMESTAMP,
            started_at TIMESTAMP,
            ended_at TIMESTAMP,
            input_tokens BIGINT DEFAULT 0,
            output_tokens BIGINT DEFAULT 0,
            model_calls INTEGER DEFAULT 0,
            tool_calls INTEGER DEFAULT 0,
            error VARCHAR,
            input VARCHAR,
            output VARCHAR,
            requested_by VARCHAR,
            pid INTEGER,
            retry_of VARCHAR,
            attempt INTEGER DEFAULT 1,
            denied INTEGER DEFAULT 0,
            tool_errors INTEGER DEFAULT 0,
            cpu_seconds DOUBLE,
            max_rss_mb DOUBLE,
            bytes_written BIGINT,
            node VARCHAR,
            workflow_run_id VARCHAR,
            step VARCHAR,
            parent_run_id VARCHAR,
            trigger_run_id VARCHAR,
            chain_depth INTEGER DEFAULT 0
        );
        ALTER TABLE runs ADD COLUMN IF NOT EXISTS retry_of VARCHAR;
        ALTER TABLE runs ADD COLUMN IF NOT EXISTS attempt INTEGER DEFAULT 1;
        ALTER TABLE runs ADD COLUMN IF NOT EXISTS denied INTEGER DEFAULT 0;
        ALTER TABLE runs ADD COLUMN IF NOT EXISTS tool_errors INTEGER DEFAULT 0;
        ALTER TABLE runs ADD COLUMN IF NOT EXISTS cpu_seconds DOUBLE;
        ALTER TABLE runs ADD COLUMN IF NOT EXISTS max_rss_mb DOUBLE;
        ALTER TABLE runs ADD COLUMN IF NOT EXISTS bytes_written BIGINT;
        ALTER TABLE runs ADD COLUMN IF NOT EXISTS node VARCHAR;
        ALTER TABLE runs ADD COLUMN IF NOT EXISTS workflow_run_id VARCHAR;
        ALTER TABLE runs ADD COLUMN IF NOT EXISTS step VARCHAR;
        ALTER TABLE runs ADD COLUMN IF NOT EXISTS parent_run_id VARCHAR;
        ALTER TABLE runs ADD COLUMN IF NOT EXISTS trigger_run_id VARCHAR;
        ALTER TABLE runs ADD COLUMN IF NOT EXISTS chain_depth INTEGER DEFAULT 0""",
    "run_events": """
        CREATE TABLE IF NOT EXISTS run_events (
            run_id VARCHAR NOT NULL,
            seq INTEGER NOT NULL,
            ts TIMESTAMP NOT NULL,
            kind VARCHAR NOT NULL,
            name VARCHAR,
            decision VARCHAR,
            detail JSON,
            PRIMARY KEY (run_id, seq)
        )""",
    "reconciles": """
        CREATE TABLE IF NOT EXISTS reconciles (
            reconcile_id VARCHAR PRIMARY KEY,
            client_id VARCHAR NOT NULL,
            revision VARCHAR,
            started_at TIMESTAMP,
            ended_at TIMESTAMP,
            created INTEGER,
            updated INTEGER,
            deleted INTEGER,
            invalid INTEGER,
            initiator VARCHAR,
            error VARCHAR
        )""",
    "workflow_runs": """
        CREATE TABLE IF NOT EXISTS workflow_runs (
            workflow_run_id VARCHAR PRIMARY KEY,
            client_id VARCHAR NOT NULL,
            workflow VARCHAR NOT NULL,
            spec_revision VARCHAR,
            trigger VARCHAR,
            status VARCHAR NOT NULL,
            attempt INTEGER DEFAULT 1,
            started_at TIMESTAMP,
            ended_at TIMESTAMP,
            input_tokens BIGINT DEFAULT 0,
            output_tokens BIGINT DEFAULT 0,
            error VARCHAR,
            trigger_run_id VARCHAR,
            chain_depth INTEGER DEFAULT 0
        );
        ALTER TABLE workflow_runs ADD COLUMN IF NOT EXISTS trigger_run_id VARCHAR;
        ALTER TABLE workflow_runs ADD COLUMN IF NOT EXISTS chain_depth INTEGER DEFAULT 0""",
    "approvals": """
        CREATE TABLE IF NOT EXISTS approvals (
            approval_id VARCHAR PRIMARY KEY,
            workflow_run_id VARCHAR NOT NULL,
            step VARCHAR NOT NULL,
            approved BOOLEAN NOT NULL,
            "by" VARCHAR,
            "at" TIMESTAMP NOT NULL,
            comment VARCHAR
        )""",
    "deliveries": """
        CREATE TABLE IF NOT EXISTS deliveries (
            delivery_id VARCHAR PRIMARY KEY,
            client_id VARCHAR NOT NULL,
            trigger VARCHAR NOT NULL,
            received_at TIMESTAMP NOT NULL,
            dedupe_key VARCHAR,
            decision VARCHAR NOT NULL,
            reason VARCHAR,
            run_id VARCHAR,
            workflow_run_id VARCHAR
        )""",
    "audit": """
        CREATE TABLE IF NOT EXISTS audit (
            audit_id VARCHAR PRIMARY KEY,
            client_id VARCHAR NOT NULL,
            ts TIMESTAMP NOT NULL,
            actor VARCHAR,
            action VARCHAR NOT NULL,
            target VARCHAR,
            outcome VARCHAR,
            detail JSON
        )""",
}


def columns(table: str) -> list[str]:
    """Column names of ``table`` in order, read from its DDL."""
    body = TABLES[table].split("(", 1)[1]
    names = []
    for line in body.splitlines():
        word = line.strip().split(" ", 1)[0].strip('"')  # "by", "at": keywords of SQL, quoted
        if word and word.islower() and not line.strip().startswith("PRIMARY"):
            names.append(word)
    return names


def column_types(table: str) -> dict[str, str]:
    """Column name to DuckDB type, read from the DDL (JSON columns are read as text, then cast)."""
    body = TABLES[table].split("(", 1)[1]
    out = {}
    for line in body.splitlines():
        parts = line.strip().rstrip(",").split()
        if len(parts) >= 2 and parts[0].islower() and parts[0] != "primary":
            out[parts[0].strip('"')] = "VARCHAR" if parts[1] == "JSON" else parts[1]
    return out


# -- the live store, in the state database ----------------------------------------------------------

def journal(conn: sqlite3.Connection, table: str, row: dict[str, Any]) -> None:
    """Queue a ledger row; the ledger ingests it into DuckDB (see runner.ledger.ingesting)."""
    conn.execute("INSERT INTO journal (tbl, row, run_id) VALUES (?, ?, ?)",
                 (table, json.dumps(row, default=str), row.get("run_id") if table in ("runs", "run_events") else None))


def _index_journal(conn: sqlite3.Connection) -> None:
    conn.execute("CREATE INDEX IF NOT EXISTS journal_by_run ON journal (run_id) WHERE run_id IS NOT NULL")


register("""
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
CREATE TABLE IF NOT EXISTS journal (        -- ledger rows not archived yet (runner.ledger.ingesting)
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    tbl TEXT NOT NULL,
    row TEXT NOT NULL,
    run_id TEXT                     -- the run a runs or run_events row belongs to: its live events are read by it
);
""", migrations=[("run_progress", "launcher_pid", "INTEGER"), ("run_progress", "row", "TEXT"),
                  ("run_progress", "retry_of", "TEXT"), ("journal", "run_id", "TEXT"),
                  ("run_progress", "executor", "TEXT")], then=_index_journal)
