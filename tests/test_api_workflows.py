"""The workflow endpoints, end to end: a real `agentctl serve` on a free port, real spec repositories, plain HTTP.

One daemon serves the module, for two clients: 'default' with the workflows, and 'other', whose tokens must
learn nothing of them. Each test starts its own workflow runs, so the tests do not interfere. Steps are runs
of scripted agents; every wait is a bounded poll, never a sleep.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from api_helpers import Reply, Served, make_repo, poll, scripted, two_clients
from prometheus_client.parser import text_string_to_metric_families

ENDED = ("succeeded", "failed", "timed_out", "budget_exceeded", "stopped", "interrupted")


def workflow(name: str, steps: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    return {f"specs/{name}.yaml": {"kind": "workflow", "name": name, "description": f"workflow {name}", **fields,
                                   "steps": steps}}


@pytest.fixture(scope="module")
def main(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("api-workflows")
    files: dict[str, Any] = {
        **scripted("echo", [{"content": "done"}], overlap="queue"),
        **scripted("sleeper", [{"sleep": 60, "content": "too late"}], constraints={"max_runtime": 120}),
        **scripted("broken", []),  # no turn to answer with: each of its runs fails
        **workflow("pipeline", [
            {"id": "first", "agent": "echo", "input": "Do {{ inputs.topic }}"},
            {"id": "gate", "needs": ["first"], "approval": {"timeout": 3600}},
            {"id": "last", "needs": ["gate"], "agent": "echo", "input": "{{ steps.first.output }}"},
        ], inputs={"topic": {"type": "string", "default": "x"}}),
        **workflow("slow", [{"id": "nap", "agent": "sleeper", "input": "wait"}]),
        **workflow("fragile", [{"id": "only", "agent": "broken", "input": "fail"}]),
        **workflow("asks", [{"id": "only", "agent": "echo", "input": "{{ inputs.topic }}"}],
                   inputs={"topic": {"type": "string"}}),
    }
    default_repo = make_repo(base / "repo-default", files)
    other_repo = make_repo(base / "repo-other", scripted("theirs", [{"content": "theirs"}]))
    served = two_clients(base, default_repo, other_repo)
    try:
        served.tokens = {role: served.token(role, f"{role}-default") for role in ("viewer", "operator", "admin")}
        served.tokens.update({f"other-{role}": served.token(role, f"{role}-other", "other")
                              for role in ("viewer", "operator")})
        yield served
    finally:
        served.stop()


def start(served: Served, name: str, inputs: dict[str, Any] | None = None) -> str:
    reply = served.api("POST", f"/workflows/{name}/runs", role="operator",
                       body={"inputs": inputs} if inputs is not None else None)
    assert reply.status == 202, reply.body
    data = reply.json
    assert data["workflow"] == name and data["status"] == "running", data
    assert data["links"]["workflow_run"] == f"/agents/v1/workflow-runs/{data['workflow_run_id']}"
    return str(data["workflow_run_id"])


def wait_for(served: Served, run_id: str, what: str, check: Callable[[dict[str, Any]], bool],
             timeout: float = 30.0) -> dict[str, Any]:
    """Poll GET /workflow-runs/{id} until ``check`` holds; the run."""
    def read() -> dict[str, Any] | None:
        reply = served.api("GET", f"/workflow-runs/{run_id}", role="viewer")
        assert reply.status == 200, reply.body
        run: dict[str, Any] = reply.json
        return run if check(run) else None

    found: dict[str, Any] = poll(read, f"workflow run {run_id}: {what}", timeout)
    return found


def step(run: dict[str, Any], step_id: str) -> dict[str, Any]:
    found: dict[str, Any] = next(s for s in run["steps"] if s["step"] == step_id)
    return found


def step_is(step_id: str, *statuses: str) -> Callable[[dict[str, Any]], bool]:
    return lambda run: step(run, step_id)["status"] in statuses


def ended(run: dict[str, Any]) -> bool:
    return run["status"] in ENDED


def refused(reply: Reply, status: int, code: str | None = None) -> dict[str, Any]:
    assert reply.status == status, (reply.status, reply.body)
    error = reply.error()
    if code:
        assert error["code"] == code, error
    return error


# -- reading workflows --------------------------------------------------------------------------------


def test_workflows_are_listed_and_read_with_their_steps_triggers_and_inputs(main: Served) -> None:
    listed = main.api("GET", "/workflows", role="viewer")
    assert listed.status == 200, listed.body
    assert [w["name"] for w in listed.json["workflows"]] == ["asks", "fragile", "pipeline", "slow"]
    assert listed.json["next_cursor"] is None
    pipeline = next(w for w in listed.json["workflows"] if w["name"] == "pipeline")
    assert pipeline["description"] == "workflow pipeline" and pipeline["state"] == "Ready", pipeline
    assert [s["id"] for s in pipeline["steps"]] == ["first", "gate", "last"]
    assert pipeline["steps"][1]["needs"] == ["first"] and pipeline["steps"][1]["approval"]["timeout"] == 3600
    assert pipeline["inputs"]["topic"]["type"] == "string" and pipeline["inputs"]["topic"]["default"] == "x"
    assert pipeline["triggers"] == [] and pipeline["spec"]["name"] == "pipeline"
    assert pipeline["path"] == "pipeline.yaml" and pipeline["etag"]

    one = main.api("GET", "/workflows/pipeline", role="viewer")
    assert one.status == 200, one.body
    assert one.headers["ETag"].strip('"') == pipeline["etag"]
    assert {k: v for k, v in one.json.items() if k != "last_run"} == \
        {k: v for k, v in pipeline.items() if k != "last_run"}

    page = main.api("GET", "/workflows?limit=2", role="viewer").json
    assert [w["name"] for w in page["workflows"]] == ["asks", "fragile"] and page["next_cursor"] == "fragile"
    rest = main.api("GET", f"/workflows?limit=2&cursor={page['next_cursor']}", role="viewer").json
    assert [w["name"] for w in rest["workflows"]] == ["pipeline", "slow"] and rest["next_cursor"] is None

    # Workflows and agents share names but not lists: each endpoint shows its own kind.
    agents = [a["name"] for a in main.api("GET", "/agents", role="viewer").json["agents"]]
    assert agents == ["broken", "echo", "sleeper"]
    for name in ("echo", "nobody"):
        assert "no workflow" in refused(main.api("GET", f"/workflows/{name}", role="viewer"), 404, "not_found")[
            "message"]
    refused(main.api("GET", "/agents/pipeline", role="viewer"), 404, "not_found")


# -- a run: start, approve, read -----------------------------------------------------------------------


def test_a_run_waits_for_its_approval_and_succeeds_once_approved(main: Served) -> None:
    run_id = start(main, "pipeline", {"topic": "the report"})
    run = wait_for(main, run_id, "the gate waits", step_is("gate", "waiting"))
    assert run["workflow"] == "pipeline" and run["status"] == "running" and run["attempt"] == 1
    assert run["inputs"] == {"topic": "the report"} and run["requested_by"] == "api:operator-default"
    assert [s["step"] for s in run["steps"]] == ["first", "gate", "last"]
    first = step(run, "first")
    assert first["status"] == "succeeded" and first["agent"] == "echo" and len(first["runs"]) == 1
    step_run = main.api("GET", f"/runs/{first['runs'][0]['run_id']}", role="viewer")
    assert step_run.status == 200 and step_run.json["input"] == "Do the report", step_run.body
    assert step(run, "gate")["agent"] is None and run["approvals"] == []

    refused(main.api("POST", f"/workflow-runs/{run_id}/steps/first/approve", role="operator", body={}), 409)
    refused(main.api("POST", f"/workflow-runs/{run_id}/steps/nope/approve", role="operator", body={}), 404,
            "not_found")

    approved = main.api("POST", f"/workflow-runs/{run_id}/steps/gate/approve", role="operator",
                        body={"approve": True, "comment": "looks right"})
    assert approved.status == 200, approved.body
    assert approved.json["workflow_run_id"] == run_id and approved.json["step"] == "gate"
    assert approved.json["approved"] is True and isinstance(approved.json["status"], str)

    run = wait_for(main, run_id, "it ends", ended)
    assert run["status"] == "succeeded", run
    assert [s["status"] for s in run["steps"]] == ["succeeded", "succeeded", "succeeded"]
    assert run["ended_at"] and run["started_at"] <= run["ended_at"]
    [approval] = run["approvals"]
    assert approval["step"] == "gate" and approval["approved"] is True and approval["comment"] == "looks right"
    assert approval["by"] == "api:operator-default" and approval["at"]
    refused(main.api("POST", f"/workflow-runs/{run_id}/steps/gate/approve", role="operator", body={}), 409)

    def listed(query: str) -> list[str]:
        reply = main.api("GET", f"/workflow-runs?{query}", role="viewer")
        assert reply.status == 200, reply.body
        return [r["workflow_run_id"] for r in reply.json["workflow_runs"]]

    poll(lambda: run_id in listed("workflow=pipeline&status=succeeded"), "the run in the filtered list")
    assert run_id not in listed("workflow=slow") and run_id not in listed("status=failed")
    assert run_id in listed("limit=1000")
    row = next(r for r in main.api("GET", "/workflow-runs?workflow=pipeline", role="viewer").json["workflow_runs"]
               if r["workflow_run_id"] == run_id)
    assert row["status"] == "succeeded" and row["requested_by"] == "api:operator-default" and "steps" not in row
    poll(lambda: main.api("GET", "/workflows/pipeline", role="viewer").json["last_run"], "the workflow's last run")


def test_a_rejected_approval_fails_the_run(main: Served) -> None:
    run_id = start(main, "pipeline")  # no body: the inputs' defaults
    run = wait_for(main, run_id, "the gate waits", step_is("gate", "waiting"))
    assert run["inputs"] == {"topic": "x"}
    rejected = main.api("POST", f"/workflow-runs/{run_id}/steps/gate/approve", role="operator",
                        body={"approve": False, "comment": "not this week"})
    assert rejected.status == 200 and rejected.json["approved"] is False, rejected.body
    run = wait_for(main, run_id, "it ends", ended)
    assert run["status"] == "failed", run
    assert step(run, "last")["runs"] == []  # never started
    assert [(a["step"], a["approved"], a["comment"]) for a in run["approvals"]] == [("gate", False, "not this week")]


# -- cancel and resume -----------------------------------------------------------------------------------


def step_run_running(served: Served, run_id: str, step_id: str, other_than: str | None = None) -> str:
    """Wait until the step's (first) run has its process (a pid in the live store); its run id.

    A run is ``running`` from its submission on, before its process exists; a stop asked for in that moment
    is not taken up by the executor (reported to the engine's authors), so the tests cancel after it.
    """
    def running() -> str | None:
        runs = step(served.api("GET", f"/workflow-runs/{run_id}", role="viewer").json, step_id)["runs"]
        found = runs[0]["run_id"] if runs and runs[0]["run_id"] not in (None, other_than) else None
        if found is None:
            return None
        conn = sqlite3.connect(served.home / "state.sqlite")
        try:
            row = conn.execute("SELECT pid FROM run_progress WHERE run_id = ?", (found,)).fetchone()
        finally:
            conn.close()
        return str(found) if row and row[0] else None

    found: str = poll(running, f"the run of step {step_id} of {run_id} to be running", 30)
    return found


def test_cancel_stops_the_run_in_flight_and_resume_runs_it_again_with_the_same_id(main: Served) -> None:
    run_id = start(main, "slow")
    first_run = step_run_running(main, run_id, "nap")

    cancelled = main.api("POST", f"/workflow-runs/{run_id}/cancel", role="operator")
    assert cancelled.status == 200, cancelled.body
    assert cancelled.json["workflow_run_id"] == run_id
    run = wait_for(main, run_id, "it is stopped", ended)
    assert run["status"] == "stopped" and run["attempt"] == 1, run
    assert main.wait_run(first_run)["status"] == "stopped"
    refused(main.api("POST", f"/workflow-runs/{run_id}/cancel", role="operator"), 409, "conflict")

    resumed = main.api("POST", f"/workflow-runs/{run_id}/resume", role="operator", body={"from": None})
    assert resumed.status == 202, resumed.body
    assert resumed.json["workflow_run_id"] == run_id
    step_run_running(main, run_id, "nap", other_than=first_run)
    run = main.api("GET", f"/workflow-runs/{run_id}", role="viewer").json
    assert run["status"] == "running" and run["attempt"] == 2, run
    assert main.api("POST", f"/workflow-runs/{run_id}/cancel", role="operator").status == 200
    assert wait_for(main, run_id, "it is stopped again", ended)["status"] == "stopped"


def test_a_failed_run_is_resumed_from_a_step(main: Served) -> None:
    run_id = start(main, "fragile")
    run = wait_for(main, run_id, "it ends", ended)
    assert run["status"] == "failed" and step(run, "only")["status"] == "failed", run
    resumed = main.api("POST", f"/workflow-runs/{run_id}/resume", role="operator",
                       body={"from": "only", "at_head": False})
    assert resumed.status == 202, resumed.body
    run = wait_for(main, run_id, "the second attempt ends", lambda r: r["attempt"] == 2 and ended(r))
    assert run["status"] == "failed"
    assert [r["workflow_run_id"] for r in main.api("GET", "/workflow-runs?workflow=fragile",
                                                  role="viewer").json["workflow_runs"]].count(run_id) == 1


# -- roles, bad input, other clients ------------------------------------------------------------------


def test_reads_need_a_viewer_and_every_operation_an_operator(main: Served) -> None:
    run_id = start(main, "pipeline")
    wait_for(main, run_id, "the gate waits", step_is("gate", "waiting"))
    reads = ["/workflows", "/workflows/pipeline", "/workflow-runs", f"/workflow-runs/{run_id}"]
    writes: list[tuple[str, dict[str, Any]]] = [
        ("/workflows/pipeline/runs", {}), (f"/workflow-runs/{run_id}/steps/gate/approve", {"approve": False}),
        (f"/workflow-runs/{run_id}/resume", {}), (f"/workflow-runs/{run_id}/cancel", {})]
    for path in reads:
        assert main.api("GET", path, role="viewer").status == 200, path
        refused(main.api("GET", path), 401, "unauthorized")
    for path, body in writes:
        error = refused(main.api("POST", path, role="viewer", body=body), 403, "forbidden")
        assert "operator" in error["message"]
        refused(main.api("POST", path, body=body), 401, "unauthorized")
    assert step(main.api("GET", f"/workflow-runs/{run_id}", role="viewer").json, "gate")["status"] == "waiting"
    # An admin may do what an operator may.
    assert main.api("POST", f"/workflow-runs/{run_id}/cancel", role="admin").status == 200
    assert wait_for(main, run_id, "it is stopped", ended)["status"] == "stopped"


def test_bad_bodies_and_queries_are_4xx_naming_the_field(main: Served) -> None:
    def post(path: str, body: Any = None, data: bytes | None = None) -> Reply:
        return main.api("POST", path, role="operator", body=body, data=data,
                        headers={"Content-Type": "application/json"})

    assert refused(post("/workflows/pipeline/runs", {"inputs": ["topic"]}), 400)["details"] == ["inputs"]
    unknown = refused(post("/workflows/pipeline/runs", {"inptus": {}}), 422, "unknown_field")
    assert unknown["details"][0]["field"] == "inptus" and "inputs" in unknown["message"]
    refused(post("/workflows/pipeline/runs", data=b'{"inputs": '), 400, "bad_json")
    refused(post("/workflows/pipeline/runs", data=b"[1]"), 400, "bad_json")
    missing = refused(post("/workflows/asks/runs", {"inputs": {}}), 400, "bad_input")
    assert missing["details"] == ["inputs.topic"] and "topic" in missing["message"], missing
    assert refused(post("/workflows/pipeline/runs", {"inputs": {"topic": 5}}), 400)["details"] == ["inputs.topic"]
    assert refused(post("/workflows/pipeline/runs", {"inputs": {"topik": "y"}}), 400)["details"] == ["inputs.topik"]
    refused(post("/workflows/nobody/runs", {}), 404, "not_found")

    run_id = start(main, "pipeline")
    wait_for(main, run_id, "the gate waits", step_is("gate", "waiting"))
    approve = f"/workflow-runs/{run_id}/steps/gate/approve"
    assert refused(post(approve, {"approve": "yes"}), 400)["details"] == ["approve"]
    assert refused(post(approve, {"comment": 42}), 400)["details"] == ["comment"]
    assert refused(post(approve, {"aprove": True}), 422, "unknown_field")["details"][0]["field"] == "aprove"
    resume = f"/workflow-runs/{run_id}/resume"
    error = refused(post(resume, {"from": "frist"}), 400)
    assert error["details"] == ["from"] and "first" in error["message"]
    assert refused(post(resume, {"from": 3}), 400)["details"] == ["from"]
    assert refused(post(resume, {"at_head": "yes"}), 400)["details"] == ["at_head"]
    refused(post(f"/workflow-runs/{run_id}/cancel", {"now": True}), 422, "unknown_field")
    # None of that touched the run: the gate still waits.
    assert step(main.api("GET", f"/workflow-runs/{run_id}", role="viewer").json, "gate")["status"] == "waiting"
    assert post(f"/workflow-runs/{run_id}/cancel").status == 200

    for query, field in (("status=bogus", "status"), ("status=suceeded", "status"), ("workflow=Bad!", "workflow"),
                         ("limit=100000", "limit"), ("limit=x", "limit"), ("stauts=failed", "stauts")):
        error = refused(main.api("GET", f"/workflow-runs?{query}", role="viewer"), 400)
        assert error["details"] == [field], (query, error)
    assert refused(main.api("GET", "/workflows?cursor=Bad!", role="viewer"), 400)["details"] == ["cursor"]
    for bad_id in ("f" * 24, "no%20such", "x" * 65):
        refused(main.api("GET", f"/workflow-runs/{bad_id}", role="viewer"), 404, "not_found")
        refused(post(f"/workflow-runs/{bad_id}/cancel"), 404, "not_found")


def test_another_clients_workflows_and_runs_are_404_like_names_nobody_has(main: Served) -> None:
    run_id = start(main, "pipeline")
    wait_for(main, run_id, "the gate waits", step_is("gate", "waiting"))

    def probes(name: str, run: str) -> list[tuple[str, str, Any]]:
        return [("GET", f"/workflows/{name}", None), ("POST", f"/workflows/{name}/runs", {}),
                ("GET", f"/workflow-runs/{run}", None), ("POST", f"/workflow-runs/{run}/cancel", None),
                ("POST", f"/workflow-runs/{run}/resume", {}),
                ("POST", f"/workflow-runs/{run}/steps/gate/approve", {"approve": True})]

    for (method, path, body), (_, nobody, _) in zip(probes("pipeline", run_id), probes("nobody", "f" * 24),
                                                    strict=True):
        known = main.api(method, path, role=f"other-{'viewer' if method == 'GET' else 'operator'}", body=body)
        unknown = main.api(method, nobody, role=f"other-{'viewer' if method == 'GET' else 'operator'}", body=body)
        error = refused(known, 404, "not_found")
        assert error["message"].replace("pipeline", "nobody").replace(run_id, "f" * 24) == \
            refused(unknown, 404)["message"], (method, path)
    assert main.api("GET", "/workflows", role="other-viewer").json == {"workflows": [], "next_cursor": None}
    assert main.api("GET", "/workflow-runs", role="other-viewer").json == {"workflow_runs": []}
    assert main.api("GET", "/workflow-runs?workflow=pipeline", role="other-viewer").json == {"workflow_runs": []}

    # Nothing the other client sent reached the run.
    assert step(main.api("GET", f"/workflow-runs/{run_id}", role="viewer").json, "gate")["status"] == "waiting"
    assert main.api("POST", f"/workflow-runs/{run_id}/cancel", role="operator").status == 200
    wait_for(main, run_id, "it is stopped", ended)


def test_no_request_of_this_module_was_answered_with_a_5xx(main: Served) -> None:
    reply = main.request("GET", "/metrics", role="viewer")
    families = {f.name: f for f in text_string_to_metric_families(reply.text)}
    samples = families["agent_orch_api_requests"].samples
    statuses = {s.labels["status"] for s in samples}
    assert statuses and not {s for s in statuses if s.startswith("5")}, statuses
    routes = {s.labels["route"] for s in samples}
    assert "/agents/v1/workflow-runs/{workflow_run_id}/steps/{step}/approve" in routes, routes
    assert "internal error" not in main.log()
