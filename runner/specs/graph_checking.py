"""What only the whole tree can tell: the names specs give each other, and the graphs they make.

Each spec file says where it names another spec (its refs, with positions): a workflow's steps name agents; an
agent's tools name the agents they ask; a ``run_completed`` trigger names the agent or workflow it watches; a
``webhook`` trigger names its URL segment. ``check_refs`` then checks, over all the files of a client:

- each name is a spec of the right kind (a step and a tool ask an agent; a trigger watches either);
- no cycle of ``run_completed`` triggers (``a`` fires on ``b``'s end and ``b`` on ``a``'s), nor of agents asking
  each other as tools: each is printed as its path, ``a -> b -> a``;
- no two webhooks share a URL segment.
"""

from __future__ import annotations

from typing import Any

from runner.specs.checking import did_you_mean
from runner.specs.loading import Document
from runner.specs.problems import Problem

Ref = tuple[str, int, int, str]  # a name a spec gives: (name, line, col, field)


def refs_of(doc: Document) -> list[Ref]:
    """An agent's or workflow's tool, trigger and webhook refs (a workflow's steps are ``check_workflow``'s)."""
    data = doc.data if isinstance(doc.data, dict) else {}
    out: list[Ref] = []
    tools = data.get("tools")
    for i, tool in enumerate(tools if isinstance(tools, list) else []):
        if isinstance(tool, dict) and isinstance(tool.get("agent"), str):
            out.append((tool["agent"], *doc.position(("tools", i, "agent")), f"tools[{i}].agent"))
    triggers = data.get("triggers")
    for i, trig in enumerate(triggers if isinstance(triggers, list) else []):
        if not isinstance(trig, dict):
            continue
        if trig.get("type") == "run_completed":
            for key in ("agent", "workflow"):
                if isinstance(trig.get(key), str):
                    out.append((trig[key], *doc.position(("triggers", i, key)), f"triggers[{i}].{key}"))
        elif trig.get("type") == "webhook":
            segment = trig.get("path") if isinstance(trig.get("path"), str) else data.get("name")
            if isinstance(segment, str):  # a URL segment, marked by its '/': no spec is named so
                named = isinstance(trig.get("path"), str)
                loc = ("triggers", i, "path") if named else ("triggers", i)
                out.append((f"/{segment}", *doc.position(loc), f"triggers[{i}]" + (".path" if named else "")))
    return out


def has_refs(spec: dict[str, Any] | None) -> bool:
    """Whether an applied spec names other specs (then it is validated with the tree, never skipped as known)."""
    spec = spec or {}
    return any(isinstance(t, dict) and t.get("agent") for t in spec.get("tools") or []) or \
        any(isinstance(t, dict) and t.get("type") in ("run_completed", "webhook") for t in spec.get("triggers") or [])


def check_refs(results: list[Any], context: list[Any] | None = None) -> None:
    """Check the refs of ``results`` (SpecResults, in place) against the tree; the ``context`` results (specs
    beside a file validated alone) count as known and are not checked."""
    named = {(r.kind, r.name) for r in results}
    known = [*results, *(c for c in context or [] if (c.kind, c.name) not in named)]  # a file is in both: once
    kinds = {r.name: r.kind for r in known if r.name}
    agents = {n for n, k in kinds.items() if k == "agent"}
    found: dict[int, list[Problem]] = {}
    for r in results:
        for name, line, col, field in r.refs:
            why = _wrong_name(name, field, kinds, agents)
            if why:
                found.setdefault(id(r), []).append(Problem(r.file, line, col, field, why))
    for what, edges in (("run_completed triggers", _completion_edges(known)), ("agents asking agents as tools",
                                                                              _tool_edges(known))):
        for cycle, (r, line, col, field) in _cycles(edges):
            if r in results:
                found.setdefault(id(r), []).append(Problem(
                    r.file, line, col, field, f"{what} make a cycle: {' -> '.join(cycle)}"))
    segments: dict[str, list[tuple[Any, Ref]]] = {}
    for r in known:
        for ref in r.refs:
            if ref[0].startswith("/"):
                segments.setdefault(ref[0][1:], []).append((r, ref))
    for segment, holders in segments.items():
        for r, (_, line, col, field) in holders if len(holders) > 1 else []:
            if r in results:
                others = ", ".join(o.name or o.file for o, _ in holders if o is not r)
                why = f"the webhook path '{segment}' is also {others}'s: each webhook needs a path of its own"
                found.setdefault(id(r), []).append(Problem(r.file, line, col, field, why))
    for r in results:
        new = [p for p in found.get(id(r), []) if p not in r.problems]
        if new:
            r.problems = sorted([*r.problems, *new], key=lambda p: (p.line, p.col))
            r.spec = None
            r.known_good = False


def _wrong_name(name: str, field: str, kinds: dict[str, str], agents: set[str]) -> str | None:
    if name.startswith("/"):
        return None
    want = "workflow" if field.endswith(".workflow") else "agent"
    if kinds.get(name) == want:
        return None
    if name in kinds:
        if field.startswith("steps"):
            return f"'{name}' is a workflow; a step runs an agent"
        if field.startswith("tools"):
            return f"'{name}' is a workflow; a tool asks an agent"
        return f"'{name}' is {'an agent' if kinds[name] == 'agent' else 'a workflow'}: write {kinds[name]}: {name}"
    choices = agents if want == "agent" else {n for n, k in kinds.items() if k == "workflow"}
    return f"unknown {want} '{name}'{did_you_mean(name, choices)}"


Edge = tuple[str, str, Any, tuple[int, int, str]]  # (from, to, the result holding it, where)


def _completion_edges(results: list[Any]) -> list[Edge]:
    """The watched spec's end starts the watcher: watched -> watcher."""
    return [(name, r.name, r, (line, col, field)) for r in results if r.name
            for name, line, col, field in r.refs if field.startswith("triggers") and not name.startswith("/")]


def _tool_edges(results: list[Any]) -> list[Edge]:
    return [(r.name, name, r, (line, col, field)) for r in results if r.name
            for name, line, col, field in r.refs if field.startswith("tools")]


def _cycles(edges: list[Edge]) -> list[tuple[list[str], tuple[Any, int, int, str]]]:
    """Each edge that lies on a cycle, with one cycle through it as its path (first node repeated last)."""
    graph: dict[str, list[str]] = {}
    for a, b, _, _ in edges:
        graph.setdefault(a, []).append(b)
    out = []
    for a, b, r, (line, col, field) in edges:
        path = _path(graph, b, a)
        if path is not None:
            out.append(([a, *path], (r, line, col, field)))
    return out


def _path(graph: dict[str, list[str]], start: str, goal: str) -> list[str] | None:
    """A shortest path from ``start`` to ``goal`` (both included), or None."""
    before: dict[str, str | None] = {start: None}
    frontier = [start]
    while frontier:
        nxt = []
        for node in frontier:
            if node == goal:
                path = [node]
                while before[path[-1]] is not None:
                    path.append(before[path[-1]])  # type: ignore[arg-type]
                return path[::-1]
            for child in graph.get(node, []):
                if child not in before:
                    before[child] = node
                    nxt.append(child)
        frontier = nxt
    return None
