"""What this machine has applied, per client and agent, as the state database records it.

Each agent carries two conditions, after Kubernetes' habit:
- ``Ready``: it has a valid applied spec and can run (False when it was never valid).
- ``Synced``: its applied spec is what the source says at the last reconciled revision (False with
  reason Invalid when the newer spec is broken: the agent keeps its last good version meanwhile).

The daemon adds a third when one of its triggers cannot be armed yet:
- ``Triggered``: False with reason WaitingForPath while a watched folder does not exist.

Every change to a client's applied agents (an apply, a suspension) bumps that client's generation in
``applied_changes``, in the same transaction, whichever process makes it: the daemon follows the
generation and re-arms its triggers when it moves (``runner.supervise.daemon``).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from typing import Any

from runner.specs.models import AgentSpec, WorkflowSpec
from runner.state import Transaction, register
from runner.times import utcnow

register("""
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
CREATE TABLE IF NOT EXISTS applied_changes ( -- bumped with every change to a client's applied agents (any process)
    client_id TEXT PRIMARY KEY,
    generation INTEGER NOT NULL DEFAULT 0,   -- the daemon re-arms its triggers when it moves
    changed_at TEXT
);
""", migrations=[("sources", "invalid", "TEXT"), ("agents", "kind", "TEXT NOT NULL DEFAULT 'agent'")])


@dataclass
class AppliedAgent:
    client_id: str
    name: str
    path: str | None
    blob: str | None
    spec_json: str | None
    generation: int
    applied_revision: str | None
    attempted_revision: str | None
    fingerprint: str | None
    conditions: list[dict[str, Any]] = field(default_factory=list)
    suspended: bool = False
    updated_at: str | None = None
    kind: str = "agent"  # or workflow: the same table, names unique across both
    _parsed: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def spec(self) -> AgentSpec | None:
        return AgentSpec.model_validate_json(self.spec_json) if self.spec_json else None

    @property
    def workflow(self) -> WorkflowSpec | None:
        return WorkflowSpec.model_validate_json(self.spec_json) if self.spec_json and self.kind == "workflow" else None

    @property
    def spec_dict(self) -> dict[str, Any] | None:
        if self.spec_json is None:
            return None
        if self._parsed is None:
            self._parsed = dict(json.loads(self.spec_json))
        return self._parsed

    def condition(self, kind: str) -> dict[str, Any]:
        return next((c for c in self.conditions if c.get("type") == kind), {})

    @property
    def synced(self) -> bool:
        return self.condition("Synced").get("status") == "True"

    @property
    def state(self) -> str:
        """One word for `agentctl status`: Ready, Invalid, Suspended, Disabled or Pending."""
        if self.spec_json is None:
            return "Invalid"
        if not self.synced:
            return "Invalid"
        if self.suspended:
            return "Suspended"
        spec = self.spec_dict or {}
        if not spec.get("enabled", True):
            return "Disabled"
        return "Ready"

    @property
    def message(self) -> str:
        for kind in ("Synced", "Triggered"):
            cond = self.condition(kind)
            if cond.get("status") == "False":
                return str(cond.get("message", ""))
        return str(self.condition("Ready").get("message", ""))


def load_applied(conn: sqlite3.Connection, client_id: str, name: str | None = None,
                 kind: str | None = "agent") -> dict[str, AppliedAgent]:
    """The client's applied agents (``kind`` agent), workflows (workflow) or both (None), by name."""
    sql = ("SELECT * FROM agents WHERE client_id = ?" + (" AND name = ?" if name else "")
           + (" AND kind = ?" if kind else "") + " ORDER BY name")
    args = (client_id, *([name] if name else []), *([kind] if kind else []))
    return {r["name"]: _agent(r) for r in conn.execute(sql, args).fetchall()}


def set_suspended(conn: sqlite3.Connection, client_id: str, name: str, suspended: bool) -> bool:
    with Transaction(conn) as tx:
        cur = tx.execute("UPDATE agents SET suspended = ?, updated_at = ? WHERE client_id = ? AND name = ?",
                         (int(suspended), now(), client_id, name))
        if cur.rowcount > 0:
            bump_generation(tx, client_id)
    return cur.rowcount > 0


def bump_generation(tx: sqlite3.Connection, client_id: str) -> None:
    """Say the client's applied agents changed (call inside the transaction that changes them)."""
    tx.execute("INSERT INTO applied_changes (client_id, generation, changed_at) VALUES (?, 1, ?) "
               "ON CONFLICT(client_id) DO UPDATE SET generation = generation + 1, changed_at = excluded.changed_at",
               (client_id, now()))


def applied_generations(conn: sqlite3.Connection) -> dict[str, int]:
    """Each client's generation of applied agents: one cheap read, made a few times a second by the daemon."""
    return {r[0]: int(r[1]) for r in conn.execute("SELECT client_id, generation FROM applied_changes")}


def set_trigger_condition(conn: sqlite3.Connection, client_id: str, name: str, waiting: list[str]) -> bool:
    """Record on the agent whether its triggers wait for folders to exist (``waiting``); True if it changed.

    Not a change of the applied agent: the generation stays (the daemon writes this after re-arming).
    """
    with Transaction(conn) as tx:
        row = tx.execute("SELECT conditions FROM agents WHERE client_id = ? AND name = ?", (client_id, name)).fetchone()
        if row is None:
            return False
        conditions = [c for c in json.loads(row[0]) if c.get("type") != "Triggered"]
        old = next((c for c in json.loads(row[0]) if c.get("type") == "Triggered"), None)
        if waiting:
            message = "; ".join(f"waiting for {path} to exist" for path in waiting)
            if old and old.get("message") == message:
                return False
            conditions.append({"type": "Triggered", "status": "False", "reason": "WaitingForPath",
                               "message": message, "since": now()})
        elif old is None:
            return False
        tx.execute("UPDATE agents SET conditions = ? WHERE client_id = ? AND name = ?",
                   (json.dumps(conditions), client_id, name))
    return True


def now() -> str:
    return utcnow()


def _agent(r: sqlite3.Row) -> AppliedAgent:
    return AppliedAgent(
        client_id=r["client_id"], name=r["name"], path=r["path"], blob=r["blob"], spec_json=r["spec"],
        generation=r["generation"], applied_revision=r["applied_revision"],
        attempted_revision=r["attempted_revision"], fingerprint=r["fingerprint"],
        conditions=json.loads(r["conditions"]), suspended=bool(r["suspended"]), updated_at=r["updated_at"],
        kind=r["kind"],
    )
