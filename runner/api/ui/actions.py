"""What an operator does from the dashboard: each a POST form, answered with a redirect to what it changed.

Each action checks, in this order: a session (else the login page), the form's CSRF token (403), the
operator role (403, the API's own check, ``Api.require``); then it makes the very runtime call the API's
resource makes, with ``ui:NAME`` as who asked. The middleware writes the audit row, naming the token. The
engine's refusals (a step not waiting, a run already over) come back through the app's one error mapping,
as a page with the same status the API would answer.
"""

from __future__ import annotations

import re
from typing import Any

import falcon

from runner.api.app import MAX_STRING, UI
from runner.api.errors import BadRequest, NotFound
from runner.api.ui import session
from runner.api.ui.rendering import Page
from runner.api.workflows import WORKFLOW_RUN_ID
from runner.errors import UsageError
from runner.ledger.workflows import get_workflow_run
from runner.reconcile.applied import load_applied
from runner.specs.models import NAME_PATTERN
from runner.supervise.runtime import Runtime

BACK = re.compile(r"/ui/(approvals|workflow-runs/[A-Za-z0-9_-]{1,64})")


class Action(Page):
    def on_post(self, req: falcon.Request, resp: falcon.Response, **params: str) -> None:
        principal, rt = self.session(req)
        form = session.checked_form(req)
        self.api.require(req, "operator")
        resp.status, resp.location = 303, self.act(rt, f"ui:{principal.name}", form, **params)

    def act(self, rt: Runtime, who: str, form: dict[str, str], **params: str) -> str:
        raise NotImplementedError


class RunAgent(Action):
    def act(self, rt: Runtime, who: str, form: dict[str, str], **params: str) -> str:
        name = _agent(rt, params["name"])
        text = form.get("input", "")
        if len(text) > MAX_STRING:
            raise BadRequest(f"the input is longer than {MAX_STRING} characters", details=["input"], code="too_long")
        run_id = rt.submit_run(name, text or None, who)
        return f"{UI}/runs/{run_id}"


class StartAgent(Action):
    def act(self, rt: Runtime, who: str, form: dict[str, str], **params: str) -> str:
        name = _agent(rt, params["name"])
        run_id = rt.start_agent(name, who)
        return f"{UI}/runs/{run_id}"


class StopAgent(Action):
    def act(self, rt: Runtime, who: str, form: dict[str, str], **params: str) -> str:
        name = _agent(rt, params["name"])
        rt.stop_agent(name, who)
        return f"{UI}/agents/{name}"


class RunWorkflow(Action):
    """The form's ``input.NAME`` fields are the inputs; an empty one is left out, so its default holds. The
    engine reads a string as JSON for an input of another type, as it does for `agentctl workflow run k=v`."""

    def act(self, rt: Runtime, who: str, form: dict[str, str], **params: str) -> str:
        name = params["name"]
        if not re.fullmatch(NAME_PATTERN, name) or name not in load_applied(rt.conn(), rt.settings.client_id, name,
                                                                             kind="workflow"):
            raise NotFound(f"no workflow named '{name}'")
        inputs: dict[str, Any] = {k.removeprefix("input."): v for k, v in form.items()
                                  if k.startswith("input.") and v != ""}
        for key, value in inputs.items():  # as the API bounds a body's strings
            if len(value) > MAX_STRING:
                raise BadRequest(f"input '{key[:60]}' is longer than {MAX_STRING} characters",
                                 details=[f"input.{key[:60]}"], code="too_long")
        try:
            run_id = rt.start_workflow(name, inputs, requested_by=who)
        except UsageError as exc:
            raise BadRequest(exc.message, details=["inputs"], code="bad_input") from None
        return f"{UI}/workflow-runs/{run_id}"


class CancelWorkflow(Action):
    def act(self, rt: Runtime, who: str, form: dict[str, str], **params: str) -> str:
        run_id = _workflow_run(rt, params["workflow_run_id"])["workflow_run_id"]
        rt.cancel_workflow(run_id, requested_by=who)
        return f"{UI}/workflow-runs/{run_id}"


class ResumeWorkflow(Action):
    def act(self, rt: Runtime, who: str, form: dict[str, str], **params: str) -> str:
        run = _workflow_run(rt, params["workflow_run_id"])
        from_step = form.get("from") or None
        at_head = form.get("at_head") in ("1", "on", "true")
        if from_step is not None and not at_head and from_step not in {s["step"] for s in run["steps"]}:
            raise BadRequest(f"the workflow run has no step '{from_step}'", details=["from"], code="bad_input")
        try:
            rt.resume_workflow(run["workflow_run_id"], from_step, at_head, requested_by=who)
        except UsageError as exc:
            raise BadRequest(exc.message, details=["from"], code="bad_input") from None
        return f"{UI}/workflow-runs/{run['workflow_run_id']}"


class ApproveStep(Action):
    """``decision`` approve or reject, with an optional ``comment``; back to where the form was."""

    def act(self, rt: Runtime, who: str, form: dict[str, str], **params: str) -> str:
        run = _workflow_run(rt, params["workflow_run_id"])
        step = params["step"]
        if step not in {s["step"] for s in run["steps"]}:
            raise NotFound(f"workflow run '{run['workflow_run_id']}' has no step '{step}'")
        decision = form.get("decision")
        if decision not in ("approve", "reject"):
            raise BadRequest("'decision' must be approve or reject", details=["decision"], code="bad_input")
        comment = form.get("comment") or None
        if comment is not None and len(comment) > MAX_STRING:
            raise BadRequest(f"the comment is longer than {MAX_STRING} characters", details=["comment"],
                             code="too_long")
        rt.approve_step(run["workflow_run_id"], step, decision == "approve", comment, requested_by=who)
        back = form.get("back", "")
        return back if BACK.fullmatch(back) else f"{UI}/workflow-runs/{run['workflow_run_id']}"


ROUTES: dict[str, type[Action]] = {
    "/agents/{name}/run": RunAgent,
    "/agents/{name}/start": StartAgent,
    "/agents/{name}/stop": StopAgent,
    "/workflows/{name}/run": RunWorkflow,
    "/workflow-runs/{workflow_run_id}/cancel": CancelWorkflow,
    "/workflow-runs/{workflow_run_id}/resume": ResumeWorkflow,
    "/workflow-runs/{workflow_run_id}/steps/{step}/approve": ApproveStep,
}


def _agent(rt: Runtime, name: str) -> str:
    if not re.fullmatch(NAME_PATTERN, name) or name not in load_applied(rt.conn(), rt.settings.client_id, name):
        raise NotFound(f"no agent named '{name}'")
    return name


def _workflow_run(rt: Runtime, run_id: str) -> dict[str, Any]:
    run = get_workflow_run(rt.conn(), rt.settings.client_id, run_id) if WORKFLOW_RUN_ID.fullmatch(run_id) else None
    if run is None:
        raise NotFound(f"no workflow run '{run_id}'")
    return run
