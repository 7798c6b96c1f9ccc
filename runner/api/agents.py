"""Agents: read from the applied state; written as commits to the spec repository.

A write is validated exactly as the reconciler will validate it (the same tree, the new file in
place) before anything is committed: an invalid spec is 422 with every problem and no commit.

A PUT keeps the user's file: only the fields whose meaning changed are written into it (see
``runner.source.writing.rewrite_spec``), so comments, key order and the defaults it leaves unset stay.
A POST commits a YAML body as it was sent, comments and all. Bodies are JSON or YAML
(``Content-Type: application/yaml``), with the same limits.
"""

from __future__ import annotations

import json
import re
import sqlite3
from typing import Any

import falcon

from runner.api.app import MAX_BODY, MAX_PAGE, Api, Resource, _bounded, int_param, name_cursor, read_json
from runner.api.errors import BadRequest, NotFound, PreconditionRequired, TooLarge, Unprocessable
from runner.api.openapi import AGENT_FIELDS, RUN_FIELDS, YAML_TYPES, check_fields, check_query
from runner.ledger.runs import last_runs as newest_runs
from runner.reconcile.applied import AppliedAgent, load_applied
from runner.source.writing import commit_file, dump_spec, rewrite_spec
from runner.specs.loading import load_document
from runner.specs.models import NAME_PATTERN
from runner.specs.validating import SpecFile, blob_id, validate_tree
from runner.supervise.runtime import Runtime
from runner.times import stamp


def agent_json(a: AppliedAgent, next_run: Any, last_run: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "name": a.name, "state": a.state, "spec": a.spec_dict, "path": a.path, "etag": a.blob,
        "generation": a.generation, "applied_revision": a.applied_revision,
        "attempted_revision": a.attempted_revision, "conditions": a.conditions, "suspended": a.suspended,
        "message": a.message, "next_run": stamp(next_run) if next_run else None,
        "last_run": last_run,
    }


LAST_RUN = ("run_id", "status", "queued_at", "started_at", "ended_at", "denied", "tool_errors")


def last_runs(api: Api, rt: Runtime) -> dict[str, dict[str, Any]]:
    """Each agent's newest run, from both stores (runner.ledger.runs), kept for a second as list pages are:
    one agent's page asks the same question as the list."""
    def build() -> dict[str, dict[str, Any]]:
        found = newest_runs(rt.conn(), rt.settings.ledger_path, rt.settings.client_id)
        return {agent: {k: run[k] for k in LAST_RUN} for agent, run in found.items()}

    lasts: dict[str, dict[str, Any]] = api.cache.get(("last_runs", rt.settings.client_id), build)
    return lasts


class Collection(Resource):
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        rt = self.client(req, "viewer")
        check_query(req, "agents")
        limit = int_param(req, "limit", 50, 1, MAX_PAGE)
        after = name_cursor(req, "an agent")

        def build() -> bytes:
            conn = rt.conn()
            agents = [a for a in load_applied(conn, rt.settings.client_id).values() if a.name > after]
            page = agents[:limit]
            nexts, lasts = rt.next_runs(), last_runs(self.api, rt)
            body = {"agents": [agent_json(a, nexts.get(a.name), lasts.get(a.name)) for a in page],
                    "next_cursor": page[-1].name if len(agents) > limit else None}
            return json.dumps(body).encode()

        resp.content_type = falcon.MEDIA_JSON
        resp.data = self.api.cache.get(("agents", rt.settings.client_id, after, limit), build)

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        principal = self.api.require(req, "admin")
        rt = self.api.runtime(req)
        body, raw = read_body(req)
        spec = _spec_body(body)
        name = _name(spec)
        if name in load_applied(rt.conn(), rt.settings.client_id, name):
            raise falcon_conflict(f"agent '{name}' exists; PUT /agents/{name} changes it")
        text = raw if raw is not None and spec is body else dump_spec(spec)  # a YAML spec lands as it was sent
        result = _write(self.api, req, text, f"{name}.yaml", expect_absent=True,
                        message=f"API: create agent {name}\n\nby {principal.name} ({principal.role})")
        resp.status = 201
        resp.media = result


class Item(Resource):
    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        """The agent as JSON; with ``Accept: application/yaml``, its spec file as it is in git."""
        rt = self.client(req, "viewer")
        check_query(req, "agent")
        agent = _agent(rt.conn(), rt.settings.client_id, name)
        if agent.blob:
            resp.etag = agent.blob
        if req.client_prefers(["application/json", *YAML_TYPES]) in YAML_TYPES:
            text = rt.source.read_blob(agent.blob) if agent.blob else None
            if text is None:
                raise NotFound(f"agent '{name}' has no spec file in the repository now")
            resp.content_type = "application/yaml"
            resp.data = text
            return
        resp.media = agent_json(agent, rt.next_runs().get(name), last_runs(self.api, rt).get(name))

    def on_put(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        principal = self.api.require(req, "admin")
        rt = self.api.runtime(req)
        agent = _agent(rt.conn(), rt.settings.client_id, name)
        spec = _spec_body(read_body(req)[0])
        if _name(spec) != name:
            raise BadRequest(f"the spec's name '{spec.get('name')}' is not '{name}' (renaming is delete + create)",
                             details=["name"], code="bad_name")
        etag = _if_match(req)
        # The file the ETag names, by its id: what the user read is what the change is made in. If the
        # branch moved since, commit_file refuses (409) whatever this says.
        current = rt.source.read_blob(etag)
        text = rewrite_spec(current, spec) if current is not None else dump_spec(spec)
        resp.media = _write(self.api, req, text, agent.path or f"{name}.yaml", expect_blob=etag,
                            message=f"API: update agent {name}\n\nby {principal.name} ({principal.role})")

    def on_delete(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        principal = self.api.require(req, "admin")
        rt = self.api.runtime(req)
        agent = _agent(rt.conn(), rt.settings.client_id, name)
        commit, _ = commit_file(rt.source, agent.path or f"{name}.yaml", None, author=principal.name,
                                message=f"API: delete agent {name}\n\nby {principal.name} ({principal.role})",
                                expect_blob=_if_match(req))
        rt.request_reconcile(f"api:{principal.name}")
        resp.media = {"name": name, "commit": commit, "deleted": True}


class Operation(Resource):
    def __init__(self, api: Api, op: str) -> None:
        super().__init__(api)
        self.op = op

    def on_post(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        principal = self.api.require(req, "operator")
        rt = self.api.runtime(req)
        _agent(rt.conn(), rt.settings.client_id, name)
        who = f"api:{principal.name}"
        body = read_body(req)[0] if req.content_length else {}
        path = "runs" if self.op == "run" else self.op
        check_fields(body, RUN_FIELDS if self.op == "run" else (), f"POST /agents/{{id}}/{path}")
        if self.op == "stop":
            resp.media = {"name": name, "suspended": True, "stopping_runs": rt.stop_agent(name, who)}
            return
        run_input = body.get("input")
        if run_input is not None and not isinstance(run_input, str):
            raise BadRequest("'input' must be a string", details=["input"], code="bad_input")
        run_id = rt.start_agent(name, who) if self.op == "start" else rt.submit_run(name, run_input, who)
        resp.status = 202
        resp.media = {"name": name, "run_id": run_id, "status": "queued",
                      "links": {"run": f"/agents/v1/runs/{run_id}"}}


def _agent(conn: sqlite3.Connection, client_id: str, name: str) -> AppliedAgent:
    agent = load_applied(conn, client_id, name).get(name)
    if agent is None:
        raise NotFound(f"no agent named '{name}'")
    return agent


def read_body(req: falcon.Request) -> tuple[dict[str, Any], bytes | None]:
    """The body as an object, and its text when it is YAML. JSON unless the Content-Type says YAML
    (curl -d sends form-urlencoded: that is read as JSON, as it always was). A YAML body is parsed as
    spec files are (safe, bounded in size, depth and aliases) and bounded as JSON bodies are."""
    media = (req.content_type or "").split(";", 1)[0].strip().lower()
    if media not in YAML_TYPES:
        return read_json(req), None
    raw = req.bounded_stream.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise TooLarge(f"the body is over {MAX_BODY} bytes")
    doc, problems = load_document(raw, "body")
    if doc is None:
        first = problems[0]
        raise BadRequest(f"the YAML body, line {first.line}, column {first.col}: {first.message}",
                         details=[p.as_json() for p in problems], code="bad_yaml")
    if not isinstance(doc.data, dict):
        raise BadRequest("the body must be a YAML mapping", code="bad_yaml")
    _bounded(doc.data, 0)
    return doc.data, raw


def _spec_body(body: dict[str, Any]) -> dict[str, Any]:
    """The spec: the body itself, or its ``spec`` (beside which only what GET shows may come, unread)."""
    if "spec" not in body:
        return body
    check_fields(body, AGENT_FIELDS, "the agent")
    spec = body["spec"]
    if not isinstance(spec, dict):
        raise BadRequest("send the spec as an object (or {\"spec\": {...}})", details=["spec"], code="bad_spec")
    return spec


def _name(spec: dict[str, Any]) -> str:
    name = spec.get("name")
    if not isinstance(name, str) or not re.fullmatch(NAME_PATTERN, name):  # match() lets 'abc\n' through
        raise Unprocessable("the spec needs a valid 'name'", details=[{"field": "name", "message":
                            "lowercase letters, digits, '-' and '_' (at most 63, starting with a letter or digit)"}])
    return name


def _if_match(req: falcon.Request) -> str:
    etag = (req.get_header("If-Match") or "").strip().strip('"').removeprefix("W/").strip('"')
    if not etag:
        raise PreconditionRequired("send If-Match with the agent's ETag (from GET), so no update is lost")
    return etag


def _write(api: Api, req: falcon.Request, text: bytes, rel_path: str, *, message: str,
           expect_blob: str | None = None, expect_absent: bool = False) -> dict[str, Any]:
    rt = api.runtime(req)
    principal = req.context.principal
    source = rt.source
    revision = source.revision(fetch=False)
    files = [f for f in source.files(revision) if f.rel_path != rel_path]
    files.append(SpecFile(rel_path, blob_id(text), lambda: text, f"{source.location.path}/{rel_path}".lstrip("/")))
    results, _ = validate_tree(files, client_id=rt.settings.client_id, home=str(rt.settings.home))
    mine = next(r for r in results if r.rel_path == rel_path)
    problems = [p.as_json() for p in mine.problems]
    if not mine.valid:
        raise Unprocessable(f"the spec has {sum(1 for p in problems if p['severity'] == 'error')} problem(s); "
                            "nothing was committed", details=problems)
    commit, blob = commit_file(source, rel_path, text, message=message, author=principal.name,
                               expect_blob=expect_blob, expect_absent=expect_absent)
    rt.request_reconcile(f"api:{principal.name}")
    return {"name": mine.name, "commit": commit, "path": rel_path, "etag": blob, "warnings": problems}


def falcon_conflict(message: str) -> Exception:
    from runner.api.errors import Conflict

    return Conflict(message)


__all__ = ["Collection", "Item", "Operation", "json"]
