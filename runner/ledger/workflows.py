"""Workflow runs in the live store (``state.sqlite``), and their rows for the ledger.

Three live tables hold everything a workflow run is: ``wf_runs`` (one per run: its spec as it started, its
inputs, status, deadline, token totals), ``wf_steps`` (one per step: its state) and ``wf_items`` (one per
run a step makes: one for a plain step, one per item of a fan-out, with the run's id, status and answer).
The engine (``runner.supervise.workflows``) is their one writer; anyone may read them (``agentctl workflow
status`` works without a daemon). Each change of a run's status, and each approval, is journaled into the
ledger's ``workflow_runs`` and ``approvals`` tables, as runs are.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from datetime import UTC, datetime
from typing import Any

from runner.ledger.schema import journal
from runner.state import register
from runner.times import stamp

register("""
CREATE TABLE IF NOT EXISTS wf_runs (
    workflow_run_id TEXT PRIMARY KEY,
    client_id TEXT NOT NULL,
    workflow TEXT NOT NULL,
    spec_revision TEXT,
    spec TEXT NOT NULL,              -- the workflow's spec as this attempt runs it (JSON)
    trigger TEXT,
    requested_by TEXT,
    status TEXT NOT NULL,            -- running, then succeeded, failed, timed_out, budget_exceeded, stopped
    closing TEXT,                    -- the end decided while runs still finish (failed, timed_out, ...)
    attempt INTEGER NOT NULL DEFAULT 1,
    inputs TEXT NOT NULL DEFAULT '{}',
    started_at TEXT,
    ended_at TEXT,
    deadline REAL,                   -- epoch seconds, from constraints.max_runtime
    input_tokens INTEGER NOT NULL DEFAULT 0,
    output_tokens INTEGER NOT NULL DEFAULT 0,
    budget_base INTEGER NOT NULL DEFAULT 0,  -- tokens spent before this attempt (a resume's budget starts anew)
    error TEXT
);
CREATE INDEX IF NOT EXISTS wf_runs_by_client ON wf_runs (client_id, workflow_run_id);
CREATE TABLE IF NOT EXISTS wf_steps (
    workflow_run_id TEXT NOT NULL,
    step TEXT NOT NULL,
    position INTEGER NOT NULL,       -- its place in the spec
    status TEXT NOT NULL,            -- pending, running, waiting, then a run state or skipped
    started_at TEXT,
    ended_at TEXT,
    wait_until REAL,                 -- an approval's timeout, epoch seconds
    message TEXT,                    -- what an approval asks the person (its message, rendered)
    error TEXT,
    PRIMARY KEY (workflow_run_id, step)
);
CREATE TABLE IF NOT EXISTS wf_items (
    workflow_run_id TEXT NOT NULL,
    step TEXT NOT NULL,
    idx INTEGER NOT NULL,            -- 0 for a plain step; the item's place in a fan-out
    item TEXT,                       -- the for_each item (JSON)
    input TEXT,                      -- the rendered input
    status TEXT NOT NULL,            -- pending, running, then a run state or skipped
    run_id TEXT,
    attempt INTEGER NOT NULL DEFAULT 1,
    retry_of TEXT,
    not_before REAL NOT NULL DEFAULT 0,  -- a retry's backoff, epoch seconds
    reserved INTEGER NOT NULL DEFAULT 0, -- tokens held for it while it runs (the workflow's max_tokens)
    tokens INTEGER NOT NULL DEFAULT 0,
    output TEXT,
    error TEXT,
    started_at TEXT,
    ended_at TEXT,
    PRIMARY KEY (workflow_run_id, step, idx)
);
CREATE INDEX IF NOT EXISTS wf_items_by_run ON wf_items (run_id);
CREATE TABLE IF NOT EXISTS wf_approvals (
    workflow_run_id TEXT NOT NULL,
    step TEXT NOT NULL,
    approved INTEGER NOT NULL,
    by TEXT,
    at TEXT NOT NULL,
    comment TEXT
);
""", migrations=[("wf_steps", "message", "TEXT"), ("wf_runs", "event", "TEXT"), ("wf_runs", "trigger_run_id", "TEXT"),
                  ("wf_runs", "chain_depth", "INTEGER NOT NULL DEFAULT 0")])

RUN_COLUMNS = ("workflow_run_id", "client_id", "workflow", "spec_revision", "trigger", "status", "attempt",
               "started_at", "ended_at", "input_tokens", "output_tokens", "error", "trigger_run_id", "chain_depth")
TERMINAL = ("succeeded", "failed", "timed_out", "budget_exceeded", "stopped", "interrupted", "skipped")


def journal_run(tx: sqlite3.Connection, row: sqlite3.Row | dict[str, Any]) -> None:
    """The run's row into the ledger's ``workflow_runs`` (inside the caller's transaction)."""
    journal(tx, "workflow_runs", {k: row[k] for k in RUN_COLUMNS})


def journal_approval(tx: sqlite3.Connection, approval: dict[str, Any]) -> None:
    tx.execute("INSERT INTO wf_approvals (workflow_run_id, step, approved, by, at, comment) VALUES (?, ?, ?, ?, ?, ?)",
               (approval["workflow_run_id"], approval["step"], int(approval["approved"]), approval["by"],
                approval["at"], approval["comment"]))
    journal(tx, "approvals", {"approval_id": uuid.uuid4().hex, **approval})


# -- what the engine reads of a run -----------------------------------------------------------------------


def run_row(conn: sqlite3.Connection, wf_id: str) -> sqlite3.Row:
    row: sqlite3.Row = conn.execute("SELECT * FROM wf_runs WHERE workflow_run_id = ?", (wf_id,)).fetchone()
    return row


def step_states(conn: sqlite3.Connection, wf_id: str) -> dict[str, dict[str, Any]]:
    return {r[0]: {"status": r[1], "wait_until": r[2]} for r in conn.execute(
        "SELECT step, status, wait_until FROM wf_steps WHERE workflow_run_id = ?", (wf_id,))}


def closing_of(conn: sqlite3.Connection, wf_id: str) -> str | None:
    """The end decided for a run while its runs in flight finish, or None."""
    row = conn.execute("SELECT closing FROM wf_runs WHERE workflow_run_id = ?", (wf_id,)).fetchone()
    return row[0] if row is not None else None


def in_flight(conn: sqlite3.Connection, wf_id: str) -> list[str]:
    return [r[0] for r in conn.execute("SELECT run_id FROM wf_items WHERE workflow_run_id = ? AND status = 'running'",
                                       (wf_id,))]


def workflow_output(conn: sqlite3.Connection, wf_id: str) -> str | None:
    """What a workflow run gave: the answers of its last step (in spec order) that succeeded."""
    row = conn.execute("SELECT step FROM wf_steps WHERE workflow_run_id = ? AND status = 'succeeded' "
                       "ORDER BY position DESC LIMIT 1", (wf_id,)).fetchone()
    if row is None:
        return None
    answers = [out for _, status, out in outputs_of(conn, wf_id, row[0]) if status == "succeeded" and out]
    return "\n".join(answers) if answers else None


def outputs_of(conn: sqlite3.Connection, wf_id: str, step_id: str) -> list[tuple[int, str, str | None]]:
    """A step's runs as an expression reads them: (index, status, answer), in item order."""
    return [(r[0], r[1], r[2]) for r in conn.execute(
        "SELECT idx, status, output FROM wf_items WHERE workflow_run_id = ? AND step = ? ORDER BY idx",
        (wf_id, step_id))]


def approvals_of(conn: sqlite3.Connection, wf_id: str) -> dict[str, dict[str, Any]]:
    """Each step's last decision."""
    return {r["step"]: {"approved": bool(r["approved"]), "by": r["by"], "comment": r["comment"]}
            for r in conn.execute("SELECT * FROM wf_approvals WHERE workflow_run_id = ? ORDER BY at", (wf_id,))}


def list_workflow_runs(conn: sqlite3.Connection, client_id: str, *, workflow: str | None = None,
                       status: str | None = None, limit: int = 100) -> list[dict[str, Any]]:
    """The client's workflow runs, newest first."""
    sql = "SELECT * FROM wf_runs WHERE client_id = ?"
    args: list[Any] = [client_id]
    if workflow:
        sql += " AND workflow = ?"
        args.append(workflow)
    if status:
        sql += " AND status = ?"
        args.append(status)
    sql += " ORDER BY started_at DESC, workflow_run_id DESC LIMIT ?"
    args.append(max(1, min(int(limit), 10_000)))
    return [_run(r) for r in conn.execute(sql, args)]


def get_workflow_run(conn: sqlite3.Connection, client_id: str, workflow_run_id: str) -> dict[str, Any] | None:
    """One workflow run with its steps (in spec order, each with its runs) and approvals; None if not the
    client's."""
    row = conn.execute("SELECT * FROM wf_runs WHERE workflow_run_id = ? AND client_id = ?",
                       (workflow_run_id, client_id)).fetchone()
    if row is None:
        return None
    spec = json.loads(row["spec"])
    by_id = {s["id"]: s for s in spec.get("steps", [])}
    items: dict[str, list[dict[str, Any]]] = {}
    for i in conn.execute("SELECT * FROM wf_items WHERE workflow_run_id = ? ORDER BY step, idx", (workflow_run_id,)):
        items.setdefault(i["step"], []).append({
            "index": i["idx"], "item": json.loads(i["item"]) if i["item"] is not None else None,
            "run_id": i["run_id"], "status": i["status"], "attempt": i["attempt"], "tokens": i["tokens"],
            "started_at": i["started_at"], "ended_at": i["ended_at"], "error": i["error"]})
    steps = []
    for s in conn.execute("SELECT * FROM wf_steps WHERE workflow_run_id = ? ORDER BY position", (workflow_run_id,)):
        declared = by_id.get(s["step"], {})
        steps.append({"step": s["step"], "agent": declared.get("agent"), "needs": declared.get("needs", []),
                      "approval": declared.get("approval") is not None, "status": s["status"],
                      "runs": items.get(s["step"], []), "started_at": s["started_at"], "ended_at": s["ended_at"],
                      "error": s["error"], "message": s["message"]})
    approvals = [{"step": a["step"], "approved": bool(a["approved"]), "by": a["by"], "at": a["at"],
                  "comment": a["comment"]}
                 for a in conn.execute("SELECT * FROM wf_approvals WHERE workflow_run_id = ? ORDER BY at",
                                       (workflow_run_id,))]
    return {**_run(row), "steps": steps, "approvals": approvals}


def _run(row: sqlite3.Row) -> dict[str, Any]:
    deadline = row["deadline"]
    return {**{k: row[k] for k in RUN_COLUMNS}, "requested_by": row["requested_by"],
            "closing": row["closing"],  # the end decided while runs in flight finish (None: none yet)
            "inputs": json.loads(row["inputs"] or "{}"),
            "deadline": stamp(datetime.fromtimestamp(deadline, UTC)) if deadline else None}
