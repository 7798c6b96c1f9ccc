"""What a workflow run's steps see of each other, and the decisions about one step that need no daemon.

``context_of`` turns the live rows of a run into the ``steps`` an expression reads: each step's status,
``output`` (the run's answer), ``outputs`` (a list, in item order for a fan-out), ``json`` (the answer parsed
when it is JSON, code fences allowed), and for an approval ``approved``, ``by`` and ``comment``.
"""

from __future__ import annotations

import functools
import graphlib
import json
import sqlite3
from collections.abc import Callable
from typing import Any

from runner.specs.expressions import names_in
from runner.specs.models import WorkflowSpec, WorkflowStep

MAX_OUTPUT = 16_000  # characters of an answer a step passes on: what the ledger keeps of it
MAX_ITEMS = 10_000  # items of one fan-out
FAILED = ("failed", "timed_out", "budget_exceeded", "stopped", "interrupted")
DONE = ("succeeded", "skipped", *FAILED)
def context_of(spec_steps: list[WorkflowStep], step: WorkflowStep, inputs: dict[str, Any],
               states: dict[str, dict[str, Any]], outputs: Callable[[str], list[tuple[int, str, str | None]]],
               approvals: Callable[[], dict[str, dict[str, Any]]],
               event: dict[str, Any] | None = None) -> dict[str, Any]:
    """What the step's expressions read, for the evaluator (``runner.specs.evaluator``): its inputs, and of the
    steps only those its texts name, each as its status and its runs' answers, in item order (None for a run
    that did not succeed). Validation made sure every step they read is named so and has run."""
    named: set[str] = set()
    for text, template in ((step.if_, False), (step.for_each, False), (step.input, True),
                           (step.approval.message if step.approval else None, True)):
        if text:
            named |= names_in(text, template).steps
    declared = {s.id: s for s in spec_steps}
    decisions: dict[str, dict[str, Any]] | None = None
    steps: dict[str, Any] = {}
    for step_id in sorted(named & set(declared)):
        answers = [out if status == "succeeded" else None for _, status, out in outputs(step_id)]
        entry: dict[str, Any] = {"status": states.get(step_id, {}).get("status", "pending"), "outputs": answers,
                                 "fan_out": bool(declared[step_id].for_each)}
        if declared[step_id].approval is not None:
            decisions = approvals() if decisions is None else decisions
            entry["approval"] = decisions.get(step_id)
        steps[step_id] = entry
    event = event or {}
    return {"inputs": inputs, "event": event.get("event") or {}, "headers": event.get("headers") or {},
            "payload": event.get("payload") if "payload" in event else {}, "steps": steps}


def too_long(status: str, output_chars: int | None) -> str | None:
    """Why a run's answer cannot be a step's output (over MAX_OUTPUT), or None."""
    if status == "succeeded" and output_chars is not None and output_chars > MAX_OUTPUT:
        return (f"the answer is {output_chars} characters, over the {MAX_OUTPUT:,} a step passes on: have the agent "
                "write the data to a file and answer with its path")
    return None


def step_outcome(items: list[dict[str, Any]]) -> tuple[str, str | None] | None:
    """A step's status from its items' once every one ended (None before): succeeded when all did, else the
    first failure by item order, with its error."""
    if any(i["status"] not in DONE for i in items):
        return None
    failed = [i for i in sorted(items, key=lambda i: i["idx"]) if i["status"] in FAILED]
    if not failed:
        return "succeeded", None
    first = failed[0]
    where = f"item {first['idx']}: " if len(items) > 1 else ""
    more = f" (+{len(failed) - 1} more)" if len(failed) > 1 else ""
    return first["status"], f"{where}{first['error'] or first['status']}{more}"


def coerce_inputs(declared: dict[str, Any], given: dict[str, Any]) -> tuple[dict[str, Any], list[str]]:
    """The run's inputs: given ones (a string may hold JSON for another type: the command line's k=v), then
    defaults. Returns them and the problems, each naming its input."""
    from runner.specs.workflow_checking import input_problem

    problems = [f"unknown input '{k}' (inputs: {', '.join(declared) or 'none declared'})"
                for k in given if k not in declared]
    out: dict[str, Any] = {}
    for name, spec in declared.items():
        if name in given:
            value = given[name]
            if isinstance(value, str) and spec.get("type", "string") != "string":
                try:
                    value = json.loads(value)
                except (ValueError, RecursionError):
                    pass  # the type check below says what is wrong with it
            problem = input_problem(name, spec, value)
            if problem:
                problems.append(problem)
            out[name] = value
        elif spec.get("default") is not None:
            out[name] = spec["default"]
        else:
            problems.append(f"input '{name}' is required (it has no default)")
    return out, problems


def reset(tx: sqlite3.Connection, wf_id: str, spec: WorkflowSpec, redo: set[str]) -> None:
    """Before a resume: steps not succeeded (and those in ``redo``) run again; a fan-out keeps the items that
    succeeded unless its step is in ``redo``. Steps the spec no longer has go; new ones are added."""
    ids = [s.id for s in spec.steps]
    old = {r["step"]: r["status"] for r in tx.execute("SELECT step, status FROM wf_steps WHERE workflow_run_id = ?",
                                                       (wf_id,))}
    for gone in set(old) - set(ids):
        tx.execute("DELETE FROM wf_steps WHERE workflow_run_id = ? AND step = ?", (wf_id, gone))
        tx.execute("DELETE FROM wf_items WHERE workflow_run_id = ? AND step = ?", (wf_id, gone))
    for position, step in enumerate(spec.steps):
        status = old.get(step.id)
        if status == "succeeded" and step.id not in redo:
            tx.execute("UPDATE wf_steps SET position = ? WHERE workflow_run_id = ? AND step = ?",
                       (position, wf_id, step.id))
            continue
        keep = status in FAILED and step.id not in redo and step.approval is None
        if keep:  # its items that succeeded stay; the others run again
            tx.execute("UPDATE wf_items SET status = 'pending', run_id = NULL, attempt = 1, retry_of = NULL, "
                       "not_before = 0, error = NULL WHERE workflow_run_id = ? AND step = ? AND status != "
                       "'succeeded'", (wf_id, step.id))
        else:
            tx.execute("DELETE FROM wf_items WHERE workflow_run_id = ? AND step = ?", (wf_id, step.id))
        if step.id in redo:
            tx.execute("DELETE FROM wf_approvals WHERE workflow_run_id = ? AND step = ?", (wf_id, step.id))
        tx.execute("INSERT OR REPLACE INTO wf_steps (workflow_run_id, step, position, status) VALUES (?, ?, ?, ?)",
                   (wf_id, step.id, position, "running" if keep else "pending"))

def order(spec: WorkflowSpec) -> tuple[str, ...]:
    """The steps in an order where each comes after what it needs (the spec has no cycle: validated)."""
    return _order(tuple((s.id, tuple(s.needs)) for s in spec.steps))


@functools.lru_cache(maxsize=256)
def _order(graph: tuple[tuple[str, tuple[str, ...]], ...]) -> tuple[str, ...]:
    return tuple(graphlib.TopologicalSorter({step: set(needs) for step, needs in graph}).static_order())

def deadline(spec: WorkflowSpec, now: float) -> float | None:
    return now + spec.constraints.max_runtime if spec.constraints.max_runtime else None


def descendants(spec: WorkflowSpec, step: str) -> set[str]:
    """``step`` and every step that needs it, directly or not."""
    out = {step}
    changed = True
    while changed:
        changed = False
        for s in spec.steps:
            if s.id not in out and out & set(s.needs):
                out.add(s.id)
                changed = True
    return out
