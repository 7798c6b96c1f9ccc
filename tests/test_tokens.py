"""API tokens: created with a lifetime, listed and revoked, through the real CLI and the real API server.

What a list shows is what a token is (id, name, role, times), never the token or its hash. A revoked or
expired token is refused at its very next request, whichever process revoked it. A client's admin sees
and revokes its own client's tokens only; another client's token is 404, as one that does not exist.
"""

from __future__ import annotations

import hashlib
import json
import re
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_helpers import Served, scripted, serve
from conftest import agentctl

ISO_Z = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ$")
FIELDS = {"id", "name", "role", "created_at", "expires_at", "last_used_at", "expired"}


def token_cli(home: Path, *args: str, client_id: str = "default") -> subprocess.CompletedProcess[str]:
    return agentctl("--client-id", client_id, "--output", "json", "token", *args, home=home)


def created(home: Path, *args: str, client_id: str = "default") -> dict[str, Any]:
    done = token_cli(home, "create", *args, client_id=client_id)
    assert done.returncode == 0, done.stderr
    made: dict[str, Any] = json.loads(done.stdout)
    return made


def listed(home: Path, client_id: str = "default") -> list[dict[str, Any]]:
    done = token_cli(home, "list", client_id=client_id)
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, Any]] = json.loads(done.stdout)
    return rows


def secrets_of(home: Path) -> list[str]:
    """Every token hash in the home: none may show in a list."""
    conn = sqlite3.connect(home / "state.sqlite")
    try:
        return [row[0] for row in conn.execute("SELECT hash FROM tokens")]
    finally:
        conn.close()


def expire(home: Path, token_id: str) -> None:
    """Move a token's expiry into the past: the one thing a test cannot wait for is the clock."""
    conn = sqlite3.connect(home / "state.sqlite")
    try:
        conn.execute("UPDATE tokens SET expires_at = '2001-01-01T00:00:00Z' WHERE id = ?", (token_id,))
        conn.commit()
    finally:
        conn.close()


# -- the command line --------------------------------------------------------------------------------------


def test_create_with_a_lifetime_list_and_revoke(home: Path) -> None:
    forever = created(home, "--role", "viewer", "--name", "grafana")
    weekly = created(home, "--role", "admin", "--name", "alice", "--expires", "7d")
    other = created(home, "--role", "admin", "--name", "bob", client_id="other")
    assert forever["expires_at"] is None and ISO_Z.match(weekly["expires_at"]), weekly
    assert forever["id"].startswith("tok_") and forever["id"] != weekly["id"]

    rows = listed(home)
    assert [(r["id"], r["name"], r["role"]) for r in rows] == [(forever["id"], "grafana", "viewer"),
                                                                (weekly["id"], "alice", "admin")]
    for row in rows:
        assert set(row) == FIELDS and ISO_Z.match(row["created_at"]) and row["last_used_at"] is None
        assert row["expired"] is False
    assert rows[1]["expires_at"] == weekly["expires_at"]
    assert [r["id"] for r in listed(home, "other")] == [other["id"]]

    text = agentctl("token", "list", home=home)
    assert text.returncode == 0, text.stderr
    assert text.stdout.split("\n")[0].split() == ["ID", "NAME", "ROLE", "CREATED", "EXPIRES", "LAST", "USED"]
    assert forever["id"] in text.stdout and "never" in text.stdout and weekly["expires_at"] in text.stdout
    shown = text.stdout + json.dumps(rows)
    for secret in [forever["token"], weekly["token"], *secrets_of(home)]:
        assert secret not in shown

    # Another client's token is not this client's to revoke: the same answer as an id nobody has.
    for unknown in (other["id"], "tok_0000000000000000"):
        done = agentctl("token", "revoke", unknown, home=home)
        assert done.returncode == 2 and f"no token with id '{unknown}'" in done.stderr, done.stderr
    revoked = agentctl("token", "revoke", weekly["id"], home=home)
    assert revoked.returncode == 0 and revoked.stdout.strip() == f"revoked {weekly['id']}", revoked
    assert [r["id"] for r in listed(home)] == [forever["id"]]
    assert [r["id"] for r in listed(home, "other")] == [other["id"]]


@pytest.mark.parametrize("bad", ["7x", "0d", "-1h", "12", "h", "1.5d", "7 d", "100000w", ""])
def test_a_bad_lifetime_is_a_usage_error_naming_the_option(home: Path, bad: str) -> None:
    done = agentctl("token", "create", "--role", "viewer", "--expires", bad, home=home)
    assert done.returncode == 2, done
    assert "--expires" in done.stderr and "Traceback" not in done.stderr, done.stderr
    assert done.stdout == ""


@pytest.mark.parametrize(("lifetime", "seconds"), [("30m", 1800), ("12h", 43200), ("90d", 7776000), ("2w", 1209600)])
def test_lifetimes_in_minutes_hours_days_and_weeks(home: Path, lifetime: str, seconds: int) -> None:
    from datetime import datetime

    made = created(home, "--role", "viewer", "--expires", lifetime)
    row = next(r for r in listed(home) if r["id"] == made["id"])
    took = datetime.fromisoformat(row["expires_at"]) - datetime.fromisoformat(row["created_at"])
    assert abs(took.total_seconds() - seconds) <= 1


def test_a_home_from_before_token_ids_is_migrated(home: Path) -> None:
    """The tokens table as it shipped first: no id, no expiry. Its tokens get ids and can be revoked."""
    home.mkdir(parents=True)
    conn = sqlite3.connect(home / "state.sqlite")
    conn.execute("CREATE TABLE tokens (hash TEXT PRIMARY KEY, client_id TEXT NOT NULL, name TEXT NOT NULL, "
                 "role TEXT NOT NULL, created_at TEXT NOT NULL)")
    old = "ao_" + "x" * 43
    conn.execute("INSERT INTO tokens VALUES (?, 'default', 'old-one', 'admin', '2025-03-01T10:20:30.123')",
                 (hashlib.sha256(old.encode()).hexdigest(),))
    conn.commit()
    conn.close()

    rows = listed(home)
    assert len(rows) == 1 and rows[0]["id"].startswith("tok_") and rows[0]["name"] == "old-one", rows
    assert rows[0]["created_at"] == "2025-03-01T10:20:30Z" and rows[0]["expires_at"] is None
    assert listed(home)[0]["id"] == rows[0]["id"]  # given once, kept
    assert agentctl("token", "revoke", rows[0]["id"], home=home).returncode == 0
    assert listed(home) == []


# -- the API -------------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    daemon = serve(tmp_path_factory.mktemp("tokens"), scripted("quick", [{"content": "done"}]))
    try:
        yield daemon
    finally:
        daemon.stop()


def test_admins_list_their_clients_tokens_and_nothing_secret(served: Served) -> None:
    foreign = created(served.home, "--role", "admin", "--name", "elsewhere", client_id="other")
    reply = served.api("GET", "/tokens", role="admin")
    assert reply.status == 200, reply.body
    rows = reply.json["tokens"]
    assert {r["name"] for r in rows} >= {"viewer-default", "operator-default", "admin-default"}
    assert foreign["id"] not in reply.text and "elsewhere" not in reply.text
    for row in rows:
        assert set(row) == FIELDS and ISO_Z.match(row["created_at"])
    for secret in [*served.tokens.values(), *secrets_of(served.home)]:
        assert secret not in reply.text
    admin = next(r for r in rows if r["name"] == "admin-default")
    assert admin["last_used_at"] and ISO_Z.match(admin["last_used_at"])  # this very request used it

    for role in ("viewer", "operator"):
        refused = served.api("GET", "/tokens", role=role)
        assert refused.status == 403 and refused.error()["code"] == "forbidden", refused.body
        assert served.api("DELETE", f"/tokens/{admin['id']}", role=role).status == 403
    assert served.api("GET", "/tokens").status == 401

    gone = served.api("DELETE", f"/tokens/{foreign['id']}", role="admin")
    nobody = served.api("DELETE", "/tokens/tok_0000000000000000", role="admin")
    assert gone.status == nobody.status == 404, gone.body
    assert gone.error()["message"].replace(foreign["id"], "X") == nobody.error()["message"].replace(
        "tok_0000000000000000", "X")
    assert [r["id"] for r in listed(served.home, "other")] == [foreign["id"]]

    document = served.request("GET", "/openapi.json").json["paths"]
    assert "get" in document["/agents/v1/tokens"] and "delete" in document["/agents/v1/tokens/{token_id}"]


def test_a_token_revoked_through_the_api_is_refused_at_once(served: Served) -> None:
    made = created(served.home, "--role", "viewer", "--name", "short-lived")
    assert served.api("GET", "/agents", token=made["token"]).status == 200  # known, and looked up once
    reply = served.api("DELETE", f"/tokens/{made['id']}", role="admin")
    assert reply.status == 200 and reply.json == {"id": made["id"], "revoked": True}, reply.body
    refused = served.api("GET", "/agents", token=made["token"])
    assert refused.status == 401 and refused.error()["code"] == "unauthorized"
    assert served.api("DELETE", f"/tokens/{made['id']}", role="admin").status == 404


def test_a_token_revoked_by_the_cli_is_refused_at_once(served: Served) -> None:
    made = created(served.home, "--role", "admin", "--name", "from-the-cli")
    assert served.api("GET", "/tokens", token=made["token"]).status == 200
    assert agentctl("token", "revoke", made["id"], home=served.home).returncode == 0
    assert served.api("GET", "/tokens", token=made["token"]).status == 401
    assert served.request("GET", "/metrics", token=made["token"]).status == 401  # open path, bad token: refused


def test_an_expired_token_is_refused_and_listed_as_expired(served: Served) -> None:
    made = created(served.home, "--role", "viewer", "--name", "temp", "--expires", "30m")
    assert served.api("GET", "/runs", token=made["token"]).status == 200
    expire(served.home, made["id"])
    assert served.api("GET", "/runs", token=made["token"]).status == 401
    row = next(r for r in served.api("GET", "/tokens", role="admin").json["tokens"] if r["id"] == made["id"])
    assert row["expired"] is True and row["expires_at"] == "2001-01-01T00:00:00Z"
    assert row["last_used_at"] is not None

    # Revoking an expired token is allowed (tidying up), and the list says so at once.
    assert served.api("DELETE", f"/tokens/{made['id']}", role="admin").status == 200
    assert made["id"] not in served.api("GET", "/tokens", role="admin").text
