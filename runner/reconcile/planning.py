"""What apply would do: the specs at a revision against the applied state.

Planning reads only what changed: files whose path, blob id and validation context match an applied
valid agent are not even read from git (see ``validate_tree``'s known_good), and everything else
goes through the spec cache, keyed by blob id. A 10,000-spec repository with one change validates
one file.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Literal

from runner.errors import FolderMissing
from runner.reconcile.applied import AppliedAgent, load_applied
from runner.reconcile.probing import probe_tools
from runner.source.git import GitSource
from runner.specs.graph_checking import has_refs
from runner.specs.problems import Problem, errors_in
from runner.specs.validating import SpecResult, custom_tools_of, validate_tree
from runner.state import Transaction, register

register("""
CREATE TABLE IF NOT EXISTS spec_cache (key TEXT PRIMARY KEY, entry TEXT NOT NULL);
""")

Action = Literal["create", "update", "delete", "invalid"]


@dataclass
class Change:
    action: Action
    name: str
    fields: list[str] = field(default_factory=list)
    problems: list[Problem] = field(default_factory=list)
    result: SpecResult | None = None
    kind: str = "agent"  # or workflow

    def __str__(self) -> str:
        name = f"workflow {self.name}" if self.kind == "workflow" else self.name
        if self.action == "update":
            return f"update {name} ({', '.join(self.fields)})"
        if self.action == "invalid":
            first = errors_in(self.problems)[:1]
            more = len(errors_in(self.problems)) - 1
            reason = str(first[0]) if first else "invalid"
            return f"invalid {name}: {reason}" + (f" (+{more} more)" if more > 0 else "")
        return f"{self.action} {name}"

    def as_json(self) -> dict[str, Any]:
        return {"action": self.action, "name": self.name, "kind": self.kind, "fields": self.fields,
                "problems": [p.as_json() for p in self.problems]}


@dataclass
class Plan:
    client_id: str
    location: str
    revision: str
    fingerprint: str
    changes: list[Change]
    results: list[SpecResult]
    applied: dict[str, AppliedAgent]
    refused: str | None = None  # why apply must not proceed (deleting every agent)

    @property
    def in_sync(self) -> bool:
        return not self.changes

    def count(self, action: Action) -> int:
        return sum(1 for c in self.changes if c.action == action)

    def as_json(self) -> dict[str, Any]:
        return {"client_id": self.client_id, "source": self.location, "revision": self.revision,
                "in_sync": self.in_sync, "refused": self.refused,
                "changes": [c.as_json() for c in self.changes]}


def make_plan(conn: sqlite3.Connection, source: GitSource, revision: str, *, client_id: str, home: str,
              allow_empty: bool = False) -> Plan:
    applied = load_applied(conn, client_id, kind=None)
    # Workflows are always validated (through the cache): their steps' agents are checked against the tree.
    # So are agents that name other specs (tools, triggers): the graphs they make are checked over the tree.
    known = {a.path: (a.blob or "", a.fingerprint or "", a.name) for a in applied.values()
             if a.path and a.spec_json and a.synced and a.kind == "agent" and not has_refs(a.spec_dict)}
    cache = SpecCache(conn)
    try:
        files = source.files(revision)
    except FolderMissing:
        if not allow_empty:
            raise
        files = []  # removing every spec usually removes the folder too; --allow-empty means exactly that
    tools = probe_tools(custom_tools_of(files), files, cache)
    results, fingerprint = validate_tree(files, client_id=client_id, home=home, cache=cache, known_good=known,
                                         custom_tools=tools)
    cache.save()
    changes = diff(results, applied)
    plan = Plan(client_id, source.location.describe(), revision, fingerprint, changes, results, applied)
    real = [a for a in applied.values() if a.spec_json]
    deleting = {c.name for c in changes if c.action == "delete"}
    if real and all(a.name in deleting for a in real) and not any(r.valid for r in results) and not allow_empty:
        plan.refused = (f"revision {revision[:12]} would delete every agent ({len(real)}); "
                        "pass --allow-empty if that is what you want")
    return plan


def diff(results: list[SpecResult], applied: dict[str, AppliedAgent]) -> list[Change]:
    changes: list[Change] = []
    claimed: set[str] = set()
    by_path = {a.path: a for a in applied.values() if a.path}
    named = {r.name for r in results if r.name}
    for r in sorted(results, key=lambda r: (r.name or "", r.rel_path)):
        name = r.name
        if name is None and r.rel_path in by_path and by_path[r.rel_path].name not in named:
            name = by_path[r.rel_path].name  # unreadable file at the path of a known agent
        if name:
            claimed.add(name)
        current = applied.get(name) if name else None
        if not r.valid:
            changes.append(Change("invalid", name or r.file, problems=r.problems, result=r, kind=r.kind))
        elif r.known_good:
            continue
        elif current is None or current.spec_json is None:
            changes.append(Change("create", name or r.file, result=r, kind=r.kind))
        else:
            new = r.spec.model_dump(mode="json", by_alias=True) if r.spec else {}
            fields = changed_fields(current.spec_dict or {}, new)
            if current.kind != r.kind:
                fields = ["kind", *fields]
            if not fields and not current.synced:
                fields = ["recovered from Invalid"]
            if fields:
                changes.append(Change("update", current.name, fields=fields, result=r, kind=r.kind))
    for name in sorted(set(applied) - claimed):
        changes.append(Change("delete", name, kind=applied[name].kind))
    return changes


def changed_fields(old: dict[str, Any], new: dict[str, Any], prefix: str = "", depth: int = 2) -> list[str]:
    """Dotted names of the fields that differ (two levels deep; lists count as one field)."""
    out = []
    for key in sorted(set(old) | set(new)):
        a, b = old.get(key), new.get(key)
        if a == b:
            continue
        if isinstance(a, dict) and isinstance(b, dict) and depth > 1:
            out.extend(changed_fields(a, b, f"{prefix}{key}.", depth - 1))
        else:
            out.append(prefix + key)
    return out


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
