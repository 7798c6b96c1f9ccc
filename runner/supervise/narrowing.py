"""An agent asked as a tool runs with what both it and its caller may do: its spec, narrowed.

``narrow(callee, caller, ...)`` is pure: specs in, a spec out, which the sandbox then enforces like any
other (Landlock gets the narrowed paths, the proxy the narrowed domains). Rules (docs/events.md):

- **Permissions.** A tool keeps only the permissions the caller holds on some tool of its own. A tool
  that loses one it needs to work is dropped. Omitted permissions are read as the sandbox reads them
  (``catalog.effective_permissions``: the tool's needs; a custom tool's, what its module declares).
- **Paths.** For each path permission a tool's paths give it in the sandbox (``catalog.path_access``),
  its paths are cut to the region where the caller's paths give that permission: a callee path inside a
  caller's path stays; a caller's path inside a callee path replaces it. A tool that had paths and has
  none left is dropped. A tool that does not use paths (memory tools, http_get) loses them, on either
  side: they give nothing in the sandbox, so they give nothing here.
- **shell** keeps the commands both list (any caller shell tool's); none left, it is dropped.
- **allowed_domains** is the intersection, wildcards included (``*.example.com`` ∩ ``api.example.com``
  is ``api.example.com``); ``local`` stays when both have it.
- **Memory** stays the callee's own: its memory tools are kept (without paths).
- Its own ``agent`` tools are kept while the depth allows one more level, ``remote_agent`` tools too
  when their host is still in the narrowed domains; the supervisor checks each call again anyway.

Paths are compared expanded (each spec with its own variables: ``${AGENT_NAME}`` differs) and
normalised, as written: the sandbox refuses a symbolic link on the way, so no link can widen them.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Iterable

from runner.specs.catalog import PATH_PERMISSIONS, ToolInfo, effective_permissions, path_access, uses_paths
from runner.specs.checking import expand
from runner.specs.custom_tools import tool_info
from runner.specs.domains import refusal
from runner.specs.models import AgentSpec, ToolSpec

MEMORY_TOOLS = ("memory_search", "memory_save")


def narrow(callee: AgentSpec, caller: AgentSpec, *, callee_vars: dict[str, str], caller_vars: dict[str, str],
           callee_sources: dict[str, str], caller_sources: dict[str, str], deeper: bool) -> AgentSpec:
    """``callee`` with what ``caller`` holds too; ``deeper``: the callee may ask agents in its turn."""
    held = [_held(t, caller_vars, caller_sources) for t in caller.tools if not (t.agent or t.remote_agent)]
    holds = set().union(*(perms for perms, _access, _paths in held)) if held else set()
    region = {p: [path for _perms, access, paths in held if p in access for path in paths] for p in PATH_PERMISSIONS}
    commands = {c for t in caller.tools if t.name == "shell" for c in t.commands}
    domains = intersect_domains(callee.constraints.allowed_domains, caller.constraints.allowed_domains)
    tools: list[ToolSpec] = []
    for tool in callee.tools:
        if tool.agent or tool.remote_agent:
            if deeper and (tool.agent or _reachable(tool.remote_agent or "", domains)):
                tools.append(tool)
            continue
        if tool.name in MEMORY_TOOLS:
            tools.append(tool.model_copy(update={"paths": []}))  # of its own memory; paths give it nothing
            continue
        kept = _narrow_tool(tool, tool_info(tool.name, callee_sources), holds, region, commands, callee_vars)
        if kept is not None:
            tools.append(kept)
    constraints = callee.constraints.model_copy(update={"allowed_domains": domains})
    return callee.model_copy(update={"tools": tools, "constraints": constraints})


def _narrow_tool(tool: ToolSpec, info: ToolInfo, holds: set[str], region: dict[str, list[str]],
                 commands: set[str], variables: dict[str, str]) -> ToolSpec | None:
    own = effective_permissions(info, tool.permissions)
    perms = own & holds
    if (info.needs - perms) or (own and not perms):
        return None  # it cannot work without what it lost
    update: dict[str, object] = {"permissions": sorted(perms), "paths": []}
    access = path_access(info, perms)  # what its paths give it in the sandbox, once narrowed
    if tool.paths and uses_paths(info):
        paths = [_normal(expand(p, variables)) for p in tool.paths]
        for perm in access:
            paths = intersect_paths(paths, region[perm])
        if not paths or not access:
            return None
        update["paths"] = paths
    if tool.name == "shell":
        kept = [c for c in tool.commands if c in commands]
        if not kept:
            return None
        update["commands"] = kept
    return tool.model_copy(update=update)


def _held(tool: ToolSpec, variables: dict[str, str],
          sources: dict[str, str]) -> tuple[frozenset[str], frozenset[str], list[str]]:
    """What a caller's tool holds: its permissions, what its paths give it in the sandbox, and those paths
    (expanded, normalised), all as the sandbox reads them."""
    info = tool_info(tool.name, sources)
    if tool.name in MEMORY_TOOLS:
        return frozenset(), frozenset(), []  # its read and write are of its own memory, not of files
    access = path_access(info, tool.permissions)
    return (effective_permissions(info, tool.permissions), access,
            [_normal(expand(p, variables)) for p in tool.paths] if access else [])


def _normal(path: str) -> str:
    return os.path.normpath(os.path.abspath(path))


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def intersect_paths(mine: Iterable[str], theirs: Iterable[str]) -> list[str]:
    """The paths both sets of folders cover: each of mine inside one of theirs, and each of theirs inside
    one of mine (the narrower one stands for both), without repeats or paths inside another kept one."""
    mine, theirs = list(mine), list(theirs)
    both = [p for p in mine if any(_within(p, q) for q in theirs)]
    both += [q for q in theirs if any(_within(q, p) for p in mine)]
    out: list[str] = []
    for p in sorted(set(both), key=len):
        if not any(_within(p, kept) for kept in out):
            out.append(p)
    return sorted(out)


def intersect_domains(mine: Iterable[str], theirs: Iterable[str]) -> list[str]:
    """The hosts both lists allow, as a list of the same form: names, '*.domain' or 'local'."""
    out: list[str] = []
    theirs = [d.lower() for d in theirs]
    for a in (d.lower() for d in mine):
        for b in theirs:
            kept = _meet(a, b)
            if kept is not None and kept not in out:
                out.append(kept)
    return out


def _meet(a: str, b: str) -> str | None:
    if a == b:
        return a
    if "local" in (a, b):
        return None
    if a.startswith("*.") and _matches(b, a):
        return b  # b is a name under a's domain, or a narrower wildcard
    if b.startswith("*.") and _matches(a, b):
        return a
    return None


def _matches(host: str, wildcard: str) -> bool:
    """Whether ``host`` (a name or a wildcard) lies under ``wildcard`` ('*.example.com' covers
    'a.example.com' and '*.a.example.com', not 'example.com')."""
    return host.removeprefix("*.").endswith(wildcard[1:]) if host.startswith("*.") else host.endswith(wildcard[1:])


def _reachable(url: str, domains: list[str]) -> bool:
    """Whether a remote agent's host is still in the narrowed domains (by name: nothing is resolved)."""
    return refusal(urllib.parse.urlsplit(url).hostname or "", domains, None) is None
