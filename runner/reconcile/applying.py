"""Write a plan into the applied state, with its ledger record, in one transaction.

One bad spec never blocks the others: valid changes apply; an invalid agent keeps its last good
spec and gets ``Synced=False`` with the problems as its message. Either the whole plan and its
reconcile record commit, or nothing does; a plan that changes anything also bumps the client's
generation of applied agents in that transaction, which is how a running daemon learns of an apply
made by any process (it re-arms its triggers within a fraction of a second).
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from dataclasses import dataclass
from typing import Any

from runner.ledger.schema import journal
from runner.reconcile.applied import bump_generation, now
from runner.reconcile.planning import Change, Plan
from runner.specs.problems import errors_in
from runner.state import Transaction


@dataclass
class Outcome:
    reconcile_id: str
    revision: str
    created: int
    updated: int
    deleted: int
    invalid: int

    def as_json(self) -> dict[str, Any]:
        return self.__dict__.copy()


def apply_plan(conn: sqlite3.Connection, plan: Plan, *, initiator: str, started_at: str) -> Outcome:
    rev = plan.revision
    stamp = now()
    unnamed = [c for c in plan.changes if c.action == "invalid" and c.result is not None and c.result.name is None
               and c.name not in plan.applied]
    with Transaction(conn) as tx:
        for change in plan.changes:
            if change not in unnamed:
                _apply(tx, plan, change, stamp)
        _refresh_unchanged(tx, plan)
        if plan.changes:
            bump_generation(tx, plan.client_id)
        tx.execute("UPDATE agents SET attempted_revision = ? WHERE client_id = ?", (rev, plan.client_id))
        invalid_files = [{"file": c.name, "problems": [str(p) for p in errors_in(c.problems)[:5]]} for c in unnamed]
        tx.execute(
            "INSERT OR REPLACE INTO sources (client_id, location, revision, reconciled_at, error, invalid) "
            "VALUES (?, ?, ?, ?, NULL, ?)", (plan.client_id, plan.location, rev, stamp, json.dumps(invalid_files)))
        outcome = Outcome(uuid.uuid4().hex, rev, plan.count("create"), plan.count("update"),
                          plan.count("delete"), plan.count("invalid"))
        journal(tx, "reconciles", {
            "reconcile_id": outcome.reconcile_id, "client_id": plan.client_id, "revision": rev,
            "started_at": started_at, "ended_at": now(), "created": outcome.created,
            "updated": outcome.updated, "deleted": outcome.deleted, "invalid": outcome.invalid,
            "initiator": initiator, "error": None,
        })
    return outcome


def record_failure(conn: sqlite3.Connection, client_id: str, location: str, error: str, *, initiator: str,
                   started_at: str) -> None:
    """A source that cannot be read changes nothing but is still on record."""
    with Transaction(conn) as tx:
        tx.execute("INSERT INTO sources (client_id, location, error) VALUES (?, ?, ?) "
                   "ON CONFLICT(client_id) DO UPDATE SET error = excluded.error, location = excluded.location",
                   (client_id, location, error))
        journal(tx, "reconciles", {
            "reconcile_id": uuid.uuid4().hex, "client_id": client_id, "revision": None,
            "started_at": started_at, "ended_at": now(), "created": 0, "updated": 0, "deleted": 0,
            "invalid": 0, "initiator": initiator, "error": error,
        })


def _refresh_unchanged(tx: sqlite3.Connection, plan: Plan) -> None:
    """Record where unchanged agents live now (a renamed file, a new blob with the same spec).

    Not a change (no new generation), but a stale path would let a later broken file at the old path
    be taken for this agent, and a stale blob keeps the agent from being skipped as known-good.
    """
    changed = {c.name for c in plan.changes}
    for r in plan.results:
        if r.name and r.name not in changed and r.valid and not r.known_good:
            tx.execute("UPDATE agents SET path = ?, blob = ?, fingerprint = ? "
                       "WHERE client_id = ? AND name = ? AND spec IS NOT NULL",
                       (r.rel_path, r.blob, plan.fingerprint, plan.client_id, r.name))


def _apply(tx: sqlite3.Connection, plan: Plan, change: Change, stamp: str) -> None:
    key = (plan.client_id, change.name)
    r = change.result
    if change.action == "delete":
        # The daemon's trigger state for it goes with it, in this transaction (a trigger in SQLite that
        # runner.supervise.triggers, the table's owner, makes).
        tx.execute("DELETE FROM agents WHERE client_id = ? AND name = ?", key)
        return
    if change.action in ("create", "update") and r is not None and r.spec is not None:
        ready = _condition("Ready", True, "Applied", f"generation applied from {plan.revision[:12]}", stamp)
        synced = _condition("Synced", True, "Applied", "", stamp)
        tx.execute(
            """INSERT INTO agents (client_id, name, path, blob, spec, generation, applied_revision,
                   attempted_revision, fingerprint, conditions, updated_at, kind)
               VALUES (?, ?, ?, ?, ?, 1, ?, ?, ?, ?, ?, ?)
               ON CONFLICT(client_id, name) DO UPDATE SET path = excluded.path, blob = excluded.blob,
                   kind = excluded.kind, spec = excluded.spec, generation = agents.generation + 1,
                   applied_revision = excluded.applied_revision, attempted_revision = excluded.attempted_revision,
                   fingerprint = excluded.fingerprint, conditions = excluded.conditions,
                   updated_at = excluded.updated_at""",
            (*key, r.rel_path, r.blob, r.spec.model_dump_json(by_alias=True), plan.revision, plan.revision,
             plan.fingerprint, json.dumps([ready, synced]), stamp, r.kind))
        return
    # invalid: keep the last good spec (if any); say why it is not what the source says
    problems = errors_in(change.problems)
    message = "; ".join(str(p) for p in problems[:5]) + (f" (+{len(problems) - 5} more)" if len(problems) > 5 else "")
    existing = tx.execute("SELECT spec FROM agents WHERE client_id = ? AND name = ?", key).fetchone()
    has_spec = existing is not None and existing[0] is not None
    ready = (_condition("Ready", True, "LastGoodSpec", "running its last valid spec", stamp) if has_spec
             else _condition("Ready", False, "NeverValid", "no valid spec applied yet", stamp))
    synced = _condition("Synced", False, "Invalid", message, stamp)
    tx.execute(
        """INSERT INTO agents (client_id, name, path, blob, attempted_revision, conditions, updated_at, kind)
           VALUES (?, ?, ?, ?, ?, ?, ?, ?)
           ON CONFLICT(client_id, name) DO UPDATE SET conditions = excluded.conditions,
               blob = NULL, attempted_revision = excluded.attempted_revision, updated_at = excluded.updated_at""",
        (*key, r.rel_path if r else None, None, plan.revision, json.dumps([ready, synced]), stamp,
         r.kind if r else "agent"))


def _condition(kind: str, status: bool, reason: str, message: str, stamp: str) -> dict[str, Any]:
    return {"type": kind, "status": "True" if status else "False", "reason": reason, "message": message,
            "since": stamp}
