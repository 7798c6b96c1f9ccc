"""Event triggers end to end: webhooks, run_completed chains and the deliveries ledger, against a real daemon on a
free port with real spec repositories. Every wait is a bounded poll; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_helpers import Reply, Served, make_repo, poll, scripted, serve
from conftest import ROOT
from daemon_helpers import ledger_rows, wait_ledger

SECRET = "s3cret-for-tests"
HOOK = "/agents/v1/hooks/events/default"


def webhook(**fields: Any) -> dict[str, Any]:
    return {"type": "webhook", "secret_env": "HOOK_SECRET", **fields}


def sign(body: bytes, secret: str = SECRET) -> str:
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


def post(served: Served, name: str, payload: Any, *, secret: str | None = SECRET, client: str = "default",
         headers: dict[str, str] | None = None, raw: bytes | None = None) -> Reply:
    body = raw if raw is not None else json.dumps(payload).encode()
    sent = {"Content-Type": "application/json", **(headers or {})}
    if secret is not None:
        sent["X-Hub-Signature-256"] = sign(body, secret)
    return served.request("POST", f"/agents/v1/hooks/events/{client}/{name}", data=body, headers=sent)


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("webhooks")
    secret_file = base / "bearer.secret"
    secret_file.write_text("bearer-secret\n")
    files: dict[str, Any] = {
        **scripted("hooked", [{"content": "got ${INPUT}"}], overlap="queue",
                   triggers=[webhook(dedupe="{{ headers['X-GitHub-Delivery'] }}")]),
        **scripted("bearer", [{"content": "bearer ok"}], overlap="queue",
                   triggers=[{"type": "webhook", "auth": "bearer", "secret_file": str(secret_file), "path": "b-hook"}]),
        **scripted("first", [{"content": "one"}], overlap="queue", triggers=[webhook(path="chain")]),
        **scripted("second", [{"content": "two after ${INPUT}"}], overlap="queue",
                   triggers=[{"type": "run_completed", "agent": "first"}]),
        **scripted("third", [{"content": "three after ${INPUT}"}], overlap="queue",
                   triggers=[{"type": "run_completed", "agent": "second", "status": ["succeeded"]}]),
        **scripted("echo", [{"content": "echo ${INPUT}"}], overlap="queue"),
        **scripted("flaky", [], overlap="queue", retry={"limit": 1, "on": ["failed"]},  # no turn: each run fails
                   triggers=[{"type": "run_completed", "agent": "first"}]),
        **scripted("twohooks", [{"content": "ok"}], overlap="queue",
                   triggers=[webhook(path="hook-a", dedupe="{{ headers['X-Delivery'] }}"),
                             {"type": "webhook", "secret_env": "OTHER_SECRET", "path": "hook-b",
                              "dedupe": "{{ headers['X-Delivery'] }}"}]),
        "specs/flow.yaml": {"kind": "workflow", "name": "flow", "description": "a webhook's workflow",
                            "inputs": {"topic": {"type": "string"}, "count": {"type": "integer", "default": 1}},
                            "triggers": [webhook(inputs={"topic": "{{ payload.topic }}",
                                                         "count": "{{ payload.n }}"})],
                            "steps": [{"id": "only", "agent": "echo", "input":
                                       "{{ inputs.topic }} x{{ inputs.count }} from {{ headers['x-sender'] }}"}]},
    }
    served = serve(base, files, env={"HOOK_SECRET": SECRET, "OTHER_SECRET": "other-secret"})
    try:
        yield served
    finally:
        served.stop()


def deliveries(served: Served, **query: str) -> list[dict[str, Any]]:
    qs = "&".join(f"{k}={v}" for k, v in query.items())
    reply = served.api("GET", f"/deliveries?{qs}", role="viewer")
    assert reply.status == 200, reply.body
    found: list[dict[str, Any]] = reply.json["deliveries"]
    return found


def test_a_signed_webhook_starts_a_run_with_the_payload_as_input(served: Served) -> None:
    reply = post(served, "hooked", {"action": "opened"}, headers={"X-GitHub-Delivery": "d-1"})
    assert reply.status == 202, reply.body
    answer = reply.json
    assert answer["decision"] == "started" and answer["delivery_id"].startswith("dlv_"), answer
    run = served.wait_run(answer["run_id"])
    assert run["status"] == "succeeded" and run["trigger"] == "webhook", run
    assert json.loads(run["input"]) == {"action": "opened"}
    assert run["output"] == 'got {"action": "opened"}'
    rows = wait_ledger(served.home, "SELECT * FROM deliveries WHERE delivery_id = ?", [answer["delivery_id"]],
                       until=lambda rows: bool(rows) and rows[0]["decision"] == "started",
                       what="the delivery in the ledger")
    assert rows[0]["run_id"] == answer["run_id"] and rows[0]["dedupe_key"] == "d-1"
    assert rows[0]["trigger"] == "webhook:hooked"


def test_a_bad_or_missing_signature_is_401_and_starts_nothing(served: Served) -> None:
    before = len(deliveries(served, trigger="hooked", limit="1000"))
    assert post(served, "hooked", {"x": 1}, secret="wrong").status == 401
    assert post(served, "hooked", {"x": 1}, secret=None).status == 401
    body = json.dumps({"x": 1}).encode()
    tampered = post(served, "hooked", None, raw=body + b" ", headers={"X-Hub-Signature-256": sign(body)},
                    secret=None)
    assert tampered.status == 401, tampered.body
    assert tampered.json["error"]["code"] == "unauthorized"
    assert len(deliveries(served, trigger="hooked", limit="1000")) == before  # refused attempts are no rows
    metrics = served.request("GET", "/metrics", role="viewer").body.decode()
    assert 'agent_orch_webhook_refused_total{client="default",reason="unauthenticated"} 3.0' in metrics
    assert 'agent_orch_deliveries_total{client="default",decision="started",trigger="webhook"}' in metrics


def test_unknown_names_clients_and_large_or_broken_bodies(served: Served) -> None:
    missing = post(served, "nobody", {"x": 1})
    other_client = post(served, "hooked", {"x": 1}, client="nobody")
    assert missing.status == other_client.status == 404
    assert missing.json["error"]["code"] == other_client.json["error"]["code"] == "not_found"
    big = post(served, "hooked", None, raw=b'{"a": "' + b"x" * (1024 * 1024 + 10) + b'"}')
    assert big.status == 413, big.status
    broken = post(served, "hooked", None, raw=b"{not json")
    assert broken.status == 400 and "not JSON" in broken.json["error"]["message"], broken.body
    assert any(d["decision"] == "rejected" and "not JSON" in (d["reason"] or "")
               for d in deliveries(served, trigger="hooked"))


def test_a_redelivery_answers_200_duplicate_and_starts_nothing_new(served: Served) -> None:
    first = post(served, "hooked", {"n": 1}, headers={"X-GitHub-Delivery": "same-id"})
    assert first.status == 202, first.body
    again = post(served, "hooked", {"n": 1}, headers={"x-github-delivery": "same-id"})  # header case differs
    assert again.status == 200, again.body
    assert again.json["duplicate"] is True
    assert again.json["delivery_id"] == first.json["delivery_id"] and again.json["run_id"] == first.json["run_id"]
    served.wait_run(first.json["run_id"])
    rows = wait_ledger(served.home, "SELECT decision, run_id FROM deliveries WHERE dedupe_key = 'same-id' "
                       "ORDER BY received_at", until=lambda rows: len(rows) == 2, what="both deliveries")
    assert [r["decision"] for r in rows] == ["started", "duplicate"]
    runs = wait_ledger(served.home, "SELECT run_id FROM runs WHERE agent = 'hooked' AND input = ?",
                       [json.dumps({"n": 1})], until=lambda rows: len(rows) >= 1, what="the run")
    assert len(runs) == 1


def test_a_bearer_webhook_takes_its_secret_not_an_api_token(served: Served) -> None:
    ok = post(served, "b-hook", {"x": 1}, secret=None, headers={"Authorization": "Bearer bearer-secret"})
    assert ok.status == 202, ok.body
    assert served.wait_run(ok.json["run_id"])["status"] == "succeeded"
    api_token = served.tokens["admin"]
    refused = post(served, "b-hook", {"x": 1}, secret=None, headers={"Authorization": f"Bearer {api_token}"})
    assert refused.status == 401
    assert post(served, "b-hook", {"x": 1}).status == 401  # an HMAC signature is not what this hook takes


def test_a_webhook_starts_a_workflow_with_mapped_inputs_and_the_event(served: Served) -> None:
    reply = post(served, "flow", {"topic": "release", "n": 3}, headers={"X-Sender": "ci"})
    assert reply.status == 202, reply.body
    wf_id = reply.json["workflow_run_id"]

    def ended() -> dict[str, Any] | None:
        run: dict[str, Any] = served.api("GET", f"/workflow-runs/{wf_id}", role="viewer").json
        return run if run["status"] not in ("running",) else None

    run = poll(ended, "the webhook's workflow run to end", 30)
    assert run["status"] == "succeeded", run
    assert run["inputs"] == {"topic": "release", "count": 3}
    step_run = served.wait_run(run["steps"][0]["runs"][0]["run_id"])
    assert step_run["output"] == "echo release x3 from ci"
    refused = post(served, "flow", {"n": 1})  # no topic: the mapping's template fails, strictly
    assert refused.status == 400 and "has no attribute 'topic'" in refused.json["error"]["message"], refused.body
    wrong = post(served, "flow", {"topic": "t", "n": "many"})  # count must be an integer: the workflow refuses
    assert wrong.status == 400 and "count" in wrong.json["error"]["message"], wrong.body
    reasons = [d["reason"] or "" for d in deliveries(served, trigger="flow") if d["decision"] == "rejected"]
    assert any("topic" in r for r in reasons) and any("count" in r for r in reasons), reasons


def test_a_chain_of_three_run_completed_agents(served: Served) -> None:
    reply = post(served, "chain", {"go": True})
    assert reply.status == 202, reply.body
    first = served.wait_run(reply.json["run_id"])
    assert first["status"] == "succeeded"
    rows = wait_ledger(served.home, "SELECT agent, run_id, trigger, trigger_run_id, chain_depth, output, status "
                       "FROM runs WHERE agent IN ('second', 'third') AND (trigger_run_id = ? OR trigger_run_id IN "
                       "(SELECT run_id FROM runs WHERE trigger_run_id = ?))", [first["run_id"], first["run_id"]],
                       until=lambda rows: len(rows) == 2 and all(r["status"] == "succeeded" for r in rows),
                       what="the chain's two runs", timeout=60)
    by_agent = {r["agent"]: r for r in rows}
    assert by_agent["second"]["trigger_run_id"] == first["run_id"] and by_agent["second"]["chain_depth"] == 1
    assert by_agent["second"]["output"] == "two after one" and by_agent["second"]["trigger"] == "run_completed"
    assert by_agent["third"]["trigger_run_id"] == by_agent["second"]["run_id"]
    assert by_agent["third"]["chain_depth"] == 2 and by_agent["third"]["output"] == "three after two after one"
    fired = [d for d in deliveries(served, trigger="run_completed:second") if d["dedupe_key"] == first["run_id"]]
    assert len(fired) == 1 and fired[0]["run_id"] == by_agent["second"]["run_id"]


def test_deliveries_list_and_replay_through_the_api_and_the_cli(served: Served) -> None:
    reply = post(served, "hooked", {"replay": "me"}, headers={"X-GitHub-Delivery": "to-replay"})
    original = reply.json
    served.wait_run(original["run_id"])
    assert served.api("POST", f"/deliveries/{original['delivery_id']}/replay", role="viewer").status == 403
    replayed = served.api("POST", f"/deliveries/{original['delivery_id']}/replay", role="operator")
    assert replayed.status == 202, replayed.body
    assert replayed.json["decision"] == "started" and replayed.json["run_id"] != original["run_id"]
    assert original["delivery_id"] in replayed.json["reason"]
    run = served.wait_run(replayed.json["run_id"])
    assert json.loads(run["input"]) == {"replay": "me"}
    assert served.api("POST", "/deliveries/dlv_0000/replay", role="operator").status == 404
    listed = deliveries(served, decision="started", limit="2")
    assert len(listed) == 2 and all(d["decision"] == "started" for d in listed)
    assert served.api("GET", "/deliveries?decision=maybe", role="viewer").status == 400
    cli = [sys.executable, "-m", "runner", "--home", str(served.home)]
    done = subprocess.run([*cli, "deliveries", "list", "--trigger", "hooked", "--output", "json"], cwd=ROOT,
                          env=served.env, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert any(d["delivery_id"] == original["delivery_id"] for d in json.loads(done.stdout))
    done = subprocess.run([*cli, "deliveries", "replay", original["delivery_id"]], cwd=ROOT, env=served.env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0 and "replayed as dlv_" in done.stdout, done.stdout + done.stderr
    done = subprocess.run([*cli, "deliveries", "replay", "dlv_nope"], cwd=ROOT, env=served.env,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 2 and "no delivery dlv_nope" in done.stderr, done.stderr


def test_a_kill_9_between_acceptance_and_start_starts_the_delivery_at_the_next_start(tmp_path: Path) -> None:
    files = scripted("hooked", [{"content": "ran ${INPUT}"}], triggers=[webhook()])
    crashing = serve(tmp_path, files, env={"HOOK_SECRET": SECRET, "AGENT_ORCH_TEST_CRASH_AT": "delivery-accepted"},
                     roles=("viewer",))
    try:
        with pytest.raises(OSError):  # the daemon kills itself once the delivery is durable: no answer
            post(crashing, "hooked", {"survives": True})
        assert crashing.proc is not None
        crashing.proc.wait(timeout=30)
    finally:
        crashing.stop()
    restarted = Served(crashing.home, crashing.source, tmp_path / "daemon-2.log",
                       env={"HOOK_SECRET": SECRET}).start()
    try:
        restarted.tokens = crashing.tokens
        rows = wait_ledger(restarted.home, "SELECT * FROM deliveries", until=lambda rows: len(rows) == 1
                           and rows[0]["decision"] == "started", what="the delivery started")
        run = restarted.wait_run(rows[0]["run_id"])
        assert run["status"] == "succeeded" and json.loads(run["input"]) == {"survives": True}
        runs = wait_ledger(restarted.home, "SELECT run_id FROM runs WHERE agent = 'hooked'",
                           until=lambda rows: len(rows) >= 1, what="its run")
        assert len(runs) == 1  # started once, under the id chosen when it was accepted
    finally:
        restarted.stop()


def test_a_cycle_of_run_completed_triggers_is_refused_at_validation(tmp_path: Path) -> None:
    repo = make_repo(tmp_path / "repo", {
        **scripted("ping", [{"content": "x"}], triggers=[{"type": "run_completed", "agent": "pong"}]),
        **scripted("pong", [{"content": "x"}], triggers=[{"type": "run_completed", "agent": "ping"}]),
        **scripted("lonely", [{"content": "x"}], triggers=[{"type": "run_completed", "workflow": "nothere"}]),
    })
    done = subprocess.run([sys.executable, "-m", "runner", "validate", str(repo / "specs")], cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 1, done.stdout + done.stderr
    out = done.stdout + done.stderr
    assert "run_completed triggers make a cycle: pong -> ping -> pong" in out
    assert "run_completed triggers make a cycle: ping -> pong -> ping" in out
    assert "unknown workflow 'nothere'" in out


def test_a_retry_of_a_chained_run_keeps_its_place_in_the_chain(served: Served) -> None:
    reply = post(served, "chain", {"for": "flaky"})
    first = served.wait_run(reply.json["run_id"])
    rows = wait_ledger(served.home, "SELECT run_id, status, retry_of, trigger_run_id, chain_depth FROM runs WHERE "
                       "agent = 'flaky' AND trigger_run_id = ? ORDER BY attempt", [first["run_id"]],
                       until=lambda rows: len(rows) == 2 and all(r["status"] == "failed" for r in rows),
                       what="flaky's run and its retry", timeout=60)
    assert rows[1]["retry_of"] == rows[0]["run_id"]
    assert [r["chain_depth"] for r in rows] == [1, 1]  # a retry never starts a chain afresh


def test_one_hooks_sender_cannot_mark_another_hooks_events_as_seen(served: Served) -> None:
    other = post(served, "hook-b", {"from": "b"}, secret="other-secret", headers={"X-Delivery": "shared-key"})
    assert other.status == 202, other.body
    mine = post(served, "hook-a", {"from": "a"}, headers={"X-Delivery": "shared-key"})
    assert mine.status == 202 and "duplicate" not in mine.json, mine.body
    assert mine.json["run_id"] != other.json["run_id"]


def test_payloads_that_are_no_json_or_too_deep_are_400_never_500(served: Served) -> None:
    for raw in (b'{"n": NaN}', b'[Infinity]', b"[" * 100 + b"]" * 100, b'{"a": ' * 2000 + b"1" + b"}" * 2000):
        reply = post(served, "hooked", None, raw=raw)
        assert reply.status == 400, (raw[:20], reply.status, reply.body[:200])
        assert "not JSON" in reply.json["error"]["message"]


def test_a_body_past_the_limit_is_refused_as_it_arrives_and_refusals_are_no_audit_rows(served: Served) -> None:
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
    conn.putrequest("POST", f"{HOOK}/hooked")
    conn.putheader("Transfer-Encoding", "chunked")
    conn.endheaders()
    chunk = b"x" * 65536
    try:
        for _ in range(64):  # 4 MiB, chunked: no Content-Length to refuse it by
            conn.send(f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n")
        conn.send(b"0\r\n\r\n")
        status = conn.getresponse().status
    except OSError:
        status = 413  # the server closed the connection once the limit was passed
    finally:
        conn.close()
    assert status == 413
    for _ in range(20):
        assert post(served, "hooked", {"x": 1}, secret="wrong").status == 401
        assert post(served, "nothing-here", {"x": 1}).status == 404
    marker = "/runs/after-the-refusals"  # audited (a 404 with a token), once the refusals before it were
    assert served.api("GET", marker, role="viewer").status == 404
    wait_ledger(served.home, "SELECT 1 FROM audit WHERE target = ?", [f"/agents/v1{marker}"],
                until=lambda rows: bool(rows), what="the marker's audit row")
    refused = ledger_rows(served.home, "SELECT target, outcome FROM audit WHERE target LIKE '%/hooks/events/%' "
                          "AND outcome IN ('401', '404', '413')")
    assert refused == [], refused  # anyone's refused webhook is a counter, never a ledger row
