"""The control socket's workflow requests (`agentctl workflow run|resume|cancel`, `agentctl approve`), for the
daemon's ``handle``: each is one call of the client's workflow engine, its refusal said as the socket says them."""

from __future__ import annotations

from typing import Any

from runner.errors import OrchestratorError
from runner.supervise.workflows import WorkflowEngine

OPS = ("workflow.run", "workflow.cancel", "workflow.resume", "approve")


def handle(engine: WorkflowEngine, request: dict[str, Any]) -> dict[str, Any]:
    op, by = request.get("op"), str(request.get("requested_by") or "cli")
    try:
        if op == "workflow.run":
            wf_id = engine.start(str(request.get("workflow")), request.get("inputs") or {}, trigger="manual",
                                 requested_by=by)
            return {"ok": True, "workflow_run_id": wf_id, "status": "running"}
        wf_id = str(request.get("id"))
        if op == "workflow.cancel":
            return {"ok": True, **engine.cancel(wf_id, by)}
        if op == "workflow.resume":
            frm = request.get("from")
            return {"ok": True, **engine.resume(wf_id, str(frm) if frm else None, bool(request.get("at_head")), by)}
        comment = request.get("comment")
        return {"ok": True, **engine.approve(wf_id, str(request.get("step")), bool(request.get("approve")),
                                             str(comment) if comment else None, by)}
    except OrchestratorError as exc:
        return {"ok": False, "code": exc.code, "error": exc.message, "details": exc.details}
