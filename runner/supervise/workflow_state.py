"""What a workflow run's steps see of each other, and the decisions about one step that need no daemon.

``StepsView`` turns the live rows of a run into the ``steps`` an expression reads: each step's status,
``output`` (the run's answer), ``outputs`` (a list, in item order for a fan-out), ``json`` (the answer parsed
when it is JSON, code fences allowed), and for an approval ``approved``, ``by`` and ``comment``.
"""

from __future__ import annotations

import functools
import graphlib
import json
import re
import sqlite3
from collections.abc import Callable, Iterator
from typing import Any

from runner.errors import ExpressionError
from runner.specs.expressions import evaluate, render
from runner.specs.models import WorkflowSpec, WorkflowStep

MAX_OUTPUT = 16_000  # characters of an answer a step passes on: what the ledger keeps of it
MAX_ITEMS = 10_000  # items of one fan-out
FAILED = ("failed", "timed_out", "budget_exceeded", "stopped", "interrupted")
DONE = ("succeeded", "skipped", *FAILED)
FENCE = re.compile(r"^\s*```[a-zA-Z0-9]*\s*\n(.*)\n\s*```\s*$", re.DOTALL)


def parse_json(text: str | None) -> Any:
    """The answer as JSON (inside a ```json fence too), or None when it is not JSON."""
    if not text:
        return None
    fenced = FENCE.match(text)
    try:
        return json.loads(fenced.group(1) if fenced else text)
    except ValueError:
        return None


class StepsView(dict[str, Any]):
    """``steps`` as an expression reads it, each step's entry made when first read (a step's answers are read
    from the store then, and parsed as JSON then): an expression that reads one step costs one step's reading."""

    def __init__(self, spec_steps: list[WorkflowStep], states: dict[str, dict[str, Any]],
                 outputs: Callable[[str], list[tuple[int, str, str | None]]],
                 approvals: Callable[[], dict[str, dict[str, Any]]]) -> None:
        super().__init__()
        self._declared = {s.id: s for s in spec_steps}
        self._states, self._outputs, self._approvals = states, outputs, approvals
        self._decisions: dict[str, dict[str, Any]] | None = None

    def __contains__(self, key: object) -> bool:
        return key in self._declared

    def __missing__(self, key: str) -> dict[str, Any]:
        declared = self._declared.get(key)
        if declared is None:
            raise KeyError(key)
        outputs = [out if status == "succeeded" else None for _, status, out in self._outputs(key)]
        entry: dict[str, Any] = {"status": self._states.get(key, {}).get("status", "pending"), "outputs": outputs}
        if declared.for_each:
            entry["output"] = "\n".join(o for o in outputs if o is not None)
            entry["json"] = [parse_json(o) for o in outputs]
        else:
            entry["output"] = outputs[0] if outputs else None
            entry["json"] = parse_json(entry["output"])
        if declared.approval is not None:
            if self._decisions is None:
                self._decisions = self._approvals()
            decision = self._decisions.get(key) or {}
            entry.update(approved=decision.get("approved"), by=decision.get("by"), comment=decision.get("comment"),
                         output=decision.get("comment"))
        self[key] = entry
        return entry

    def __iter__(self) -> Iterator[str]:
        return iter(self._declared)

    def __len__(self) -> int:
        return len(self._declared)


def decide_if(step: WorkflowStep, context: dict[str, Any]) -> bool:
    """Whether the step runs (its ``if``). Raises ExpressionError, said as the field's."""
    if not step.if_:
        return True
    try:
        return bool(evaluate(step.if_, context))
    except ExpressionError as exc:
        raise ExpressionError(f"if: {exc}") from None


def items_of(step: WorkflowStep, context: dict[str, Any]) -> list[tuple[Any, str]]:
    """The step's runs as (item, rendered input): one for a plain step, one per item of a fan-out."""
    if not step.for_each:
        return [(None, _render(step.input, context, "input"))]
    try:
        value = evaluate(step.for_each, context)
    except ExpressionError as exc:
        raise ExpressionError(f"for_each: {exc}") from None
    if isinstance(value, dict | str) or not hasattr(value, "__iter__"):
        kind = "a mapping" if isinstance(value, dict) else type(value).__name__
        raise ExpressionError(f"for_each: '{step.for_each}' gives {kind}, not a list")
    values = list(value)
    if len(values) > MAX_ITEMS:
        raise ExpressionError(f"for_each: {len(values)} items, over {MAX_ITEMS} in one fan-out")
    return [(item, _render(step.input, {**context, "item": item}, "input")) for item in values]


def _render(template: str, context: dict[str, Any], field: str) -> str:
    try:
        return render(template, context)
    except ExpressionError as exc:
        raise ExpressionError(f"{field}: {exc}") from None


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
                except ValueError:
                    pass
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
