"""The workflow pages: the applied workflows and their runs, a run's DAG, and the approvals waiting.

A run is read with ``runner.ledger.workflows.get_workflow_run``, as ``GET /workflow-runs/{id}`` reads it.
The DAG is drawn here, as SVG: a workflow has tens of steps, and a layered layout (each step in the column of
its longest chain of ``needs`` from a root) is a few lines, where a layout library in the browser would be
one more dependency and one more copy of the run's state.
"""

from __future__ import annotations

import re
from typing import Any

import falcon

from runner.api.errors import BadRequest, NotFound
from runner.api.ui.rendering import Page, render
from runner.api.workflows import STATUSES, WORKFLOW_RUN_ID
from runner.ledger.workflows import get_workflow_run, list_workflow_runs
from runner.reconcile.applied import load_applied
from runner.specs.models import NAME_PATTERN

BOX_W, BOX_H, GAP_X, GAP_Y, PAD = 170, 46, 60, 22, 12
RUNS_SHOWN = 50
WAITING_SCAN = 200  # running workflow runs looked through for waiting approvals
ENDED = ("succeeded", "failed", "timed_out", "budget_exceeded", "stopped", "interrupted")


class Workflows(Page):
    """The applied workflows (each with its run form for an operator) and the newest workflow runs."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        _, rt = self.session(req)
        workflow, status = req.get_param("workflow") or "", req.get_param("status") or ""
        if workflow and not re.fullmatch(NAME_PATTERN, workflow):
            raise BadRequest("'workflow' must be a workflow name", details=["workflow"], code="bad_param")
        if status and status not in STATUSES:
            raise BadRequest(f"'status' must be one of {', '.join(STATUSES)}", details=["status"], code="bad_param")
        applied = load_applied(rt.conn(), rt.settings.client_id, kind="workflow")
        workflows = [{"name": w.name, "state": w.state, "message": w.message,
                      "description": (w.spec_dict or {}).get("description"),
                      "steps": len((w.spec_dict or {}).get("steps") or []),
                      "inputs": (w.spec_dict or {}).get("inputs") or {}} for w in applied.values()]
        runs = list_workflow_runs(rt.conn(), rt.settings.client_id, workflow=workflow or None, status=status or None,
                                  limit=RUNS_SHOWN)
        render(req, resp, "workflows.html", workflows=workflows, runs=runs, statuses=STATUSES,
               filters={"workflow": workflow, "status": status})


class WorkflowRun(Page):
    """A workflow run: its DAG and steps (the fragment, polled while the run goes on), approvals, actions."""

    def on_get(self, req: falcon.Request, resp: falcon.Response, workflow_run_id: str) -> None:
        _, rt = self.session(req)
        run = get_workflow_run(rt.conn(), rt.settings.client_id, workflow_run_id) \
            if WORKFLOW_RUN_ID.fullmatch(workflow_run_id) else None
        if run is None:
            raise NotFound(f"no workflow run '{workflow_run_id}'")
        render(req, resp, "dag.html" if self.fragment else "workflow_run.html", run=run, dag=layout(run["steps"]),
               ended=run["status"] in ENDED)


class Approvals(Page):
    """The steps waiting for a decision, in the client's running workflow runs, each with approve and reject."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        _, rt = self.session(req)
        waiting = []
        for listed in list_workflow_runs(rt.conn(), rt.settings.client_id, status="running", limit=WAITING_SCAN):
            run = get_workflow_run(rt.conn(), rt.settings.client_id, listed["workflow_run_id"])
            for step in (run or {}).get("steps") or []:
                if step["approval"] and step["status"] == "waiting":
                    waiting.append({"run": run, "step": step})
        render(req, resp, "approvals.html", waiting=waiting)


def layout(steps: list[dict[str, Any]]) -> dict[str, Any]:
    """Boxes and edges of the DAG: a step's column is its longest chain of ``needs`` back to a root; within
    a column, steps keep their order in the spec."""
    ids = [s["step"] for s in steps]
    needs = {s["step"]: [n for n in s.get("needs") or [] if n in ids] for s in steps}
    column: dict[str, int] = {}

    def depth(step: str, seen: frozenset[str]) -> int:
        if step not in column:
            column[step] = 1 + max((depth(n, seen | {step}) for n in needs[step] if n not in seen), default=-1)
        return column[step]

    for step in ids:
        depth(step, frozenset())
    rows: dict[int, int] = {}
    boxes: dict[str, dict[str, Any]] = {}
    for s in steps:
        col = column[s["step"]]
        row = rows.get(col, 0)
        rows[col] = row + 1
        runs = s.get("runs") or []
        boxes[s["step"]] = {"id": s["step"], "status": s["status"], "state": re.sub(r"[^a-z_]", "", s["status"]),
                            "x": PAD + col * (BOX_W + GAP_X), "y": PAD + row * (BOX_H + GAP_Y),
                            "label": s["step"][:22], "kind": "approval" if s.get("approval") else s.get("agent") or "",
                            "run_id": runs[-1]["run_id"] if runs and runs[-1].get("run_id") else None}
    edges = []
    for s in steps:
        to = boxes[s["step"]]
        for n in needs[s["step"]]:
            fro = boxes[n]
            x1, y1, x2, y2 = fro["x"] + BOX_W, fro["y"] + BOX_H // 2, to["x"], to["y"] + BOX_H // 2
            mid = (x1 + x2) // 2
            edges.append({"d": f"M{x1},{y1} C{mid},{y1} {mid},{y2} {x2},{y2}", "from": n, "to": s["step"]})
    columns = max(column.values(), default=0) + 1
    tallest = max(rows.values(), default=1)
    return {"boxes": list(boxes.values()), "edges": edges, "box_w": BOX_W, "box_h": BOX_H,
            "width": 2 * PAD + columns * (BOX_W + GAP_X) - GAP_X, "height": 2 * PAD + tallest * (BOX_H + GAP_Y) - GAP_Y}
