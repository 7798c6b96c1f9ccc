"""The OpenAPI 3.1 document of the REST API. The agent spec schema comes from the pydantic models.

3.1, not 3.0: its schemas are JSON Schema 2020-12, which is what pydantic writes (``type: null``,
``const``, numeric ``exclusiveMinimum``); in a 3.0 document those are invalid.
"""

from __future__ import annotations

from typing import Any

from runner.specs.models import AgentSpec

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
RUN = {"type": "object", "required": ["run_id", "status"], "properties": {
    "run_id": {"type": "string"}, "status": {"type": "string"}, "agent": {"type": "string"}}}


def _errors(*codes: int) -> dict[str, Any]:
    return {str(c): {"description": "error", "content": {"application/json": {"schema": {"$ref":
            "#/components/schemas/Error"}}}} for c in codes}


def _ok(schema: dict[str, Any], code: int = 200) -> dict[str, Any]:
    return {str(code): {"description": "ok", "content": {"application/json": {"schema": schema}}}}


def _params(*names: tuple[str, str, str]) -> list[dict[str, Any]]:
    return [{"name": n, "in": where, "required": where == "path", "schema": {"type": kind}}
            for n, where, kind in names]


NAME = ("name", "path", "string")
RUN_ID = ("run_id", "path", "string")
SPEC_BODY = {"required": True, "content": {"application/json": {"schema": {"$ref": "#/components/schemas/AgentSpec"}}}}
SECURED: list[dict[str, list[str]]] = [{"bearer": []}]


def document() -> dict[str, Any]:
    base = "/agents/v1"
    spec_schema = AgentSpec.model_json_schema(ref_template="#/components/schemas/{model}")
    defs = spec_schema.pop("$defs", {})
    paths: dict[str, Any] = {
        f"{base}/agents": {
            "get": {"parameters": _params(("limit", "query", "integer"), ("cursor", "query", "string")),
                    "responses": {**_ok({"type": "object", "properties": {"agents": {"type": "array",
                                                                                     "items": AGENT}}}),
                                  **_errors(400, 401)}},
            "post": {"requestBody": SPEC_BODY,
                     "responses": {**_ok(OBJ, 201), **_errors(400, 401, 403, 409, 413, 422, 503)}},
        },
        f"{base}/agents/{{name}}": {
            "parameters": _params(NAME),
            "get": {"responses": {**_ok(AGENT), **_errors(401, 404)}},
            "put": {"parameters": _params(("If-Match", "header", "string")), "requestBody": SPEC_BODY,
                    "responses": {**_ok(OBJ), **_errors(400, 401, 403, 404, 409, 413, 422, 428, 503)}},
            "delete": {"parameters": _params(("If-Match", "header", "string")),
                       "responses": {**_ok(OBJ), **_errors(401, 403, 404, 409, 428, 503)}},
        },
        f"{base}/agents/{{name}}/start": {"parameters": _params(NAME), "post": {
            "responses": {**_ok(OBJ, 202), **_errors(400, 401, 403, 404)}}},
        f"{base}/agents/{{name}}/stop": {"parameters": _params(NAME), "post": {
            "responses": {**_ok(OBJ), **_errors(401, 403, 404)}}},
        f"{base}/agents/{{name}}/runs": {"parameters": _params(NAME), "post": {
            "requestBody": {"required": False, "content": {"application/json": {"schema": {
                "type": "object", "properties": {"input": {"type": "string"}}}}}},
            "responses": {**_ok(OBJ, 202), **_errors(400, 401, 403, 404, 413)}}},
        f"{base}/agents/{{name}}/logs": {"parameters": _params(NAME), "get": {
            "parameters": _params(("offset", "query", "integer"), ("limit", "query", "integer"),
                                  ("run", "query", "string")),
            "responses": {**_ok(OBJ), **_errors(400, 401, 404)}}},
        f"{base}/runs": {"get": {
            "parameters": _params(("agent", "query", "string"), ("status", "query", "string"),
                                  ("since", "query", "string"), ("limit", "query", "integer"),
                                  ("cursor", "query", "string")),
            "responses": {**_ok({"type": "object", "properties": {"runs": {"type": "array", "items": RUN}}}),
                          **_errors(400, 401)}}},
        f"{base}/runs/{{run_id}}": {"parameters": _params(RUN_ID), "get": {
            "responses": {**_ok(RUN), **_errors(401, 404)}}},
        f"{base}/runs/{{run_id}}/events": {"parameters": _params(RUN_ID), "get": {
            "parameters": _params(("after", "query", "integer"), ("limit", "query", "integer")),
            "responses": {**_ok(OBJ), **_errors(400, 401, 404)}}},
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
                       "schemas": {"Error": ERROR, "AgentSpec": spec_schema, **defs}},
    }
