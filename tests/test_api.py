"""The REST API, end to end: a real `agentctl serve` on a free port, a real spec repository, plain HTTP.

One daemon serves the whole module (its tests touch different agents, so they do not interfere); the
isolation test starts its own, serving two clients. Agents use the scripted model. Writes are checked in
git itself: the branch, the commit's author and message, the blob at the path. Every wait is a bounded poll.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import shutil
import sqlite3
import subprocess
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest
import yaml
from api_helpers import Reply, Served, blob, git, head, make_repo, poll, scripted, serve, two_clients, write_files
from conftest import ROOT
from prometheus_client.parser import text_string_to_metric_families

SECRET = "hook-s3cret"


@pytest.fixture(scope="module")
def main(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("api")
    data = base / "data"
    data.mkdir()
    (data / "in.txt").write_text("a line for the agent\n")
    files: dict[str, Any] = {
        **scripted("tooly", [
            {"tool_calls": [{"name": "file_reader", "args": {"path": str(data / "in.txt")}},
                            {"name": "file_reader", "args": {"path": "/etc/passwd"}}],
             "usage": {"input_tokens": 20, "output_tokens": 5}},
            {"content": "read it", "usage": {"input_tokens": 30, "output_tokens": 5}},
        ], tools=[{"name": "file_reader", "paths": [str(data)]}], overlap="queue"),
        **scripted("quick", [{"content": "done"}], overlap="queue"),
        **scripted("sleeper", [{"sleep": 60, "content": "too late"}], constraints={"max_runtime": 120}),
        "specs/tools/peek.py": (ROOT / "specs" / "tools" / "peek.py").read_text(),
    }
    for name in ("alpha", "beta", "gamma"):
        files[f"specs/{name}.yaml"] = {"name": name, "description": f"agent {name}", "model": "llama2"}
    served = serve(base, files, env={"AGENT_ORCH_WEBHOOK_SECRET": SECRET})
    try:
        yield served
    finally:
        served.stop()


def names(reply: Reply) -> list[str]:
    assert reply.status == 200, reply.body
    return [a["name"] for a in reply.json["agents"]]


def commit_outside_the_api(repo: Path, files: dict[str, Any], message: str) -> str:
    """A commit as a person makes it. The API moves the branch without a work tree, so sync that first."""
    git(repo, "reset", "-q", "--hard")
    write_files(repo, files)
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)
    return head(repo)


def last_commit(repo: Path) -> dict[str, str]:
    author, subject, body = git(repo, "log", "-1", "--format=%an%x00%s%x00%b", "refs/heads/main").split("\x00")
    return {"author": author, "subject": subject, "body": body.strip()}


def spec_at_head(repo: Path, name: str) -> dict[str, Any]:
    loaded: dict[str, Any] = yaml.safe_load(git(repo, "show", f"refs/heads/main:specs/{name}.yaml"))
    return loaded


def metrics(served: Served, token: str | None = None) -> dict[str, Any]:
    """/metrics with the token's view (its client's series), by default the viewer's of ``served``."""
    reply = served.request("GET", "/metrics", token=token or served.tokens["viewer"])
    assert reply.status == 200, reply.body
    assert reply.headers["Content-Type"].startswith("text/plain"), reply.headers
    return {f.name: f for f in text_string_to_metric_families(reply.text)}


def sample(families: dict[str, Any], family: str, name: str, **labels: str) -> float | None:
    for s in families[family].samples if family in families else []:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return float(s.value)
    return None


def run_now(served: Served, agent: str, text: str | None = None, role: str = "operator") -> str:
    reply = served.api("POST", f"/agents/{agent}/runs", role=role, body={"input": text} if text else None)
    assert reply.status == 202, reply.body
    data = reply.json
    assert data["status"] == "queued" and data["links"]["run"] == f"/agents/v1/runs/{data['run_id']}"
    return str(data["run_id"])


# -- the open endpoints, 404 and 405 ------------------------------------------------------------------


def test_healthz_and_openapi_need_no_token(main: Served) -> None:
    health = main.request("GET", "/healthz")
    assert health.status == 200
    assert health.json == {"status": "ok"}, "the open health check tells nothing about any client"
    detailed = main.request("GET", "/healthz", role="viewer").json
    client = detailed["client"]
    assert client["client_id"] == "default" and client["error"] is None
    assert client["revision"] == head(main.source) and client["agents"] == 6

    document = main.request("GET", "/openapi.json")
    assert document.status == 200
    spec = document.json
    assert spec["openapi"].startswith("3.")
    base = "/agents/v1"
    wanted = {("get", f"{base}/agents"), ("post", f"{base}/agents"), ("get", f"{base}/agents/{{name}}"),
              ("put", f"{base}/agents/{{name}}"), ("delete", f"{base}/agents/{{name}}"),
              ("post", f"{base}/agents/{{name}}/start"), ("post", f"{base}/agents/{{name}}/stop"),
              ("post", f"{base}/agents/{{name}}/runs"), ("get", f"{base}/agents/{{name}}/logs"),
              ("get", f"{base}/tools"), ("get", f"{base}/metrics"), ("get", f"{base}/runs"),
              ("get", f"{base}/runs/{{run_id}}"), ("get", f"{base}/runs/{{run_id}}/events"),
              ("post", f"{base}/hooks/git"), ("get", "/metrics"), ("get", "/healthz"), ("get", "/openapi.json")}
    listed = {(method, path) for path, item in spec["paths"].items() for method in item if method != "parameters"}
    assert wanted <= listed, wanted - listed
    assert "AgentSpec" in spec["components"]["schemas"]


def test_unknown_paths_are_404_and_wrong_methods_405_in_the_error_shape(main: Served) -> None:
    for path in ("/nope", "/agents/v1/nope", "/agents/v1/agents/alpha/nope", "/agents/v2/agents"):
        reply = main.request("GET", path, role="viewer")
        assert reply.status == 404, (path, reply.body)
        assert reply.error()["code"] == "not_found"

    for method, path in (("PATCH", "/agents/v1/agents/alpha"), ("DELETE", "/healthz"), ("POST", "/agents/v1/tools"),
                         ("PUT", "/agents/v1/runs"), ("GET", "/agents/v1/agents/alpha/start"),
                         ("POST", "/openapi.json")):
        reply = main.request(method, path, role="admin")
        assert reply.status == 405, (method, path, reply.body)
        assert reply.error()["code"] == "method_not_allowed"
        assert method not in reply.headers["Allow"], reply.headers

    # Without a token, a path that does not exist says 401 like one that does: nothing to learn either way.
    assert main.request("GET", "/agents/v1/nope").status == 401


# -- tokens and roles ---------------------------------------------------------------------------------


def test_tokens_are_required_checked_and_stored_hashed(main: Served) -> None:
    protected = [("GET", "/agents"), ("GET", "/agents/alpha"), ("GET", "/runs"), ("GET", "/tools"),
                 ("GET", "/metrics"), ("GET", "/agents/alpha/logs"), ("POST", "/agents/alpha/start")]
    for method, path in protected:
        for headers in ({}, {"Authorization": "Bearer ao_not-a-token"}, {"Authorization": "Bearer "},
                        {"Authorization": f"Basic {main.tokens['admin']}"}, {"Authorization": main.tokens["admin"]}):
            reply = main.api(method, path, headers=headers)
            assert reply.status == 401, (method, path, headers, reply.body)
            assert reply.error()["code"] == "unauthorized"
    # A bad token is refused on the open paths too, rather than ignored.
    assert main.request("GET", "/metrics", token="ao_not-a-token").status == 401

    conn = sqlite3.connect(main.home / "state.sqlite")
    try:
        rows = conn.execute("SELECT * FROM tokens").fetchall()
    finally:
        conn.close()
    stored = "\n".join(str(value) for row in rows for value in row)
    for role, token in main.tokens.items():
        assert token not in stored, f"the {role} token is stored in plain text"
        assert hashlib.sha256(token.encode()).hexdigest() in stored
    assert (main.home / "state.sqlite").read_bytes().find(main.tokens["admin"].encode()) == -1


def test_viewer_reads_but_cannot_write_start_stop_or_run(main: Served) -> None:
    before = head(main.source)
    for path in ("/agents", "/agents/alpha", "/runs", "/tools", "/metrics", "/agents/alpha/logs"):
        assert main.api("GET", path, role="viewer").status == 200, path
    etag = main.api("GET", "/agents/alpha", role="viewer").json["etag"]
    spec = {"name": "alpha", "model": "llama2", "description": "changed by a viewer"}
    attempts: list[tuple[str, str, dict[str, Any]]] = [
        ("POST", "/agents", {"body": {"name": "by-viewer", "model": "llama2", "description": "x"}}),
        ("PUT", "/agents/alpha", {"body": spec, "headers": {"If-Match": etag}}),
        ("DELETE", "/agents/alpha", {"headers": {"If-Match": etag}}),
        ("POST", "/agents/quick/start", {}), ("POST", "/agents/quick/stop", {}), ("POST", "/agents/quick/runs", {}),
    ]
    for method, path, kwargs in attempts:
        reply = main.api(method, path, role="viewer", **kwargs)
        assert reply.status == 403, (method, path, reply.body)
        assert reply.error()["code"] == "forbidden"
    assert head(main.source) == before
    assert main.api("GET", "/agents/quick", role="viewer").json["suspended"] is False


def test_operator_runs_starts_and_stops_but_cannot_write_specs(main: Served) -> None:
    before = head(main.source)
    etag = main.api("GET", "/agents/alpha", role="operator").json["etag"]
    for method, path, kwargs in [
        ("POST", "/agents", {"body": {"name": "by-operator", "model": "llama2", "description": "x"}}),
        ("PUT", "/agents/alpha", {"body": {"name": "alpha", "model": "llama2"}, "headers": {"If-Match": etag}}),
        ("DELETE", "/agents/alpha", {"headers": {"If-Match": etag}}),
    ]:
        reply = main.api(method, path, role="operator", **kwargs)
        assert reply.status == 403, (method, path, reply.body)
        assert "admin" in reply.error()["message"]
    assert head(main.source) == before

    ran = run_now(main, "quick", "hello")
    assert main.wait_run(ran)["status"] == "succeeded"

    stopped = main.api("POST", "/agents/quick/stop", role="operator")
    assert stopped.status == 200, stopped.body
    assert stopped.json == {"name": "quick", "suspended": True, "stopping_runs": 0}
    assert main.api("GET", "/agents/quick", role="viewer").json["suspended"] is True

    started = main.api("POST", "/agents/quick/start", role="operator")
    assert started.status == 202, started.body
    assert main.api("GET", "/agents/quick", role="viewer").json["suspended"] is False
    row = main.wait_run(started.json["run_id"])
    assert row["status"] == "succeeded" and row["requested_by"] == "api:operator-default"

    for op in ("start", "stop", "runs"):
        missing = main.api("POST", f"/agents/no-such-agent/{op}", role="operator")
        assert missing.status == 404, (op, missing.body)
        assert missing.error()["code"] == "not_found"


# -- reading agents, runs, events, logs, tools ---------------------------------------------------------


def test_agents_list_get_and_cursor_paging(main: Served) -> None:
    listed = names(main.api("GET", "/agents", role="viewer"))
    assert {"alpha", "beta", "gamma", "quick", "sleeper", "tooly"} <= set(listed)
    assert listed == sorted(listed)

    paged: list[str] = []
    cursor = None
    for _ in range(len(listed) + 1):
        reply = main.api("GET", "/agents?limit=2" + (f"&cursor={cursor}" if cursor else ""), role="viewer")
        page = names(reply)
        assert len(page) <= 2
        paged += page
        cursor = reply.json["next_cursor"]
        if cursor is None:
            break
    assert paged == listed

    alpha = main.api("GET", "/agents/alpha", role="viewer")
    assert alpha.status == 200
    body = alpha.json
    assert body["name"] == "alpha" and body["state"] == "Ready" and body["spec"]["model"] == "llama2"
    assert body["etag"] == blob(main.source, "specs/alpha.yaml")
    assert alpha.headers["ETag"].strip('"') == body["etag"]
    assert len(body["applied_revision"]) == 40 and body["conditions"] and body["last_run"] is None

    missing = main.api("GET", "/agents/no-such-agent", role="viewer")
    assert missing.status == 404 and missing.error()["code"] == "not_found"
    for bad in ("limit=0", "limit=abc", "limit=1001", "limit=100000"):
        assert main.api("GET", f"/agents?{bad}", role="viewer").status == 400, bad


def test_a_run_through_the_api_its_row_events_filters_and_pages(main: Served) -> None:
    ids = [run_now(main, "tooly", f"run {i}") for i in range(3)]
    rows = [main.wait_run(run_id) for run_id in ids]
    assert [r["status"] for r in rows] == ["succeeded"] * 3
    first = rows[0]
    assert first["agent"] == "tooly" and first["input"] == "run 0" and first["output"] == "read it"
    assert (first["input_tokens"], first["output_tokens"]) == (50, 10)
    assert first["requested_by"] == "api:operator-default" and first["trigger"] == "manual"

    mine = main.api("GET", "/runs?agent=tooly", role="viewer")
    assert mine.status == 200
    listed = [r["run_id"] for r in mine.json["runs"]]
    assert listed == sorted(ids, reverse=True), mine.json
    assert {r["agent"] for r in mine.json["runs"]} == {"tooly"}

    assert ids[0] in [r["run_id"] for r in main.api("GET", "/runs?status=succeeded&agent=tooly",
                                                   role="viewer").json["runs"]]
    assert main.api("GET", "/runs?status=failed&agent=tooly", role="viewer").json["runs"] == []
    # The three may start in any order (and overlap): `since` takes the runs started at or after it.
    last_start = max(r["started_at"] for r in rows)
    since = main.api("GET", f"/runs?agent=tooly&since={last_start}", role="viewer").json["runs"]
    started_since = sorted((r["run_id"] for r in rows if r["started_at"] >= last_start), reverse=True)
    assert [r["run_id"] for r in since] == started_since, (rows, since)
    assert main.api("GET", "/runs?since=2999-01-01", role="viewer").json["runs"] == []

    paged: list[str] = []
    cursor = None
    for _ in range(5):
        reply = main.api("GET", "/runs?agent=tooly&limit=1" + (f"&cursor={cursor}" if cursor else ""), role="viewer")
        assert reply.status == 200 and len(reply.json["runs"]) == 1
        paged.append(reply.json["runs"][0]["run_id"])
        cursor = reply.json["next_cursor"]
        if cursor is None:
            break
    assert paged == listed

    for bad in ("status=nope", "limit=0", "limit=1001", "limit=100000", "limit=x"):
        reply = main.api("GET", f"/runs?{bad}", role="viewer")
        assert reply.status == 400, (bad, reply.body)
        assert reply.error()["details"]

    # Lists are cached for a second: a value under one filter's name must not answer for another's.
    assert main.api("GET", "/runs?agent=succeeded", role="viewer").json["runs"] == []
    succeeded = main.api("GET", "/runs?agent=tooly&status=succeeded", role="viewer").json["runs"]
    assert sorted(r["run_id"] for r in succeeded) == sorted(ids)

    one = main.api("GET", f"/runs/{ids[0]}", role="viewer")
    assert one.status == 200 and one.json["run_id"] == ids[0] and one.json["status"] == "succeeded"
    assert main.api("GET", "/runs/0123456789abcdef01234567", role="viewer").status == 404

    events = main.api("GET", f"/runs/{ids[0]}/events", role="viewer")
    assert events.status == 200, events.body
    listed_events = events.json["events"]
    assert [e["seq"] for e in listed_events] == list(range(1, len(listed_events) + 1))
    tool_calls = [(e["name"], e["decision"]) for e in listed_events if e["kind"] == "tool_call"]
    assert tool_calls == [("file_reader", "allowed"), ("file_reader", "denied")]
    assert listed_events[-1]["kind"] == "status" and listed_events[-1]["name"] == "succeeded"
    later = main.api("GET", f"/runs/{ids[0]}/events?after=2&limit=2", role="viewer").json["events"]
    assert [e["seq"] for e in later] == [3, 4]
    assert main.api("GET", "/runs/0123456789abcdef01234567/events", role="viewer").status == 404
    assert main.api("GET", f"/runs/{ids[0]}/events?limit=100000", role="viewer").status == 400


def test_logs_page_by_offset_and_limit_and_filter_by_run(main: Served) -> None:
    ran = run_now(main, "tooly", "for the log")
    main.wait_run(ran)
    path = main.home / "logs" / "agents" / "tooly.log"
    whole = poll(lambda: path.read_bytes() if f" run={ran} ".encode() in path.read_bytes() else None,
                 "the run's lines in the agent log")
    lines = whole.decode().splitlines()

    everything = main.api("GET", "/agents/tooly/logs", role="viewer").json
    assert everything["offset"] == 0 and everything["lines"][: len(lines)] == lines

    limit = max(len(line.encode()) + 1 for line in lines)
    assert len(whole) > 2 * limit
    paged: list[str] = []
    offset, pages = 0, 0
    while True:
        page = main.api("GET", f"/agents/tooly/logs?offset={offset}&limit={limit}", role="viewer")
        assert page.status == 200, page.body
        body = page.json
        assert body["offset"] == offset and body["next_offset"] - offset <= limit
        paged += body["lines"]
        pages += 1
        if body["next_offset"] >= len(whole):
            break
        assert not body["eof"] and body["next_offset"] > offset
        offset = body["next_offset"]
    assert pages > 2
    assert paged[: len(lines)] == lines, "pages end on whole lines and together are the log"

    only = main.api("GET", f"/agents/tooly/logs?run={ran}", role="viewer").json["lines"]
    assert only and only == [line for line in lines if f" run={ran} " in line]
    beyond = main.api("GET", f"/agents/tooly/logs?offset={10**9}", role="viewer").json
    assert beyond["lines"] == [] and beyond["eof"] is True
    assert main.api("GET", "/agents/no-such-agent/logs", role="viewer").status == 404
    for bad in ("offset=-1", "limit=0", f"limit={2 * 1024 * 1024}", "offset=x"):
        assert main.api("GET", f"/agents/tooly/logs?{bad}", role="viewer").status == 400, bad


def test_tools_lists_builtins_and_the_sources_custom_tools(main: Served) -> None:
    reply = main.api("GET", "/tools", role="viewer")
    assert reply.status == 200
    tools = {t["name"]: t for t in reply.json["tools"]}
    builtins = {"file_reader", "file_writer", "data_analyzer", "http_get", "shell", "memory_search", "memory_save"}
    assert builtins <= set(tools)
    assert all(tools[name]["kind"] == "builtin" for name in builtins)
    assert "read" in tools["file_reader"]["permissions"]
    assert tools["peek"]["kind"] == "custom" and tools["peek"]["permissions"] == ["read"]
    assert tools["peek"]["error"] is None


# -- stop, start and the runs-in-flight gauge ------------------------------------------------------------


def test_stop_ends_a_running_run_and_the_gauge_follows(main: Served) -> None:
    run_id = run_now(main, "sleeper")

    def running() -> bool:
        row = main.api("GET", f"/runs/{run_id}", role="viewer").json
        return bool(row["status"] == "running"
                    and sample(metrics(main), "agent_orch_runs_in_flight", "agent_orch_runs_in_flight",
                               client="default") == 1)

    poll(running, "the sleeper to be running and counted in flight")
    stopped = main.api("POST", "/agents/sleeper/stop", role="operator")
    assert stopped.status == 200 and stopped.json["stopping_runs"] == 1, stopped.body
    assert main.wait_run(run_id)["status"] == "stopped"
    poll(lambda: sample(metrics(main), "agent_orch_runs_in_flight", "agent_orch_runs_in_flight",
                        client="default") == 0, "the gauge to drop to 0")
    assert main.api("GET", "/agents/sleeper", role="viewer").json["suspended"] is True


# -- writes are commits ---------------------------------------------------------------------------------


def test_post_commits_the_spec_and_the_agent_appears(main: Served) -> None:
    before = head(main.source)
    spec = {"name": "made", "description": "made through the API", "model": "llama2",
            "triggers": [{"type": "schedule", "cron": "0 3 * * *"}]}
    reply = main.api("POST", "/agents", role="admin", body={"spec": spec})
    assert reply.status == 201, reply.body
    made = reply.json
    assert made["name"] == "made" and made["path"] == "made.yaml" and made["warnings"] == []

    assert head(main.source) == made["commit"]
    assert git(main.source, "rev-parse", f"{made['commit']}^") == before
    assert last_commit(main.source) == {"author": "admin-default", "subject": "API: create agent made",
                                        "body": "by admin-default (admin)"}
    changed = git(main.source, "diff", "--name-status", before, made["commit"])
    assert changed == "A\tspecs/made.yaml"
    assert blob(main.source, "specs/made.yaml") == made["etag"]
    assert spec_at_head(main.source, "made") == spec

    def applied() -> dict[str, Any] | None:
        got = main.api("GET", "/agents/made", role="viewer")
        return got.json if got.status == 200 and got.json["next_run"] else None

    agent = poll(applied, "the created agent to be reconciled, its schedule armed")
    assert agent["state"] == "Ready" and agent["etag"] == made["etag"]
    assert agent["applied_revision"] == made["commit"]

    again = main.api("POST", "/agents", role="admin", body=spec)  # the bare form: the same name is a conflict
    assert again.status == 409 and again.error()["code"] == "conflict"
    assert head(main.source) == made["commit"]


def test_an_invalid_spec_is_422_with_every_problem_and_no_commit(main: Served) -> None:
    before = head(main.source)
    spec = {"name": "broken", "model": "llama2", "descripton": "typo", "tools": [{"name": "no_such_tool"}],
            "constraints": {"max_tokens": -1}, "overlap": "sometimes"}
    reply = main.api("POST", "/agents", role="admin", body=spec)
    assert reply.status == 422, reply.body
    error = reply.error()
    assert error["code"] == "invalid_spec" and "nothing was committed" in error["message"]
    fields = {p["field"] for p in error["details"] if p["severity"] == "error"}
    assert {"descripton", "tools[0].name", "constraints.max_tokens", "overlap"} <= fields, error["details"]
    assert all({"file", "line", "col", "field", "message"} <= set(p) for p in error["details"])
    assert next(p for p in error["details"] if p["field"] == "descripton")["message"].find("description") >= 0

    for bad in ({"name": "Bad Name", "model": "llama2"}, {"model": "llama2"}, {"name": "x1\n", "model": "llama2"}):
        reply = main.api("POST", "/agents", role="admin", body=bad)
        assert reply.status == 422, (bad, reply.body)
        assert reply.error()["details"]
    assert main.api("POST", "/agents", role="admin", body={"spec": [1, 2]}).status == 400
    assert head(main.source) == before
    assert blob(main.source, "specs/broken.yaml") is None


def test_put_needs_if_match_and_a_stale_etag_is_409(main: Served) -> None:
    files = {"specs/edited.yaml": {"name": "edited", "description": "v1", "model": "llama2"}}
    commit_outside_the_api(main.source, files, "add edited")
    assert main.request("POST", "/agents/v1/hooks/git", headers={"X-Gitlab-Token": SECRET}).status == 202
    etag = poll(lambda: main.api("GET", "/agents/edited", role="viewer").headers["ETag"], "edited to be applied")
    etag = etag.strip('"')
    before = head(main.source)

    v2 = {"name": "edited", "description": "v2", "model": "llama2"}
    missing = main.api("PUT", "/agents/edited", role="admin", body=v2)
    assert missing.status == 428 and missing.error()["code"] == "precondition_required"
    stale = main.api("PUT", "/agents/edited", role="admin", body=v2, headers={"If-Match": "0" * 40})
    assert stale.status == 409 and stale.error()["code"] == "conflict"
    renamed = main.api("PUT", "/agents/edited", role="admin", body={**v2, "name": "other"},
                       headers={"If-Match": etag})
    assert renamed.status == 400
    invalid = main.api("PUT", "/agents/edited", role="admin", body={**v2, "model": ""}, headers={"If-Match": etag})
    assert invalid.status == 422
    assert main.api("PUT", "/agents/no-such-agent", role="admin", body={**v2, "name": "no-such-agent"},
                    headers={"If-Match": etag}).status == 404
    assert head(main.source) == before

    ok = main.api("PUT", "/agents/edited", role="admin", body=v2, headers={"If-Match": f'"{etag}"'})
    assert ok.status == 200, ok.body
    assert ok.json["etag"] != etag and ok.json["etag"] == blob(main.source, "specs/edited.yaml")
    assert head(main.source) == ok.json["commit"]
    assert last_commit(main.source)["subject"] == "API: update agent edited"
    assert last_commit(main.source)["author"] == "admin-default"
    assert spec_at_head(main.source, "edited") == v2
    poll(lambda: main.api("GET", "/agents/edited", role="viewer").json["spec"]["description"] == "v2",
         "the update to be reconciled")

    again = main.api("PUT", "/agents/edited", role="admin", body={**v2, "description": "v3"},
                     headers={"If-Match": etag})
    assert again.status == 409, "the ETag read before the update is stale now"
    assert head(main.source) == ok.json["commit"]


def test_concurrent_puts_with_one_etag_make_one_commit_and_one_409(main: Served) -> None:
    reply = main.api("POST", "/agents", role="admin", body={"name": "raced", "description": "v0", "model": "llama2"})
    assert reply.status == 201, reply.body
    etag = reply.json["etag"]
    poll(lambda: main.api("GET", "/agents/raced", role="viewer").status == 200, "raced to be applied")

    for round_ in range(4):
        before = head(main.source)
        replies = concurrent_puts(main, "raced", etag, [f"round {round_} writer {k}" for k in range(2)])
        statuses = sorted(r.status for r in replies.values())
        assert statuses == [200, 409], {k: (r.status, r.body) for k, r in replies.items()}
        winner = next(text for text, r in replies.items() if r.status == 200)
        assert git(main.source, "rev-list", "--count", f"{before}..refs/heads/main") == "1"
        assert spec_at_head(main.source, "raced")["description"] == winner
        assert git(main.source, "ls-tree", "-r", "--name-only", "refs/heads/main", "specs").count(".yaml") >= 6
        etag = replies[winner].json["etag"]
    assert not list(main.source.glob(".agentctl-index-*")), "a write left its index file behind"


def concurrent_puts(served: Served, name: str, etag: str, descriptions: list[str]) -> dict[str, Reply]:
    """PUTs of ``name`` with one ETag, released together; the reply to each, by description."""
    barrier = threading.Barrier(len(descriptions))
    replies: dict[str, Reply] = {}

    def put(text: str) -> None:
        barrier.wait(timeout=10)
        replies[text] = served.api("PUT", f"/agents/{name}", role="admin", headers={"If-Match": etag},
                                   body={"name": name, "description": text, "model": "llama2"})

    threads = [threading.Thread(target=put, args=(text,)) for text in descriptions]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    return replies


def test_delete_needs_if_match_removes_the_file_and_the_agent(main: Served) -> None:
    reply = main.api("POST", "/agents", role="admin", body={"name": "doomed", "description": "x", "model": "llama2"})
    assert reply.status == 201, reply.body
    etag = reply.json["etag"]
    poll(lambda: main.api("GET", "/agents/doomed", role="viewer").status == 200, "doomed to be applied")
    before = head(main.source)

    assert main.api("DELETE", "/agents/doomed", role="admin").status == 428
    assert main.api("DELETE", "/agents/doomed", role="admin", headers={"If-Match": "f" * 40}).status == 409
    assert head(main.source) == before

    gone = main.api("DELETE", "/agents/doomed", role="admin", headers={"If-Match": etag})
    assert gone.status == 200, gone.body
    assert gone.json["deleted"] is True and gone.json["commit"] == head(main.source)
    assert blob(main.source, "specs/doomed.yaml") is None
    assert git(main.source, "diff", "--name-status", before, gone.json["commit"]) == "D\tspecs/doomed.yaml"
    assert last_commit(main.source)["subject"] == "API: delete agent doomed"
    poll(lambda: main.api("GET", "/agents/doomed", role="viewer").status == 404, "doomed to disappear")
    assert "doomed" not in names(main.api("GET", "/agents", role="viewer"))
    assert main.api("DELETE", "/agents/doomed", role="admin", headers={"If-Match": etag}).status == 404


# -- the webhook ---------------------------------------------------------------------------------------


def test_the_webhook_checks_github_gitea_and_gitlab_signatures(main: Served) -> None:
    body = json.dumps({"ref": "refs/heads/main", "after": "0" * 40}).encode()
    digest = hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    wrong = hmac.new(b"not the secret", body, hashlib.sha256).hexdigest()
    hook = "/agents/v1/hooks/git"

    for headers in ({}, {"X-Hub-Signature-256": f"sha256={wrong}"}, {"X-Hub-Signature-256": digest},
                    {"X-Gitea-Signature": wrong}, {"X-Gitlab-Token": "guess"},
                    {"X-Hub-Signature-256": f"sha256={hmac.new(SECRET.encode(), b'other', 'sha256').hexdigest()}"}):
        reply = main.request("POST", hook, data=body, headers=headers)
        assert reply.status == 401, (headers, reply.body)
        assert reply.error()["code"] == "unauthorized"
    # With a secret set, the signature is what counts: an operator's token alone does not do.
    assert main.request("POST", hook, data=body, role="operator").status == 401
    # A client this daemon does not serve gets the same 401 as a bad signature: client ids cannot be probed.
    for query in ("?client_id=nobody", "?client_id=default"):
        reply = main.request("POST", hook + query, data=body, headers={"X-Gitea-Signature": wrong})
        assert reply.status == 401 and reply.error()["code"] == "unauthorized", reply.body
    assert main.request("POST", hook + "?client_id=nobody", data=body, headers={"X-Gitea-Signature": digest}
                        ).status == 401

    signed = [{"X-Hub-Signature-256": f"sha256={digest}"}, {"X-Gitea-Signature": digest},
              {"X-Gitlab-Token": SECRET}]
    for k, headers in enumerate(signed):
        name = f"hooked{k}"
        commit_outside_the_api(main.source, {f"specs/{name}.yaml": {"name": name, "model": "llama2",
                                                                    "description": "pushed"}}, f"add {name}")
        assert main.api("GET", f"/agents/{name}", role="viewer").status == 404
        reply = main.request("POST", hook, data=body, headers=headers)
        assert reply.status == 202, (headers, reply.body)
        assert reply.json == {"reconcile": "requested", "client_id": "default"}
        poll(lambda n=name: main.api("GET", f"/agents/{n}", role="viewer").status == 200,  # type: ignore[misc]
             f"the hook to reconcile {name}")


# -- bounded input -------------------------------------------------------------------------------------


def test_bad_and_oversized_input_is_a_4xx_in_the_error_shape(main: Served) -> None:
    before = head(main.source)

    def post(data: bytes, path: str = "/agents") -> dict[str, Any]:
        reply = main.api("POST", path, role="admin", data=data, headers={"Content-Type": "application/json"})
        assert 400 <= reply.status < 500, (reply.status, reply.body[:300])
        return {"status": reply.status, **reply.error()}

    huge = json.dumps({"name": "huge", "model": "llama2", "description": "x" * (1024 * 1024 + 10)}).encode()
    assert post(huge)["status"] == 413
    assert post(huge, "/agents/quick/runs")["status"] == 413
    assert post(b'{"name": "x",')["code"] == "bad_json"
    assert post(b"\xff\xfe{}")["code"] == "bad_json"
    assert post(b"")["status"] == 400
    assert post(b"[1, 2]")["code"] == "bad_json"
    deep = b'{"a": ' * 100 + b"1" + b"}" * 100
    assert post(deep)["code"] == "too_deep"
    very_deep = b'{"a": ' * 100_000 + b"1" + b"}" * 100_000
    assert post(very_deep)["code"] == "too_deep"
    assert post(json.dumps({"name": "long", "model": "llama2", "description": "y" * 100_000}).encode())["code"] == \
        "too_long"
    assert post(json.dumps({"input": "z" * 100_000}).encode(), "/agents/quick/runs")["code"] == "too_long"
    assert post(b'{"input": "\\ud800 alone"}', "/agents/quick/runs")["status"] == 400
    assert post(b'{"input": 42}', "/agents/quick/runs")["status"] == 400
    for path in ("/agents?limit=100000", "/runs?limit=100000", "/agents/quick/logs?limit=100000000"):
        reply = main.api("GET", path, role="viewer")
        assert reply.status == 400 and reply.error()["details"], path
    assert head(main.source) == before
    assert main.request("GET", "/healthz").json["status"] == "ok"


# -- the audit ---------------------------------------------------------------------------------------


def test_every_request_is_audited_by_token_name_never_by_token(main: Served) -> None:
    seen = f"/agents/v1/agents/audited-{uuid.uuid4().hex[:8]}"
    assert main.request("GET", seen, role="viewer").status == 404
    refused = f"/agents/v1/runs/{uuid.uuid4().hex[:24]}"
    assert main.request("GET", refused).status == 401

    def audited() -> list[tuple[Any, ...]] | None:
        try:
            con = duckdb.connect(str(main.home / "runs.duckdb"), read_only=True)
        except duckdb.IOException:
            return None  # the daemon is flushing right now
        try:
            rows = con.execute("SELECT target, client_id, actor, action, outcome FROM audit WHERE target IN (?, ?) "
                               "ORDER BY ts", [seen, refused]).fetchall()
            leaked = con.execute("SELECT count(*) FROM audit WHERE " + " OR ".join(
                ["contains(coalesce(target, '') || coalesce(CAST(detail AS VARCHAR), '') || coalesce(actor, ''), ?)"]
                * len(main.tokens)), list(main.tokens.values())).fetchone()
        except duckdb.CatalogException:
            return None
        finally:
            con.close()
        assert leaked == (0,), "a token reached the audit table"
        return rows if len(rows) == 2 else None

    rows = {row[0]: row for row in poll(audited, "both requests in the audit table")}  # one batch: any order
    assert rows[seen] == (seen, "default", "viewer-default", "GET /agents/v1/agents/{name}", "404")
    assert rows[refused][:3] == (refused, "default", None) and rows[refused][3].startswith("GET ")
    assert rows[refused][4] == "401"


# -- metrics ------------------------------------------------------------------------------------------


def test_metrics_parse_and_pass_promtool(main: Served) -> None:
    def tooly(families: dict[str, Any]) -> tuple[float, float, float]:
        runs = sample(families, "agent_orch_runs", "agent_orch_runs_total", client="default", agent="tooly",
                      status="succeeded")
        calls = [sample(families, "agent_orch_tool_calls", "agent_orch_tool_calls_total", client="default",
                        tool="file_reader", decision=decision) for decision in ("allowed", "denied")]
        return runs or 0.0, calls[0] or 0.0, calls[1] or 0.0

    before = tooly(metrics(main))
    run_id = run_now(main, "tooly", "for the metrics")
    main.wait_run(run_id)
    assert main.api("GET", f"/runs/{run_id}/events", role="viewer").status == 200  # flushes from the API thread
    assert main.api("GET", "/agents/no-such-agent", role="viewer").status == 404

    def counted() -> dict[str, Any] | None:
        families = metrics(main)
        after = tooly(families)
        return families if all(a >= b + 1 for a, b in zip(after, before, strict=True)) else None

    families = poll(counted, "the run, its allowed and its denied tool call to be counted")
    assert sample(families, "agent_orch_api_requests", "agent_orch_api_requests_total", method="GET",
                  route="/agents/v1/agents/{name}", status="404")
    assert sample(families, "agent_orch_api_requests", "agent_orch_api_requests_total", method="POST",
                  route="/agents/v1/agents/{name}/runs", status="202")
    assert sample(families, "agent_orch_runs_in_flight", "agent_orch_runs_in_flight", client="default") == 0
    assert sample(families, "agent_orch_agents", "agent_orch_agents", client="default", state="Ready")

    scoped = main.api("GET", "/metrics", role="viewer")
    assert scoped.status == 200 and "agent_orch_runs_total" in scoped.text
    assert main.api("GET", "/metrics").status == 401

    promtool = shutil.which("promtool", path=str(Path(ROOT / ".venv" / "bin"))) or shutil.which("promtool")
    assert promtool, "promtool is needed (.venv/bin/promtool)"
    checked = subprocess.run([promtool, "check", "metrics"], input=main.request("GET", "/metrics").body,
                             capture_output=True, timeout=30, check=False)
    assert checked.returncode == 0, checked.stdout.decode() + checked.stderr.decode()


# -- two clients --------------------------------------------------------------------------------------


def test_clients_of_one_daemon_never_learn_each_others_names(main: Served, tmp_path: Path) -> None:
    """One daemon serving 'default' and 'other' (the settings file's clients section), each its own source.

    A token picks its client; the other client's agents and runs are 404 with the very answer a name that
    does not exist gets. A token of a client this daemon does not serve is 401. The daemon has no webhook
    secret, so its hook takes an operator's token.
    """
    data = tmp_path / "data"
    data.mkdir()
    (data / "note.txt").write_text("note\n")
    reader: list[dict[str, Any]] = [{"tool_calls": [{"name": "file_reader", "args": {"path": str(data / "note.txt")}}]},
              {"content": "read"}]
    default_repo = make_repo(tmp_path / "repo-default", {
        **scripted("quick", [{"content": "done"}]),
        "specs/alpha.yaml": {"name": "alpha", "model": "llama2", "description": "ours"}})
    other_repo = make_repo(tmp_path / "repo-other", {
        **scripted("hidden", reader, tools=[{"name": "file_reader", "paths": [str(data)]}])})
    daemon = two_clients(tmp_path, default_repo, other_repo)
    try:
        ours = {role: daemon.token(role, f"{role}-ours") for role in ("viewer", "operator", "admin")}
        theirs = {role: daemon.token(role, f"{role}-theirs", "other") for role in ("viewer", "operator", "admin")}
        stranger = daemon.token("admin", "stranger", "third")  # a client this daemon does not serve

        def ask(token: str, method: str, path: str, **kwargs: Any) -> Reply:
            return daemon.api(method, path, token=token, **kwargs)

        assert daemon.request("GET", "/healthz", token=theirs["viewer"]).json["client"]["client_id"] == "other"
        assert ask(stranger, "GET", "/agents").status == 401
        assert names(ask(ours["viewer"], "GET", "/agents")) == ["alpha", "quick"]
        assert names(ask(theirs["viewer"], "GET", "/agents")) == ["hidden"]

        our_run = ask(ours["operator"], "POST", "/agents/quick/runs", body={"input": "ours"}).json["run_id"]
        their_run = ask(theirs["operator"], "POST", "/agents/hidden/runs", body={"input": "theirs"}).json["run_id"]
        for token, run_id in ((ours["viewer"], our_run), (theirs["viewer"], their_run)):
            poll(lambda t=token, r=run_id: ask(t, "GET", f"/runs/{r}").json["status"] == "succeeded",  # type: ignore[misc]
                 f"run {run_id} to succeed")
        assert [r["run_id"] for r in ask(ours["viewer"], "GET", "/runs").json["runs"]] == [our_run]
        assert [r["run_id"] for r in ask(theirs["viewer"], "GET", "/runs").json["runs"]] == [their_run]

        def probes(name: str, run_id: str, etag: str) -> list[tuple[str, str, dict[str, Any]]]:
            return [("GET", f"/agents/{name}", {}), ("GET", f"/agents/{name}/logs", {}),
                    ("PUT", f"/agents/{name}", {"body": {"name": name, "model": "llama2"},
                                                "headers": {"If-Match": etag}}),
                    ("DELETE", f"/agents/{name}", {"headers": {"If-Match": etag}}),
                    ("POST", f"/agents/{name}/start", {}), ("POST", f"/agents/{name}/stop", {}),
                    ("POST", f"/agents/{name}/runs", {}), ("GET", f"/runs/{run_id}", {}),
                    ("GET", f"/runs/{run_id}/events", {}), ("GET", f"/runs?agent={name}", {})]

        for token, (name, run_id, repo) in ((theirs["admin"], ("alpha", our_run, default_repo)),
                                            (ours["admin"], ("hidden", their_run, other_repo))):
            before = head(repo)
            etag = str(blob(repo, f"specs/{name}.yaml"))
            for (method, path, kwargs), (_, nobody, _) in zip(probes(name, run_id, etag),
                                                              probes("nobody", "f" * 24, etag), strict=True):
                known, unknown = ask(token, method, path, **kwargs), ask(token, method, nobody, **kwargs)
                assert known.status == unknown.status, (method, path, known.body, unknown.body)
                if known.status == 200:  # the run list: empty either way
                    assert known.json == unknown.json == {"runs": [], "next_cursor": None}
                    continue
                assert known.status == 404, (method, path, known.body)
                assert known.error()["code"] == unknown.error()["code"] == "not_found"
                assert known.error()["message"].replace(name, "nobody").replace(run_id, "f" * 24) == \
                    unknown.error()["message"]
            assert head(repo) == before
        assert ask(ours["viewer"], "GET", "/agents/alpha").json["suspended"] is False

        # The same name in the other client is a different agent, in the other client's repository.
        made = ask(theirs["admin"], "POST", "/agents", body={"name": "alpha", "model": "llama2", "description": "x"})
        assert made.status == 201 and head(other_repo) == made.json["commit"]
        assert blob(default_repo, "specs/alpha.yaml") != made.json["etag"]

        # Metrics label each client's tool calls with its own client.
        def tool_calls(token: str) -> dict[str, float]:
            families = metrics(daemon, token)
            return {s.labels["client"]: s.value for s in families["agent_orch_tool_calls"].samples
                    if s.name == "agent_orch_tool_calls_total"}

        assert poll(lambda: tool_calls(theirs["viewer"]), "the other client's tool call to be counted") == \
            {"other": 1.0}
        assert tool_calls(ours["viewer"]) == {}  # (tests/test_tenants.py checks the metrics of clients closely)

        # No webhook secret here: the hook needs an operator's token, and reconciles that token's client.
        assert daemon.request("POST", "/agents/v1/hooks/git").status == 401
        assert daemon.request("POST", "/agents/v1/hooks/git?client_id=other").json == \
            daemon.request("POST", "/agents/v1/hooks/git?client_id=nobody").json
        assert daemon.request("POST", "/agents/v1/hooks/git", token=theirs["viewer"]).status == 403
        hooked = daemon.request("POST", "/agents/v1/hooks/git", token=theirs["operator"])
        assert hooked.status == 202 and hooked.json["client_id"] == "other"
        assert daemon.request("POST", "/agents/v1/hooks/git", token=stranger).status == 401
        assert ask(main.tokens["admin"], "GET", "/agents").status == 401  # a token of another home
    finally:
        daemon.stop()


def test_credentials_in_the_source_url_never_reach_a_client(tmp_path: Path) -> None:
    """A remote source that cannot be reached, its URL carrying a token: the API shows it masked."""
    url = "https://bob:s3cret-pat@127.0.0.1:9/specs.git"
    daemon = Served(tmp_path / "home", tmp_path / "unused", tmp_path / "daemon.log", env={"AGENT_ORCH_SOURCE": url},
                    source_env=False, ready=("degraded",)).start()
    try:
        admin = daemon.token("admin", "admin")
        health = daemon.request("GET", "/healthz", token=admin)
        assert health.json["client"]["source"].startswith("https://***@127.0.0.1:9/specs.git")
        assert health.json["client"]["error"]
        write = daemon.api("POST", "/agents", token=admin, body={"name": "x1", "model": "llama2", "description": "x"})
        assert 400 <= write.status < 600 and write.status != 500, write.body
        write.error()
        for reply in (health, write, daemon.api("GET", "/agents", token=admin)):
            assert "s3cret" not in reply.text, reply.text
    finally:
        daemon.stop()


def test_no_request_of_this_module_was_answered_with_a_5xx(main: Served) -> None:
    families = metrics(main)
    statuses = {s.labels["status"] for s in families["agent_orch_api_requests"].samples}
    assert statuses and not {s for s in statuses if s.startswith("5")}, statuses
    assert "internal error" not in main.log()
