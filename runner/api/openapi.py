"""The OpenAPI 3.1 document of the REST API, and what each operation accepts.

The agent spec schema comes from the pydantic models. The query parameters and body fields of each
operation are declared once, here: the document lists them, and ``check_query`` and ``check_fields``
refuse anything else, naming it (with a did-you-mean), instead of ignoring a typo such as
``{"inptu": "x"}`` and running with no input.

3.1, not 3.0: its schemas are JSON Schema 2020-12, which is what pydantic writes (``type: null``,
``const``, numeric ``exclusiveMinimum``); in a 3.0 document those are invalid.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

import falcon

from runner.api.errors import BadRequest, Unprocessable
from runner.specs.checking import did_you_mean
from runner.specs.models import AgentSpec, WorkflowSpec

# Query parameters by operation, with their JSON types; an operation not named here takes none.
QUERY: dict[str, tuple[tuple[str, str], ...]] = {
    "agents": (("limit", "integer"), ("cursor", "string")),
    "logs": (("offset", "integer"), ("limit", "integer"), ("run", "string")),
    "runs": (("agent", "string"), ("status", "string"), ("since", "string"), ("limit", "integer"),
             ("cursor", "string")),
    "events": (("after", "integer"), ("limit", "integer"), ("follow", "boolean")),
    "workflows": (("limit", "integer"), ("cursor", "string")),
    "workflow_runs": (("workflow", "string"), ("status", "string"), ("limit", "integer")),
    "deliveries": (("trigger", "string"), ("decision", "string"), ("limit", "integer"), ("cursor", "string")),
}
# Body fields of the agent operations (start and stop take none). A spec's own fields are the spec
# model's; the wrapped form {"spec": {...}} may repeat the rest of what GET /agents/{id} shows, which is
# read-only and ignored, so GET, edit, PUT of the whole answer works.
RUN_FIELDS = ("input",)
# Body fields of the workflow operations (cancel takes none).
START_FIELDS = ("inputs",)
RESUME_FIELDS = ("from", "at_head")
APPROVE_FIELDS = ("approve", "comment")
AGENT_FIELDS = ("name", "state", "spec", "path", "etag", "generation", "applied_revision", "attempted_revision",
                "conditions", "suspended", "message", "next_run", "last_run")
YAML_TYPES = ("application/yaml", "application/x-yaml", "text/yaml", "text/x-yaml")


def check_query(req: falcon.Request, operation: str) -> None:
    """400 for a query parameter ``operation`` does not take (``?stauts=failed`` filters nothing)."""
    known = [name for name, _kind in QUERY.get(operation, ())]
    for name in req.params:
        if name not in known:
            takes = f" (it takes {', '.join(known)})" if known else " (it takes none)"
            raise BadRequest(f"unknown query parameter '{name}'{did_you_mean(name, known)}{takes}",
                             details=[name], code="unknown_parameter")


def check_fields(body: Mapping[str, Any], known: Iterable[str], where: str) -> None:
    """422 naming every field of ``body`` that ``where`` does not take."""
    known = list(known)
    unknown = [str(k) for k in body if k not in known]
    if not unknown:
        return
    details = [{"field": k, "message": f"unknown field{did_you_mean(k, known)}"} for k in unknown]
    takes = f"; it takes {', '.join(known)}" if known else "; it takes no fields"
    hint = did_you_mean(unknown[0], known).lstrip("; ")
    raise Unprocessable(f"{where}: unknown field '{unknown[0]}'{f' ({hint})' if hint else ''}{takes}",
                        details=details, code="unknown_field")

ERROR = {"type": "object", "required": ["error"], "properties": {"error": {
    "type": "object", "required": ["code", "message", "details"],
    "properties": {"code": {"type": "string"}, "message": {"type": "string"}, "details": {"type": "array"}}}}}
OBJ: dict[str, Any] = {"type": "object"}
AGENT = {"type": "object", "required": ["name", "state"], "properties": {
    "name": {"type": "string"}, "state": {"type": "string"}, "spec": {"type": ["object", "null"]},
    "etag": {"type": ["string", "null"]}, "generation": {"type": "integer"},
    "conditions": {"type": "array"}, "next_run": {"type": ["string", "null"]},
    "last_run": {"type": ["object", "null"]}}}
TOKEN = {"type": "object", "required": ["id", "name", "role", "created_at", "expires_at", "last_used_at", "expired"],
         "properties": {"id": {"type": "string"}, "name": {"type": "string"},
                        "role": {"type": "string", "enum": ["viewer", "operator", "admin"]},
                        "created_at": {"type": "string", "format": "date-time"},
                        "expires_at": {"type": ["string", "null"], "format": "date-time"},
                        "last_used_at": {"type": ["string", "null"], "format": "date-time"},
                        "expired": {"type": "boolean"}}}
TIME = {"type": ["string", "null"], "format": "date-time"}
COUNT = {"type": ["integer", "null"]}
RUN = {"type": "object", "required": ["run_id", "status"], "properties": {
    "run_id": {"type": "string"}, "client_id": {"type": "string"}, "agent": {"type": "string"},
    "status": {"type": "string"}, "trigger": {"type": ["string", "null"]},
    "spec_revision": {"type": ["string", "null"]}, "queued_at": TIME, "started_at": TIME, "ended_at": TIME,
    "input_tokens": COUNT, "output_tokens": COUNT, "model_calls": COUNT, "tool_calls": COUNT, "denied": COUNT,
    "tool_errors": COUNT, "attempt": COUNT, "retry_of": {"type": ["string", "null"]},
    "cpu_seconds": {"type": ["number", "null"]}, "max_rss_mb": {"type": ["number", "null"]},
    "bytes_written": COUNT, "node": {"type": ["string", "null"]}, "input": {"type": ["string", "null"]},
    "output": {"type": ["string", "null"]},
    "error": {"type": ["string", "null"]}}}
EVENT = {"type": "object", "required": ["seq", "ts", "kind", "detail"], "properties": {
    "seq": {"type": "integer"}, "ts": {"type": "string", "format": "date-time"}, "kind": {"type": "string"},
    "name": {"type": ["string", "null"]}, "decision": {"type": ["string", "null"]}, "detail": {"type": "object"}}}
STEP = {"type": "object", "required": ["seq", "ts", "type"], "properties": {
    "seq": {"type": "integer"}, "ts": {"type": "string", "format": "date-time"},
    "type": {"type": "string", "description": "model_call, tool_call, egress, memory_recall, memory_save, status, "
                                              "or the event's kind (log)"}}}
TRANSCRIPT = {"type": "object", "required": ["run_id", "status", "input", "steps", "output", "summary"], "properties": {
    "run_id": {"type": "string"}, "agent": {"type": "string"}, "status": {"type": "string"},
    "input": {"type": ["string", "null"]}, "steps": {"type": "array", "items": STEP},
    "output": {"type": ["string", "null"]}, "error": {"type": ["string", "null"]}, "summary": OBJ,
    "complete": {"type": "boolean"}, "truncated": {"type": "boolean"}}}

WORKFLOW = {"type": "object", "required": ["name", "state", "steps", "triggers", "inputs"], "properties": {
    "name": {"type": "string"}, "description": {"type": ["string", "null"]}, "state": {"type": "string"},
    "spec": {"anyOf": [{"$ref": "#/components/schemas/WorkflowSpec"}, {"type": "null"}]},
    "steps": {"type": "array", "items": {"$ref": "#/components/schemas/WorkflowStep"}}, "triggers": {"type": "array"},
    "inputs": {"type": "object", "additionalProperties": {"$ref": "#/components/schemas/WorkflowInput"}},
    "etag": {"type": ["string", "null"]}, "generation": {"type": "integer"},
    "conditions": {"type": "array"}, "last_run": {"type": ["object", "null"]}}}
TEXT = {"type": ["string", "null"]}
# An A2A Agent Card; proto3's JSON leaves out empty lists (a root card with no skill has no "skills").
AGENT_CARD = {"type": "object", "required": ["name", "supportedInterfaces"], "properties": {
    "name": {"type": "string"}, "description": {"type": "string"}, "supportedInterfaces": {"type": "array"},
    "skills": {"type": "array"}, "capabilities": OBJ, "securitySchemes": OBJ}}
JSON_RPC_CALL = {"required": True, "content": {"application/json": {"schema": {
    "type": "object", "required": ["jsonrpc", "method"], "properties": {
        "jsonrpc": {"const": "2.0"}, "id": {"type": ["string", "integer", "null"]},
        "method": {"type": "string", "enum": ["SendMessage", "GetTask", "CancelTask"]}, "params": OBJ}}}}}
JSON_RPC_ANSWER = {"type": "object", "required": ["jsonrpc", "id"], "properties": {
    "jsonrpc": {"const": "2.0"}, "id": {"type": ["string", "integer", "null"]}, "result": OBJ,
    "error": {"type": "object", "required": ["code", "message"], "properties": {
        "code": {"type": "integer"}, "message": {"type": "string"}}}}}
WORKFLOW_RUN_FIELDS: dict[str, Any] = {
    "workflow_run_id": {"type": "string"}, "client_id": {"type": "string"}, "workflow": {"type": "string"},
    "spec_revision": TEXT, "trigger": TEXT, "status": {"type": "string"}, "attempt": COUNT,
    "started_at": TIME, "ended_at": TIME, "input_tokens": COUNT, "output_tokens": COUNT, "error": TEXT,
    "requested_by": TEXT}
WORKFLOW_RUN = {"type": "object", "required": ["workflow_run_id", "workflow", "status"],
                "properties": WORKFLOW_RUN_FIELDS}
STEP_RUN = {"type": "object", "properties": {
    "index": COUNT, "item": {}, "run_id": TEXT, "status": TEXT, "attempt": COUNT, "tokens": COUNT,
    "started_at": TIME, "ended_at": TIME, "error": TEXT}}
WORKFLOW_STEP = {"type": "object", "required": ["step", "status", "runs"], "properties": {
    "step": {"type": "string"}, "agent": TEXT, "approval": {"type": "boolean"},
    "needs": {"type": "array", "items": {"type": "string"}},
    "status": {"type": "string"}, "runs": {"type": "array", "items": STEP_RUN}, "started_at": TIME,
    "ended_at": TIME, "error": TEXT}}
APPROVAL = {"type": "object", "required": ["step", "approved"], "properties": {
    "step": {"type": "string"}, "approved": {"type": ["boolean", "null"]}, "by": TEXT, "at": TIME,
    "comment": TEXT}}
WORKFLOW_RUN_DETAIL = {"type": "object", "required": ["workflow_run_id", "workflow", "status", "steps", "approvals"],
                       "properties": {**WORKFLOW_RUN_FIELDS, "inputs": OBJ, "deadline": TIME,
                                      "steps": {"type": "array", "items": WORKFLOW_STEP},
                                      "approvals": {"type": "array", "items": APPROVAL}}}
ANSWER_FIELDS: dict[str, Any] = {"workflow_run_id": {"type": "string"}, "status": {"type": "string"}, "links": OBJ}
WORKFLOW_ANSWER = {"type": "object", "required": ["workflow_run_id", "status"], "properties": ANSWER_FIELDS}
APPROVE_ANSWER = {"type": "object", "required": ["workflow_run_id", "status", "step", "approved"], "properties": {
    **ANSWER_FIELDS, "step": {"type": "string"}, "approved": {"type": "boolean"}}}
DELIVERY = {"type": "object", "required": ["delivery_id", "trigger", "decision"], "properties": {
    "delivery_id": {"type": "string"}, "client_id": {"type": "string"}, "trigger": {"type": "string"},
    "received_at": {"type": "string"}, "dedupe_key": TEXT, "decision": {"enum": ["accepted", "started", "duplicate",
                                                                                   "rejected"]},
    "reason": TEXT, "run_id": TEXT, "workflow_run_id": TEXT, "target": {"type": "string"}, "kind": {"type": "string"}}}
DELIVERY_ANSWER = {"type": "object", "required": ["delivery_id", "decision"], "properties": {
    "delivery_id": {"type": "string"}, "run_id": TEXT, "workflow_run_id": TEXT, "decision": {"type": "string"},
    "reason": {"type": "string"}, "duplicate": {"type": "boolean"}}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): {"description": "error", "content": {"application/json": {"schema": {"$ref":
            "#/components/schemas/Error"}}}} for c in codes}


def _ok(schema: dict[str, Any], code: int = 200) -> dict[str, Any]:
    return {str(code): {"description": "ok", "content": {"application/json": {"schema": schema}}}}


def _params(*names: tuple[str, str, str]) -> list[dict[str, Any]]:
    return [{"name": n, "in": where, "required": where == "path", "schema": {"type": kind}}
            for n, where, kind in names]


def _query(operation: str) -> list[dict[str, Any]]:
    return _params(*((name, "query", kind) for name, kind in QUERY[operation]))


NAME = ("name", "path", "string")
RUN_ID = ("run_id", "path", "string")
WORKFLOW_RUN_ID = ("workflow_run_id", "path", "string")
SPEC_REF = {"schema": {"$ref": "#/components/schemas/AgentSpec"}}
SPEC_BODY = {"required": True, "content": {"application/json": SPEC_REF, "application/yaml": SPEC_REF}}
NO_BODY_FIELDS = {"required": False, "content": {"application/json": {"schema": {
    "type": "object", "additionalProperties": False, "maxProperties": 0}}}}
SECURED: list[dict[str, list[str]]] = [{"bearer": []}]


def _body(properties: dict[str, Any]) -> dict[str, Any]:
    """An optional JSON body of these fields only."""
    return {"required": False, "content": {"application/json": {"schema": {
        "type": "object", "additionalProperties": False, "properties": properties}}}}


def document() -> dict[str, Any]:
    base = "/agents/v1"
    spec_schema = AgentSpec.model_json_schema(ref_template="#/components/schemas/{model}")
    workflow_schema = WorkflowSpec.model_json_schema(ref_template="#/components/schemas/{model}")
    # One set of definitions for both: the models they share (Retry, the triggers) are the same classes.
    defs = {**workflow_schema.pop("$defs", {}), **spec_schema.pop("$defs", {})}
    paths: dict[str, Any] = {
        f"{base}/agents": {
            "get": {"parameters": _query("agents"),
                    "responses": {**_ok({"type": "object", "properties": {"agents": {"type": "array",
                                                                                     "items": AGENT}}}),
                                  **_errors(400, 401)}},
            "post": {"requestBody": SPEC_BODY,
                     "responses": {**_ok(OBJ, 201), **_errors(400, 401, 403, 409, 413, 422, 503)}},
        },
        f"{base}/agents/{{name}}": {
            "parameters": _params(NAME),
            "get": {"responses": {"200": {"description": "ok; with Accept: application/yaml, the spec file as it is",
                                          "content": {"application/json": {"schema": AGENT},
                                                      "application/yaml": {"schema": {"type": "string"}}}},
                                  **_errors(400, 401, 404)}},
            "put": {"parameters": _params(("If-Match", "header", "string")), "requestBody": SPEC_BODY,
                    "responses": {**_ok(OBJ), **_errors(400, 401, 403, 404, 409, 413, 422, 428, 503)}},
            "delete": {"parameters": _params(("If-Match", "header", "string")),
                       "responses": {**_ok(OBJ), **_errors(401, 403, 404, 409, 428, 503)}},
        },
        f"{base}/agents/{{name}}/start": {"parameters": _params(NAME), "post": {"requestBody": NO_BODY_FIELDS,
            "responses": {**_ok(OBJ, 202), **_errors(400, 401, 403, 404, 413, 422)}}},
        f"{base}/agents/{{name}}/stop": {"parameters": _params(NAME), "post": {"requestBody": NO_BODY_FIELDS,
            "responses": {**_ok(OBJ), **_errors(400, 401, 403, 404, 413, 422)}}},
        f"{base}/agents/{{name}}/runs": {"parameters": _params(NAME), "post": {
            "requestBody": {"required": False, "content": {media: {"schema": {
                "type": "object", "additionalProperties": False, "properties": {"input": {"type": "string"}}}}
                for media in ("application/json", "application/yaml")}},
            "responses": {**_ok(OBJ, 202), **_errors(400, 401, 403, 404, 413, 422)}}},
        f"{base}/agents/{{name}}/logs": {"parameters": _params(NAME), "get": {
            "parameters": _query("logs"),
            "responses": {**_ok(OBJ), **_errors(400, 401, 404)}}},
        f"{base}/runs": {"get": {
            "parameters": _query("runs"),
            "responses": {**_ok({"type": "object", "properties": {"runs": {"type": "array", "items": RUN}}}),
                          **_errors(400, 401)}}},
        f"{base}/runs/{{run_id}}": {"parameters": _params(RUN_ID), "get": {
            "responses": {**_ok(RUN), **_errors(400, 401, 404)}}},
        f"{base}/runs/{{run_id}}/events": {"parameters": _params(RUN_ID), "get": {
            "parameters": [*_query("events"), *_params(("Last-Event-ID", "header", "string"))],
            "responses": {"200": {"description": "the events; with follow=1, server-sent events until the run's "
                                                 "final status (id: seq, event: kind, data: the event)",
                                  "content": {"application/json": {"schema": {
                                      "type": "object", "required": ["run_id", "events"], "properties": {
                                          "run_id": {"type": "string"},
                                          "events": {"type": "array", "items": EVENT}}}},
                                      "text/event-stream": {"schema": {"type": "string"}}}},
                          **_errors(400, 401, 404, 503)}}},
        f"{base}/runs/{{run_id}}/transcript": {"parameters": _params(RUN_ID), "get": {
            "responses": {**_ok(TRANSCRIPT), **_errors(400, 401, 404)}}},
        f"{base}/workflows": {"get": {
            "parameters": _query("workflows"),
            "responses": {**_ok({"type": "object", "required": ["workflows", "next_cursor"], "properties": {
                "workflows": {"type": "array", "items": WORKFLOW}, "next_cursor": TEXT}}), **_errors(400, 401)}}},
        f"{base}/workflows/{{name}}": {"parameters": _params(NAME), "get": {
            "responses": {**_ok(WORKFLOW), **_errors(400, 401, 404)}}},
        f"{base}/workflows/{{name}}/runs": {"parameters": _params(NAME), "post": {
            "requestBody": _body({"inputs": {"type": "object", "description": "the workflow's inputs by name"}}),
            "responses": {**_ok({"type": "object", "required": ["workflow", "workflow_run_id", "status"],
                                 "properties": {"workflow": {"type": "string"},
                                                "workflow_run_id": {"type": "string"},
                                                "status": {"type": "string"}, "links": OBJ}}, 202),
                          **_errors(400, 401, 403, 404, 409, 413, 422, 503)}}},
        f"{base}/workflow-runs": {"get": {
            "parameters": _query("workflow_runs"),
            "responses": {**_ok({"type": "object", "required": ["workflow_runs"], "properties": {
                "workflow_runs": {"type": "array", "items": WORKFLOW_RUN}}}), **_errors(400, 401)}}},
        f"{base}/workflow-runs/{{workflow_run_id}}": {"parameters": _params(WORKFLOW_RUN_ID), "get": {
            "responses": {**_ok(WORKFLOW_RUN_DETAIL), **_errors(400, 401, 404)}}},
        f"{base}/workflow-runs/{{workflow_run_id}}/cancel": {"parameters": _params(WORKFLOW_RUN_ID), "post": {
            "requestBody": NO_BODY_FIELDS,
            "responses": {**_ok(WORKFLOW_ANSWER), **_errors(400, 401, 403, 404, 409, 413, 422, 503)}}},
        f"{base}/workflow-runs/{{workflow_run_id}}/resume": {"parameters": _params(WORKFLOW_RUN_ID), "post": {
            "requestBody": _body({"from": {"type": ["string", "null"], "description": "run this step and "
                                           "everything after it again"},
                                  "at_head": {"type": "boolean", "description": "use the spec at the source's "
                                              "head, not the revision the run started with"}}),
            "responses": {**_ok(WORKFLOW_ANSWER, 202), **_errors(400, 401, 403, 404, 409, 413, 422, 503)}}},
        f"{base}/workflow-runs/{{workflow_run_id}}/steps/{{step}}/approve": {
            "parameters": _params(WORKFLOW_RUN_ID, ("step", "path", "string")), "post": {
                "requestBody": _body({"approve": {"type": "boolean", "description": "false rejects (true when "
                                                  "left out)"},
                                      "comment": {"type": ["string", "null"]}}),
                "responses": {**_ok(APPROVE_ANSWER), **_errors(400, 401, 403, 404, 409, 413, 422, 503)}}},
        f"{base}/tools": {"get": {"responses": {**_ok(OBJ), **_errors(401)}}},
        f"{base}/metrics": {"get": {"responses": {"200": {"description": "Prometheus text", "content": {
            "text/plain": {"schema": {"type": "string"}}}}, **_errors(401)}}},
        f"{base}/tokens": {"get": {"responses": {
            **_ok({"type": "object", "required": ["tokens"], "properties": {"tokens": {"type": "array",
                                                                                       "items": TOKEN}}}),
            **_errors(401, 403)}}},
        f"{base}/tokens/{{token_id}}": {"parameters": _params(("token_id", "path", "string")), "delete": {
            "responses": {**_ok({"type": "object", "required": ["id", "revoked"], "properties": {
                "id": {"type": "string"}, "revoked": {"type": "boolean"}}}), **_errors(401, 403, 404)}}},
        f"{base}/hooks/git": {"post": {"security": [], "responses": {**_ok(OBJ, 202), **_errors(401, 403, 413)}}},
        f"{base}/hooks/events/{{client}}/{{name}}": {
            "parameters": _params(("client", "path", "string"), ("name", "path", "string")),
            "post": {"security": [], "description": "A webhook: signed with its secret (X-Hub-Signature-256) or "
                     "carrying it (Authorization: Bearer); the body (JSON) is the event.",
                     "requestBody": {"required": False, "content": {"application/json": {"schema": {}}}},
                     "responses": {**_ok(DELIVERY_ANSWER, 202), **_ok(DELIVERY_ANSWER),
                                   **_errors(400, 401, 404, 413)}}},
        f"{base}/deliveries": {"get": {
            "parameters": _query("deliveries"),
            "responses": {**_ok({"type": "object", "required": ["deliveries", "next_cursor"], "properties": {
                "deliveries": {"type": "array", "items": DELIVERY}, "next_cursor": TEXT}}), **_errors(400, 401)}}},
        f"{base}/deliveries/{{delivery_id}}/replay": {
            "parameters": _params(("delivery_id", "path", "string")), "post": {
                "responses": {**_ok(DELIVERY, 202), **_errors(400, 401, 403, 404, 409, 503)}}},
        # A2A (docs/a2a.md): the cards are the sdk's AgentCard JSON; a call is JSON-RPC 2.0, whose errors are
        # answered 200 with a JSON-RPC error object, as a2a-sdk's server answers them.
        f"{base}/a2a/{{name}}/.well-known/agent-card.json": {"parameters": _params(NAME), "get": {
            "responses": {**_ok(AGENT_CARD), **_errors(401, 404)}}},
        f"{base}/a2a/{{name}}": {"parameters": _params(NAME), "post": {
            "requestBody": JSON_RPC_CALL, "responses": {**_ok(JSON_RPC_ANSWER), **_errors(401, 403, 404, 413)}}},
        f"{base}/a2a": {"post": {
            "requestBody": JSON_RPC_CALL, "responses": {**_ok(JSON_RPC_ANSWER), **_errors(401, 403, 404, 413)}}},
        "/.well-known/agent-card.json": {"get": {"responses": {**_ok(AGENT_CARD), **_errors(401, 404)}}},
        # Open (totals over every client), or with a token (that client's own series).
        "/metrics": {"get": {"security": [{}, *SECURED], "responses": {"200": {
            "description": "Prometheus text", "content": {"text/plain": {"schema": {"type": "string"}}}},
            **_errors(401)}}},
        "/healthz": {"get": {"security": [], "responses": _ok(OBJ)}},
        "/openapi.json": {"get": {"security": [], "responses": _ok(OBJ)}},
    }
    return {
        "openapi": "3.1.0",
        "info": {"title": "agent-orchestrator", "version": "1", "description": "See docs/api.md."},
        "paths": paths,
        "security": SECURED,
        "components": {"securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
                       "schemas": {"Error": ERROR, "AgentSpec": spec_schema, "WorkflowSpec": workflow_schema,
                                   **defs}},
    }
