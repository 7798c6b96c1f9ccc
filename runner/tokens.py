"""API tokens: created by `agentctl token create`, shown once, stored as SHA-256 hashes.

A token is ``ao_`` and 32 random bytes in URL-safe base64: long enough that a hash without a salt
is safe (nobody can guess a preimage), and a hash lookup is one indexed query per request. Users name a
token by its id (``tok_`` and 16 hex digits), never by the token or its hash.

There is no cache in front of that query: a token revoked (by the API, or by `agentctl` in another
process) or past its expiry is refused at its very next request. The query is a primary-key read on a
table of a few rows; a cache would buy microseconds and cost exactly that guarantee.
"""

from __future__ import annotations

import hashlib
import hmac
import re
import secrets
import sqlite3
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from runner.state import Transaction, register


def _give_ids(conn: sqlite3.Connection) -> None:
    """Tokens made before they had an id get one, random like a new token's, so they too can be listed and
    revoked. Looked for first: an UPDATE, even of no row, would take the write lock at every connect."""
    if conn.execute("SELECT 1 FROM tokens WHERE id IS NULL LIMIT 1").fetchone():
        conn.execute("UPDATE tokens SET id = 'tok_' || lower(hex(randomblob(8))) WHERE id IS NULL")
    conn.execute("CREATE UNIQUE INDEX IF NOT EXISTS tokens_by_id ON tokens (id)")


register("""
CREATE TABLE IF NOT EXISTS tokens (         -- API tokens, by SHA-256 of the token (runner.tokens)
    hash TEXT PRIMARY KEY,
    client_id TEXT NOT NULL,
    name TEXT NOT NULL,
    role TEXT NOT NULL,
    created_at TEXT NOT NULL,       -- UTC, ISO 8601 with Z (tokens of older homes: without the Z)
    id TEXT,                        -- what users name a token by (list, revoke): never the token or its hash
    expires_at TEXT,                -- UTC, ISO 8601 with Z; NULL: never
    last_used_at TEXT               -- UTC, ISO 8601 with Z, to the minute or so (runner.tokens.lookup)
);
""", migrations=[("tokens", "id", "TEXT"), ("tokens", "expires_at", "TEXT"), ("tokens", "last_used_at", "TEXT")],
         then=_give_ids)

Role = Literal["viewer", "operator", "admin"]
RANK = {"viewer": 0, "operator": 1, "admin": 2}
# How stale ``last_used_at`` may get: a token in use is written at most once a minute, not per request.
LAST_USED_EVERY = timedelta(minutes=1)
_DURATION = re.compile(r"^([1-9][0-9]{0,5})([mhdw])$")
_UNITS = {"m": timedelta(minutes=1), "h": timedelta(hours=1), "d": timedelta(days=1), "w": timedelta(weeks=1)}
MAX_LIFETIME = timedelta(days=3660)


@dataclass(frozen=True)
class Principal:
    client_id: str
    name: str
    role: Role
    token_id: str = ""

    def may(self, role: Role) -> bool:
        return RANK[self.role] >= RANK[role]


@dataclass(frozen=True)
class Issued:
    """A token just made: the secret (shown once) and how to name it afterwards."""

    token: str
    id: str
    expires_at: str | None


def create(conn: sqlite3.Connection, client_id: str, role: Role, name: str,
           lifetime: timedelta | None = None) -> Issued:
    token, token_id = "ao_" + secrets.token_urlsafe(32), "tok_" + secrets.token_hex(8)
    now = datetime.now(UTC)
    expires = iso(now + lifetime) if lifetime else None
    with Transaction(conn) as tx:
        tx.execute("INSERT INTO tokens (hash, id, client_id, name, role, created_at, expires_at) "
                   "VALUES (?, ?, ?, ?, ?, ?, ?)", (_hash(token), token_id, client_id, name, role, iso(now), expires))
    return Issued(token, token_id, expires)


def lookup(conn: sqlite3.Connection, token: str) -> Principal | None:
    """The principal of a token, or None: unknown, revoked, or expired."""
    key = _hash(token)
    row = conn.execute("SELECT id, client_id, name, role, expires_at, last_used_at FROM tokens WHERE hash = ?",
                       (key,)).fetchone()
    if row is None:
        return None
    token_id, client_id, name, role, expires_at, last_used_at = tuple(row)
    now = datetime.now(UTC)
    if expires_at and parse(expires_at) <= now:
        return None
    if not last_used_at or now - parse(last_used_at) >= LAST_USED_EVERY:
        try:
            conn.execute("UPDATE tokens SET last_used_at = ? WHERE hash = ?", (iso(now), key))
        except sqlite3.OperationalError:
            pass  # busy: bookkeeping, never a reason to refuse the request
    return Principal(client_id, name, role, token_id)


def listed(conn: sqlite3.Connection, client_id: str) -> list[dict[str, Any]]:
    """The client's tokens, oldest first: what they are, never the token or its hash."""
    now = datetime.now(UTC)
    rows = conn.execute("SELECT id, name, role, created_at, expires_at, last_used_at FROM tokens "
                        "WHERE client_id = ? ORDER BY created_at, rowid", (client_id,)).fetchall()
    return [{"id": r["id"], "name": r["name"], "role": r["role"], "created_at": _normal(r["created_at"]),
             "expires_at": _normal(r["expires_at"]), "last_used_at": _normal(r["last_used_at"]),
             "expired": bool(r["expires_at"]) and parse(r["expires_at"]) <= now} for r in rows]


def revoke(conn: sqlite3.Connection, client_id: str, token_id: str) -> bool:
    """Delete the client's token ``token_id``; False when the client has no such token (another client's
    token is no exception: to this client it does not exist)."""
    with Transaction(conn) as tx:
        return tx.execute("DELETE FROM tokens WHERE id = ? AND client_id = ?", (token_id, client_id)).rowcount > 0


def parse_duration(text: str) -> timedelta:
    """``30m``, ``12h``, ``7d``, ``2w``: a token's lifetime. ValueError says what is wrong."""
    match = _DURATION.match(text.strip())
    if not match:
        raise ValueError(f"{text!r} is not a duration: a whole number and a unit, m, h, d or w (30m, 12h, 90d)")
    lifetime = int(match[1]) * _UNITS[match[2]]
    if lifetime > MAX_LIFETIME:
        raise ValueError(f"{text!r} is longer than {MAX_LIFETIME.days} days: leave --expires out for a token "
                         "that never expires")
    return lifetime


def iso(moment: datetime) -> str:
    """UTC, ISO 8601, to the second, with Z."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse(text: str) -> datetime:
    """A stored timestamp as an aware UTC datetime (older homes wrote them without the Z: UTC too)."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)


def _normal(text: str | None) -> str | None:
    return iso(parse(text)) if text else None


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def signed(body: bytes, secret: str, header: Callable[[str], str | None], *, gitlab: bool = True) -> bool:
    """Whether a webhook's body carries its sender's proof of ``secret``: GitHub's HMAC-SHA256 in
    X-Hub-Signature-256 ('sha256=HEX'), Gitea's in X-Gitea-Signature, or (``gitlab``) GitLab's X-Gitlab-Token,
    the secret itself. Compared in constant time."""
    digest = hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()
    github, gitea = header("X-Hub-Signature-256") or "", header("X-Gitea-Signature") or ""
    token = (header("X-Gitlab-Token") or "") if gitlab else ""
    return (hmac.compare_digest(github.encode(), f"sha256={digest}".encode()) if github else False) or \
        (hmac.compare_digest(gitea.encode(), digest.encode()) if gitea else False) or \
        (hmac.compare_digest(token.encode(), secret.encode()) if token else False)


def bearer_is(header: Callable[[str], str | None], secret: str) -> bool:
    """Whether 'Authorization: Bearer SECRET' names ``secret`` (constant time)."""
    given = header("Authorization") or ""
    return given.startswith("Bearer ") and hmac.compare_digest(given[7:].strip().encode(), secret.encode())
