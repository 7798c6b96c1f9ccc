"""The API against its own OpenAPI document: schemathesis generates requests for every operation.

The daemon is real (`agentctl serve` on a free port, a real spec repository); requests carry an admin
token. Each operation gets a bounded, derandomized set of examples, valid ones and invalid ones, and every
answer must be no 5xx and match the document's response schema for its status.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
import schemathesis
from api_helpers import Served, head, poll, scripted, serve
from hypothesis import HealthCheck, Phase, given, settings
from schemathesis.checks import not_a_server_error
from schemathesis.core.result import Ok
from schemathesis.specs.openapi.checks import response_schema_conformance

EXAMPLES = 20  # per operation and mode: enough to reach every status the document lists, fast enough
WORKFLOW_OPERATIONS = {
    "GET /agents/v1/workflows", "GET /agents/v1/workflows/{name}", "POST /agents/v1/workflows/{name}/runs",
    "GET /agents/v1/workflow-runs", "GET /agents/v1/workflow-runs/{workflow_run_id}",
    "POST /agents/v1/workflow-runs/{workflow_run_id}/cancel", "POST /agents/v1/workflow-runs/{workflow_run_id}/resume",
    "POST /agents/v1/workflow-runs/{workflow_run_id}/steps/{step}/approve"}


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("schema")
    files = {**scripted("quick", [{"content": "done"}], overlap="queue"),
             "specs/alpha.yaml": {"name": "alpha", "description": "agent alpha", "model": "llama2"},
             "specs/flow.yaml": {"kind": "workflow", "name": "flow", "description": "workflow flow",
                                 "inputs": {"topic": {"type": "string", "default": "x"}},
                                 "steps": [{"id": "first", "agent": "quick", "input": "{{ inputs.topic }}"},
                                           {"id": "gate", "needs": ["first"], "approval": {"timeout": 3600}},
                                           {"id": "last", "needs": ["gate"], "agent": "quick"}]}}
    daemon = serve(base, files)
    try:
        yield daemon
    finally:
        daemon.stop()


def test_every_operation_answers_within_its_schema_and_never_5xx(served: Served) -> None:
    base_url = f"http://127.0.0.1:{served.port}"
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    auth = {"Authorization": f"Bearer {served.tokens['admin']}"}
    results = list(schema.get_all_operations())
    assert all(isinstance(r, Ok) for r in results), [r for r in results if not isinstance(r, Ok)]
    operations = [r.ok() for r in results if isinstance(r, Ok)]
    assert len(operations) >= 28, [op.label for op in operations]  # schemathesis leaves out /openapi.json itself
    assert not WORKFLOW_OPERATIONS - {op.label for op in operations}, [op.label for op in operations]

    failures: list[str] = []
    for operation in operations:
        strategy = operation.as_strategy() | operation.as_strategy(
            generation_mode=schemathesis.GenerationMode.NEGATIVE)

        @given(case=strategy)
        @settings(max_examples=EXAMPLES, derandomize=True, database=None, deadline=None,
                  phases=[Phase.explicit, Phase.generate], suppress_health_check=list(HealthCheck))
        def check(case: schemathesis.Case[Any]) -> None:
            case.call_and_validate(base_url=base_url, headers=auth, timeout=30,
                                   checks=[not_a_server_error, response_schema_conformance])

        try:
            check()
        except Exception as exc:  # every operation is tried; all failures are reported together
            failures.append(f"{operation.label}: {exc}")
    assert not failures, "\n\n".join(failures)
    answered = served.request("GET", "/metrics").text.splitlines()
    sent = sum(float(line.split()[-1]) for line in answered if line.startswith("agent_orch_api_requests_total{"))
    assert sent >= 10 * len(operations), f"only {sent:g} requests reached the API"
    assert "internal error" not in served.log()
    assert served.request("GET", "/healthz").json == {"status": "ok"}
    assert len(head(served.source)) == 40  # the repository the generated writes went to is still a repository


def test_the_document_is_served_as_openapi_3_1(served: Served) -> None:
    document = served.request("GET", "/openapi.json").json
    # 3.1: the agent spec schema is pydantic's JSON Schema 2020-12 (type null, const, numeric exclusiveMinimum).
    assert document["openapi"] == "3.1.0"
    schemas = document["components"]["schemas"]
    assert schemas["Error"]["required"] == ["error"]
    assert schemas["AgentSpec"]["additionalProperties"] is False


def test_the_answers_about_a_real_workflow_run_match_the_document(served: Served) -> None:
    """Generated names and ids rarely hit a workflow run that exists: this one walks a real run through every
    workflow operation, each answer checked against the document."""
    base_url = f"http://127.0.0.1:{served.port}"
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json")
    auth = {"Authorization": f"Bearer {served.tokens['admin']}"}

    def call(method: str, path: str, **kwargs: Any) -> Any:
        case = schema[path][method].Case(**kwargs)
        response = case.call_and_validate(base_url=base_url, headers=auth, timeout=30,
                                          checks=[not_a_server_error, response_schema_conformance])
        assert response.status_code < 400, response.text
        return response.json()

    started = call("POST", "/agents/v1/workflows/{name}/runs", path_parameters={"name": "flow"},
                   body={"inputs": {"topic": "schema"}})
    run = {"workflow_run_id": started["workflow_run_id"]}

    def gate(status: str) -> bool:
        detail = call("GET", "/agents/v1/workflow-runs/{workflow_run_id}", path_parameters=run)
        return any(s["step"] == "gate" and s["status"] == status for s in detail["steps"])

    poll(lambda: gate("waiting"), "the approval step to wait")
    call("GET", "/agents/v1/workflows")
    call("GET", "/agents/v1/workflows/{name}", path_parameters={"name": "flow"})
    call("GET", "/agents/v1/workflow-runs", query={"workflow": "flow"})
    call("POST", "/agents/v1/workflow-runs/{workflow_run_id}/steps/{step}/approve",
         path_parameters={**run, "step": "gate"}, body={"approve": True, "comment": "ok"})
    poll(lambda: call("GET", "/agents/v1/workflow-runs/{workflow_run_id}", path_parameters=run)["status"]
         == "succeeded", "the workflow run to succeed")
    call("POST", "/agents/v1/workflow-runs/{workflow_run_id}/resume", path_parameters=run,
         body={"from": "last", "at_head": False})
    call("POST", "/agents/v1/workflow-runs/{workflow_run_id}/cancel", path_parameters=run)
    call("GET", "/agents/v1/workflow-runs/{workflow_run_id}", path_parameters=run)
    call("GET", "/agents/v1/workflow-runs", query={"status": "stopped", "limit": 5})
