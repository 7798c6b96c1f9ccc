"""From a parsed document to a WorkflowSpec, with every problem of the file at its position.

What one file can tell: the shape (the pydantic models), unique step ids, that a step runs an agent or waits
for an approval, ``needs`` naming steps of this workflow, no cycle (printed as its path, ``a -> b -> a``),
expressions and templates that parse and name only steps the step needs (so their outputs exist when it
runs) and inputs the workflow declares, inputs a trigger can give, and the triggers themselves. What needs
the other files (the agents a step names, a name taken by an agent) is ``graph_checking.check_refs``, run over the
whole tree.
"""

from __future__ import annotations

import graphlib
import math
from typing import Any

from pydantic import ValidationError

from runner.specs.checking import Context, did_you_mean, from_pydantic, names_read, trigger_problems
from runner.specs.expressions import NAMES
from runner.specs.graph_checking import Ref, refs_of
from runner.specs.loading import Document, Loc
from runner.specs.models import WorkflowSpec
from runner.specs.problems import Problem, Severity, field_path

INPUT_TYPES = {"string": (str,), "number": (int, float), "integer": (int,), "boolean": (bool,),
               "object": (dict,), "array": (list,)}


def check_workflow(doc: Document, ctx: Context, rel_path: str) -> tuple[WorkflowSpec | None, list[Problem], list[Ref]]:
    """All problems of one workflow document; the spec when there is no error; the agents its steps name."""
    problems: list[Problem] = []
    spec: WorkflowSpec | None = None
    try:
        spec = WorkflowSpec.model_validate(doc.data)
    except ValidationError as exc:
        problems.extend(from_pydantic(doc, exc, WorkflowSpec))
    checker = _Checker(doc)
    checker.run()
    problems.extend(checker.problems)
    problems.extend(trigger_problems(doc, ctx, rel_path))
    problems.sort(key=lambda p: (p.line, p.col))
    if any(p.severity == "error" for p in problems):
        spec = None
    return spec, problems, [*checker.refs, *refs_of(doc)]


def input_problem(name: str, declared: dict[str, Any], value: Any) -> str | None:
    """Why ``value`` cannot be input ``name`` of type ``declared['type']``, or None."""
    kind = declared.get("type") or "string"
    ok = isinstance(value, INPUT_TYPES.get(kind, (object,)))
    if kind in ("number", "integer") and (isinstance(value, bool) or (isinstance(value, float) and
                                                                     not math.isfinite(value))):
        ok = False  # NaN and Infinity are no JSON: an answer holding them would not parse
    return None if ok else f"input '{name}' must be {'an' if kind[0] in 'aeiou' else 'a'} {kind}, not {_kind(value)}"


def _kind(value: Any) -> str:
    return {bool: "a boolean", int: "an integer", float: "a number", str: "a string", dict: "a mapping",
            list: "a list", type(None): "empty"}.get(type(value), type(value).__name__)


class _Checker:
    def __init__(self, doc: Document) -> None:
        self.doc = doc
        data = doc.data if isinstance(doc.data, dict) else {}
        self.data = data
        self.problems: list[Problem] = []
        self.refs: list[Ref] = []
        raw_steps = data.get("steps")
        self.steps: list[tuple[int, dict[str, Any]]] = [
            (i, s) for i, s in enumerate(raw_steps if isinstance(raw_steps, list) else [])
            if isinstance(s, dict) and isinstance(s.get("id"), str)]
        inputs = data.get("inputs")
        self.inputs: dict[str, Any] = inputs if isinstance(inputs, dict) else {}

    def _add(self, loc: Loc, message: str, severity: Severity = "error", key: bool = False) -> None:
        line, col = self.doc.position(loc, key=key)
        self.problems.append(Problem(self.doc.file, line, col, field_path(loc), message, severity))

    def run(self) -> None:
        ids = self._ids()
        graph = self._needs(ids)
        ancestors = _ancestors(graph) if not self._cycle(graph) else None  # None: a cycle, said once
        for i, step in self.steps:
            self._kind(i, step)
            self._expressions(i, step, ids, None if ancestors is None else ancestors.get(step["id"], set()))
        self._inputs()

    def _ids(self) -> dict[str, int]:
        ids: dict[str, int] = {}
        for i, step in self.steps:
            if step["id"] in ids:
                first = ids[step["id"]]
                self._add(("steps", i, "id"), f"step id '{step['id']}' is used twice (first as steps[{first}])")
            else:
                ids[step["id"]] = i
        return ids

    def _needs(self, ids: dict[str, int]) -> dict[str, set[str]]:
        graph: dict[str, set[str]] = {}
        for i, step in self.steps:
            needs = step.get("needs")
            graph.setdefault(step["id"], set())
            for j, need in enumerate(needs if isinstance(needs, list) else []):
                if not isinstance(need, str):
                    continue
                if need == step["id"]:
                    self._add(("steps", i, "needs", j), f"step '{need}' cannot need itself")
                elif need not in ids:
                    self._add(("steps", i, "needs", j), f"unknown step '{need}' in needs{did_you_mean(need, ids)} "
                              f"(steps: {', '.join(ids)})")
                else:
                    graph[step["id"]].add(need)
        return graph

    def _cycle(self, graph: dict[str, set[str]]) -> bool:
        try:
            tuple(graphlib.TopologicalSorter(graph).static_order())
        except graphlib.CycleError as exc:
            path = list(reversed(exc.args[1]))  # a -> b: a needs b
            first = next(i for i, s in self.steps if s["id"] == path[0])
            self._add(("steps", first, "needs"), "cycle: " + " -> ".join(path))
            return True
        return False

    def _kind(self, i: int, step: dict[str, Any]) -> None:
        has_agent, has_approval = step.get("agent") is not None, step.get("approval") is not None
        if has_agent == has_approval:
            self._add(("steps", i), "a step runs an agent or waits for a person: give one of 'agent' and "
                      "'approval'" if not has_agent else "a step cannot both run an agent and wait for an approval")
        if has_approval:
            for extra in ("for_each", "retry", "max_parallel", "input"):
                if step.get(extra):
                    self._add(("steps", i, extra), f"an approval step takes no '{extra}' (it runs nothing)", key=True)
        if isinstance(step.get("agent"), str):
            self.refs.append((step["agent"], *self.doc.position(("steps", i, "agent")),
                              field_path(("steps", i, "agent"))))
        if step.get("max_parallel") is not None and not step.get("for_each"):
            self._add(("steps", i, "max_parallel"), "max_parallel applies to a for_each step only", "warning", key=True)

    def _expressions(self, i: int, step: dict[str, Any], ids: dict[str, int], before: set[str] | None) -> None:
        fields: list[tuple[Loc, Any, bool]] = [(("steps", i, "if"), step.get("if"), False),
                                              (("steps", i, "for_each"), step.get("for_each"), False),
                                              (("steps", i, "input"), step.get("input"), True)]
        approval = step.get("approval")
        if isinstance(approval, dict):
            fields.append((("steps", i, "approval", "message"), approval.get("message"), True))
        for loc, text, template in fields:
            if not isinstance(text, str) or not text.strip():
                continue
            names, problems = names_read(text, template=template, known=NAMES)
            for problem in problems:
                self._add(loc, problem)
            if names is None:
                continue
            if "item" in names.used and (not step.get("for_each") or loc[-1] in ("for_each", "if")):
                self._add(loc, "'item' is known only in the input of a for_each step")
            for ref in sorted(names.steps):
                if ref not in ids:
                    self._add(loc, f"unknown step '{ref}'{did_you_mean(ref, ids)} (steps: {', '.join(ids)})")
                elif ref == step["id"]:
                    self._add(loc, f"step '{ref}' cannot read its own outputs")
                elif before is not None and ref not in before:
                    self._add(loc, f"step '{ref}' may not have run when this one starts: add it to needs")
            for name in sorted(names.inputs - set(self.inputs)):
                self._add(loc, f"unknown input '{name}'{did_you_mean(name, self.inputs)} "
                          f"(inputs: {', '.join(self.inputs) or 'none declared'})")

    def _inputs(self) -> None:
        triggers = self.data.get("triggers")
        triggered = [t for t in (triggers if isinstance(triggers, list) else []) if isinstance(t, dict)]
        for name, declared in self.inputs.items():
            if not isinstance(declared, dict):
                continue
            default = declared.get("default")
            if default is not None:
                problem = input_problem(name, declared, default)
                if problem:
                    self._add(("inputs", name, "default"), f"the default of {problem}")
            elif triggered and (silent := [t for t in triggered if name not in (t.get("inputs") or {})]):
                hook = silent[0].get("type") == "webhook"
                self._add(("inputs", name), f"input '{name}' is required (it has no default), and a "
                          f"{silent[0].get('type')} trigger gives no {name if hook else 'inputs'}: give it a default"
                          + (", or map it in the webhook's inputs" if hook else ""))
        for i, trig in enumerate(triggers if isinstance(triggers, list) else []):
            mapped = trig.get("inputs") if isinstance(trig, dict) else None
            for key in mapped if isinstance(mapped, dict) else {}:
                if key not in self.inputs:
                    self._add(("triggers", i, "inputs", key), f"'{key}' is not an input of this workflow (inputs: "
                              f"{', '.join(self.inputs) or 'none declared'})", key=True)


def _ancestors(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """Each step's transitive needs (the graph has no cycle)."""
    out: dict[str, set[str]] = {}

    def walk(step: str) -> set[str]:
        if step not in out:
            out[step] = set()
            for need in graph.get(step, ()):
                out[step] |= {need} | walk(need)
        return out[step]

    for step in graph:
        walk(step)
    return out
