"""Deliveries: every event that may start a run (a webhook's POST, a watched run's end), in the live store.

A delivery is written before anything else is done with its event (``accept``): its run id is chosen then, so
a daemon that dies before starting the run starts it at its next start (``pending``), under the same id, and
never twice. Its decision then becomes ``started`` or ``rejected`` (``decide``). A redelivery of an event
already seen (the same trigger and dedupe key) is a row of its own, ``duplicate``, pointing at the first.
Each change is journaled into the ledger's ``deliveries`` table. The event itself (payload and the headers
worth keeping) stays in the live row only, for a replay.
"""

from __future__ import annotations

import json
import sqlite3
import uuid
from dataclasses import dataclass
from typing import Any

from runner.ledger.schema import journal
from runner.state import Transaction, register

register("""
CREATE TABLE IF NOT EXISTS deliveries (
    delivery_id TEXT PRIMARY KEY,
    client_id TEXT NOT NULL,
    trigger TEXT NOT NULL,             -- webhook:NAME or run_completed:NAME (the agent or workflow it starts)
    target TEXT NOT NULL,              -- that agent or workflow
    kind TEXT NOT NULL,                -- agent or workflow
    received_at TEXT NOT NULL,
    dedupe_key TEXT,
    decision TEXT NOT NULL,            -- accepted (its run not started yet), started, duplicate, rejected
    reason TEXT,
    run_id TEXT,                       -- chosen at acceptance: the run, or the workflow run, it starts
    event TEXT NOT NULL DEFAULT '{}'   -- what a replay needs: payload, headers, input, links (JSON)
);
CREATE INDEX IF NOT EXISTS deliveries_by_client ON deliveries (client_id, received_at, delivery_id);
CREATE UNIQUE INDEX IF NOT EXISTS deliveries_once ON deliveries (client_id, trigger, dedupe_key)
    WHERE dedupe_key IS NOT NULL AND decision != 'duplicate';
""")

MAX_REASON = 2000


@dataclass
class Delivery:
    delivery_id: str
    client_id: str
    trigger: str
    target: str
    kind: str
    received_at: str
    dedupe_key: str | None
    decision: str
    reason: str | None
    run_id: str | None
    event: dict[str, Any]

    @classmethod
    def of(cls, row: sqlite3.Row) -> Delivery:
        return cls(row["delivery_id"], row["client_id"], row["trigger"], row["target"], row["kind"],
                   row["received_at"], row["dedupe_key"], row["decision"], row["reason"], row["run_id"],
                   json.loads(row["event"] or "{}"))

    def as_ledger(self) -> dict[str, Any]:
        workflow = self.kind == "workflow"
        return {"delivery_id": self.delivery_id, "client_id": self.client_id, "trigger": self.trigger,
                "received_at": self.received_at, "dedupe_key": self.dedupe_key, "decision": self.decision,
                "reason": self.reason, "run_id": None if workflow else self.run_id,
                "workflow_run_id": self.run_id if workflow else None}

    def as_json(self) -> dict[str, Any]:
        """What the API and `agentctl deliveries list` show (the event's payload is not listed)."""
        return {**self.as_ledger(), "target": self.target, "kind": self.kind}


def new_delivery_id() -> str:
    return "dlv_" + uuid.uuid4().hex[:20]


def accept(conn: sqlite3.Connection, delivery: Delivery) -> Delivery:
    """Write ``delivery`` as accepted, durably; or, when its dedupe key was seen for its trigger, write it as a
    duplicate and return the first delivery (whose run the caller answers with)."""
    with Transaction(conn) as tx:
        if delivery.dedupe_key is not None:
            first = tx.execute("SELECT * FROM deliveries WHERE client_id = ? AND trigger = ? AND dedupe_key = ? "
                               "AND decision != 'duplicate'",
                               (delivery.client_id, delivery.trigger, delivery.dedupe_key)).fetchone()
            if first is not None:
                delivery.decision, delivery.run_id = "duplicate", first["run_id"]
                delivery.reason = f"a redelivery of {first['delivery_id']}"
                delivery.event = {}
                _write(tx, delivery)
                return Delivery.of(first)
        _write(tx, delivery)
    return delivery


def decide(conn: sqlite3.Connection, delivery: Delivery, decision: str, reason: str | None = None) -> None:
    delivery.decision = decision
    if reason:  # a replay's reason says what it replays: what befell it is added, not put instead
        delivery.reason = (f"{delivery.reason}: {reason}" if delivery.reason else str(reason))[:MAX_REASON]
    with Transaction(conn) as tx:
        tx.execute("UPDATE deliveries SET decision = ?, reason = ? WHERE delivery_id = ?",
                   (delivery.decision, delivery.reason, delivery.delivery_id))
        journal(tx, "deliveries", delivery.as_ledger())


def _write(tx: sqlite3.Connection, d: Delivery) -> None:
    tx.execute("""INSERT INTO deliveries (delivery_id, client_id, trigger, target, kind, received_at, dedupe_key,
                      decision, reason, run_id, event) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)""",
               (d.delivery_id, d.client_id, d.trigger, d.target, d.kind, d.received_at, d.dedupe_key, d.decision,
                d.reason, d.run_id, json.dumps(d.event)))
    journal(tx, "deliveries", d.as_ledger())


def pending(conn: sqlite3.Connection, client_id: str) -> list[Delivery]:
    """Deliveries accepted whose run may not have started (the daemon died in between), oldest first."""
    return [Delivery.of(r) for r in conn.execute(
        "SELECT * FROM deliveries WHERE client_id = ? AND decision = 'accepted' ORDER BY received_at, delivery_id",
        (client_id,))]


def get_delivery(conn: sqlite3.Connection, client_id: str, delivery_id: str) -> Delivery | None:
    row = conn.execute("SELECT * FROM deliveries WHERE delivery_id = ? AND client_id = ?",
                       (delivery_id, client_id)).fetchone()
    return Delivery.of(row) if row is not None else None


def list_deliveries(conn: sqlite3.Connection, client_id: str, *, trigger: str | None = None,
                    decision: str | None = None, before: tuple[str, str] | None = None,
                    limit: int = 100) -> list[Delivery]:
    """The client's deliveries, newest first; ``before``: (received_at, delivery_id) of the last one seen."""
    sql, args = "SELECT * FROM deliveries WHERE client_id = ?", list[Any]([client_id])
    if trigger:
        sql += " AND (trigger = ? OR target = ?)"
        args += [trigger, trigger]
    if decision:
        sql += " AND decision = ?"
        args.append(decision)
    if before is not None:
        sql += " AND (received_at, delivery_id) < (?, ?)"
        args += list(before)
    sql += " ORDER BY received_at DESC, delivery_id DESC LIMIT ?"
    args.append(max(1, min(int(limit), 10_000)))
    return [Delivery.of(r) for r in conn.execute(sql, args)]


def prune(conn: sqlite3.Connection, client_id: str, before: str) -> int:
    """Forget the live rows of deliveries received before ``before`` (their ledger rows stay): the dedupe window
    and what can be replayed end there. Deliveries still waiting to start are kept."""
    with Transaction(conn) as tx:
        return tx.execute("DELETE FROM deliveries WHERE client_id = ? AND received_at < ? AND decision != 'accepted'",
                          (client_id, before)).rowcount
