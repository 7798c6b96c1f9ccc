"""What this machine has applied, per client and agent, as the state database records it.

Each agent carries two conditions, after Kubernetes' habit:
- ``Ready``: it has a valid applied spec and can run (False when it was never valid).
- ``Synced``: its applied spec is what the source says at the last reconciled revision (False with
  reason Invalid when the newer spec is broken: the agent keeps its last good version meanwhile).
"""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from runner.specs.models import AgentSpec


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
    _parsed: dict[str, Any] | None = field(default=None, repr=False, compare=False)

    @property
    def spec(self) -> AgentSpec | None:
        return AgentSpec.model_validate_json(self.spec_json) if self.spec_json else None

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
        synced = self.condition("Synced")
        if synced.get("status") == "False":
            return str(synced.get("message", ""))
        return str(self.condition("Ready").get("message", ""))


def load_applied(conn: sqlite3.Connection, client_id: str, name: str | None = None) -> dict[str, AppliedAgent]:
    sql = "SELECT * FROM agents WHERE client_id = ?" + (" AND name = ?" if name else "") + " ORDER BY name"
    rows = conn.execute(sql, (client_id, name) if name else (client_id,)).fetchall()
    return {r["name"]: _agent(r) for r in rows}


def set_suspended(conn: sqlite3.Connection, client_id: str, name: str, suspended: bool) -> bool:
    cur = conn.execute("UPDATE agents SET suspended = ?, updated_at = ? WHERE client_id = ? AND name = ?",
                       (int(suspended), now(), client_id, name))
    return cur.rowcount > 0


def now() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds")


def _agent(r: sqlite3.Row) -> AppliedAgent:
    return AppliedAgent(
        client_id=r["client_id"], name=r["name"], path=r["path"], blob=r["blob"], spec_json=r["spec"],
        generation=r["generation"], applied_revision=r["applied_revision"],
        attempted_revision=r["attempted_revision"], fingerprint=r["fingerprint"],
        conditions=json.loads(r["conditions"]), suspended=bool(r["suspended"]), updated_at=r["updated_at"],
    )
