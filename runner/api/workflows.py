"""Workflows: the applied ones, their runs, and what an operator does to a run.

Applied workflows are read as agents are, from the applied state (``kind="workflow"`` of the same table);
their runs from the store through ``runner.ledger.workflows``, which ``agentctl workflow status|list`` uses
too. Starting, cancelling, resuming and approving go to the daemon's workflow engine through the runtime
(``runner.supervise.runtime``): the API checks what it can see itself (the body's fields and types, that
the workflow, run or step exists for this client) and leaves every decision about a run's state to the
engine, whose refusals come back through the one error mapping (not found 404, usage 400, conflict 409).

A run of another client is 404, with the very answer an id nobody has gets.
"""

from __future__ import annotations

import json
import re
from typing import Any

import falcon

from runner.api.app import MAX_PAGE, Resource, int_param, name_cursor, read_json
from runner.api.errors import BadRequest, NotFound
from runner.api.openapi import APPROVE_FIELDS, RESUME_FIELDS, START_FIELDS, check_fields, check_query
from runner.errors import UsageError
from runner.ledger.workflows import get_workflow_run, list_workflow_runs
from runner.reconcile.applied import AppliedAgent, load_applied
from runner.specs.checking import did_you_mean
from runner.specs.models import NAME_PATTERN
from runner.supervise.runtime import Runtime
from runner.supervise.workflow_state import coerce_inputs

# A workflow run's states (docs/workflows.md): what ?status= may ask for.
STATUSES = ("running", "succeeded", "failed", "timed_out", "budget_exceeded", "stopped", "interrupted")
WORKFLOW_RUN_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")
LAST_RUN = ("workflow_run_id", "status", "attempt", "started_at", "ended_at")


def workflow_json(w: AppliedAgent, last_run: dict[str, Any] | None) -> dict[str, Any]:
    spec = w.spec_dict or {}
    return {
        "name": w.name, "description": spec.get("description"), "state": w.state, "spec": w.spec_dict,
        "steps": spec.get("steps", []), "triggers": spec.get("triggers", []), "inputs": spec.get("inputs", {}),
        "path": w.path, "etag": w.blob, "generation": w.generation, "applied_revision": w.applied_revision,
        "attempted_revision": w.attempted_revision, "conditions": w.conditions, "message": w.message,
        "last_run": last_run,
    }


class Collection(Resource):
    """GET /workflows: the applied workflows by name, paged like agents."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        rt = self.client(req, "viewer")
        check_query(req, "workflows")
        limit = int_param(req, "limit", 50, 1, MAX_PAGE)
        after = name_cursor(req, "a workflow")

        def build() -> bytes:
            applied = load_applied(rt.conn(), rt.settings.client_id, kind="workflow")
            found = [w for w in applied.values() if w.name > after]
            page = found[:limit]
            body = {"workflows": [workflow_json(w, _last_run(rt, w.name)) for w in page],
                    "next_cursor": page[-1].name if len(found) > limit else None}
            return json.dumps(body).encode()

        resp.content_type = falcon.MEDIA_JSON
        resp.data = self.api.cache.get(("workflows", rt.settings.client_id, after, limit), build)


class Item(Resource):
    """GET /workflows/{name}."""

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        rt = self.client(req, "viewer")
        check_query(req, "workflow")
        workflow = _workflow(rt, name)
        if workflow.blob:
            resp.etag = workflow.blob
        resp.media = workflow_json(workflow, _last_run(rt, name))


class Start(Resource):
    """POST /workflows/{name}/runs, body ``{"inputs": {...}}`` (optional): 202 with the run's id."""

    def on_post(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        principal = self.api.require(req, "operator")
        rt = self.api.runtime(req)
        workflow = _workflow(rt, name)
        body = _body(req, START_FIELDS, "POST /workflows/{name}/runs")
        inputs = body.get("inputs")
        if inputs is None:
            inputs = {}
        if not isinstance(inputs, dict):
            raise BadRequest("'inputs' must be an object: each of the workflow's inputs by name", details=["inputs"],
                             code="bad_input")
        try:
            run_id = rt.start_workflow(name, inputs, requested_by=f"api:{principal.name}")
        except UsageError as exc:  # an unknown, missing or ill-typed input: the engine says which, in words
            declared = (workflow.spec_dict or {}).get("inputs") or {}
            raise BadRequest(exc.message, details=_refused_inputs(declared, inputs), code="bad_input") from None
        run = get_workflow_run(rt.conn(), rt.settings.client_id, run_id)
        resp.status = 202
        resp.media = {"workflow": name, "workflow_run_id": run_id, "status": run["status"] if run else "running",
                      "links": {"workflow_run": f"/agents/v1/workflow-runs/{run_id}"}}


class Runs(Resource):
    """GET /workflow-runs: newest first, filtered by ``workflow`` and ``status``."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        rt = self.client(req, "viewer")
        check_query(req, "workflow_runs")
        limit = int_param(req, "limit", 50, 1, MAX_PAGE)
        workflow, status = req.get_param("workflow"), req.get_param("status")
        if workflow and not re.fullmatch(NAME_PATTERN, workflow):
            raise BadRequest("'workflow' must be a workflow name (lowercase letters, digits, '-' and '_')",
                             details=["workflow"], code="bad_param")
        if status and status not in STATUSES:
            raise BadRequest(f"'status' must be one of {', '.join(STATUSES)}{did_you_mean(status, STATUSES)}",
                             details=["status"], code="bad_param")

        def build() -> bytes:
            runs = list_workflow_runs(rt.conn(), rt.settings.client_id, workflow=workflow or None,
                                      status=status or None, limit=limit)
            return json.dumps({"workflow_runs": runs}).encode()

        resp.content_type = falcon.MEDIA_JSON
        resp.data = self.api.cache.get(("workflow_runs", rt.settings.client_id, workflow, status, limit), build)


class Run(Resource):
    """GET /workflow-runs/{id}: the run, its steps (with their runs) and approvals."""

    def on_get(self, req: falcon.Request, resp: falcon.Response, workflow_run_id: str) -> None:
        rt = self.client(req, "viewer")
        check_query(req, "workflow_run")
        resp.media = _run(rt, workflow_run_id)


class Cancel(Resource):
    """POST /workflow-runs/{id}/cancel: every run in flight stopped; the workflow run ``stopped``."""

    def on_post(self, req: falcon.Request, resp: falcon.Response, workflow_run_id: str) -> None:
        principal = self.api.require(req, "operator")
        rt = self.api.runtime(req)
        _run(rt, workflow_run_id)
        _body(req, (), "POST /workflow-runs/{id}/cancel")
        resp.media = _answer(rt.cancel_workflow(workflow_run_id, requested_by=f"api:{principal.name}"),
                             workflow_run_id)


class Resume(Resource):
    """POST /workflow-runs/{id}/resume, body ``{"from": STEP|null, "at_head": bool}`` (both optional): the same
    id, its attempt raised; 202, the engine runs it again."""

    def on_post(self, req: falcon.Request, resp: falcon.Response, workflow_run_id: str) -> None:
        principal = self.api.require(req, "operator")
        rt = self.api.runtime(req)
        run = _run(rt, workflow_run_id)
        body = _body(req, RESUME_FIELDS, "POST /workflow-runs/{id}/resume")
        from_step, at_head = body.get("from"), body.get("at_head", False)
        if from_step is not None and not isinstance(from_step, str):
            raise BadRequest("'from' must be a step id, or null", details=["from"], code="bad_input")
        if not isinstance(at_head, bool):
            raise BadRequest("'at_head' must be true or false", details=["at_head"], code="bad_input")
        # A step of the run's own revision; at the head the spec may have gained it: the engine decides then.
        steps = [str(s["step"]) for s in run.get("steps") or []]
        if from_step is not None and not at_head and from_step not in steps:
            raise BadRequest(f"'from': the workflow run has no step '{from_step}'{did_you_mean(from_step, steps)} "
                             f"(its steps: {', '.join(steps)})", details=["from"], code="bad_input")
        try:
            answer = rt.resume_workflow(workflow_run_id, from_step, at_head, requested_by=f"api:{principal.name}")
        except UsageError as exc:  # at the head, the spec has no such step either
            raise BadRequest(exc.message, details=["from"], code="bad_input") from None
        resp.status = 202
        resp.media = _answer(answer, workflow_run_id)


class Approve(Resource):
    """POST /workflow-runs/{id}/steps/{step}/approve, body ``{"approve": true|false, "comment": "..."}``
    (``approve`` is true when left out: the path says approve; ``"approve": false`` rejects)."""

    def on_post(self, req: falcon.Request, resp: falcon.Response, workflow_run_id: str, step: str) -> None:
        principal = self.api.require(req, "operator")
        rt = self.api.runtime(req)
        run = _run(rt, workflow_run_id)
        if step not in {s["step"] for s in run.get("steps") or []}:
            raise NotFound(f"workflow run '{workflow_run_id}' has no step '{step}'")
        body = _body(req, APPROVE_FIELDS, "POST /workflow-runs/{id}/steps/{step}/approve")
        approve, comment = body.get("approve", True), body.get("comment")
        if not isinstance(approve, bool):
            raise BadRequest("'approve' must be true (approve) or false (reject)", details=["approve"],
                             code="bad_input")
        if comment is not None and not isinstance(comment, str):
            raise BadRequest("'comment' must be a string", details=["comment"], code="bad_input")
        answer = rt.approve_step(workflow_run_id, step, approve, comment, requested_by=f"api:{principal.name}")
        resp.media = {**_answer(answer, workflow_run_id), "step": step, "approved": approve}


def _workflow(rt: Runtime, name: str) -> AppliedAgent:
    workflow = load_applied(rt.conn(), rt.settings.client_id, name, kind="workflow").get(name)
    if workflow is None:
        raise NotFound(f"no workflow named '{name}'")
    return workflow


def _last_run(rt: Runtime, name: str) -> dict[str, Any] | None:
    newest = list_workflow_runs(rt.conn(), rt.settings.client_id, workflow=name, limit=1)
    return {k: newest[0].get(k) for k in LAST_RUN} if newest else None


def _run(rt: Runtime, workflow_run_id: str) -> dict[str, Any]:
    run = get_workflow_run(rt.conn(), rt.settings.client_id, workflow_run_id) \
        if WORKFLOW_RUN_ID.fullmatch(workflow_run_id) else None
    if run is None:
        raise NotFound(f"no workflow run '{workflow_run_id}'")
    return run


def _refused_inputs(declared: dict[str, Any], given: dict[str, Any]) -> list[str]:
    """The body's fields (``inputs.NAME``) a start was refused for: each input checked alone, as the engine
    checks them all (``coerce_inputs``), so the answer names them without reading the engine's words."""
    fields = [name for name in given if name not in declared]
    fields += [name for name, spec in declared.items()
               if coerce_inputs({name: spec}, {name: given[name]} if name in given else {})[1]]
    return [f"inputs.{name}" for name in fields] or ["inputs"]


def _body(req: falcon.Request, fields: tuple[str, ...], where: str) -> dict[str, Any]:
    """The optional JSON body of an operation, with only ``fields`` in it."""
    body = read_json(req) if req.content_length else {}
    check_fields(body, fields, where)
    return body


def _answer(answer: dict[str, Any], workflow_run_id: str) -> dict[str, Any]:
    """What the engine answered, as the API shows it (the control socket's ``ok`` is the status code here)."""
    shown = {k: v for k, v in answer.items() if k != "ok"}
    shown.setdefault("workflow_run_id", workflow_run_id)
    shown["links"] = {"workflow_run": f"/agents/v1/workflow-runs/{workflow_run_id}"}
    return shown
