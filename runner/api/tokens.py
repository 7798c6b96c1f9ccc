"""API tokens: created by `agentctl token create`, shown once, stored as SHA-256 hashes.

A token is ``ao_`` and 32 random bytes in URL-safe base64: long enough that a hash without a salt
is safe (nobody can guess a preimage), and a hash lookup is one indexed query per request.
"""

from __future__ import annotations

import hashlib
import secrets
import sqlite3
import time
from dataclasses import dataclass
from typing import Literal

from runner.state import Transaction

Role = Literal["viewer", "operator", "admin"]
RANK = {"viewer": 0, "operator": 1, "admin": 2}



@dataclass(frozen=True)
class Principal:
    client_id: str
    name: str
    role: Role

    def may(self, role: Role) -> bool:
        return RANK[self.role] >= RANK[role]


CACHE_SECONDS = 5.0  # a deleted token stops working within this
_cache: dict[str, tuple[float, Principal | None]] = {}


def create(conn: sqlite3.Connection, client_id: str, role: Role, name: str, now: str) -> str:
    token = "ao_" + secrets.token_urlsafe(32)
    with Transaction(conn) as tx:
        tx.execute("INSERT INTO tokens (hash, client_id, name, role, created_at) VALUES (?, ?, ?, ?, ?)",
                   (_hash(token), client_id, name, role, now))
    return token


def lookup(conn: sqlite3.Connection, token: str) -> Principal | None:
    key = _hash(token)
    hit = _cache.get(key)
    if hit is not None and time.monotonic() - hit[0] < CACHE_SECONDS:
        return hit[1]
    row = conn.execute("SELECT client_id, name, role FROM tokens WHERE hash = ?", (key,)).fetchone()
    principal = Principal(row[0], row[1], row[2]) if row else None
    if principal is not None:  # only known tokens: a token just created works at once
        if len(_cache) > 10_000:
            _cache.clear()
        _cache[key] = (time.monotonic(), principal)
    return principal


def _hash(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()
