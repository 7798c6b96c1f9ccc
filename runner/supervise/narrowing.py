"""An agent asked as a tool runs with what both it and its caller may do: its spec, narrowed.

``narrow(callee, caller, ...)`` is pure: specs in, a spec out, which the sandbox then enforces like any
other (Landlock gets the narrowed paths, the proxy the narrowed domains). Rules (docs/events.md):

- **Permissions.** A tool keeps only the permissions the caller holds on some tool of its own. A tool
  that loses one it needs to work is dropped. Omitted permissions are the tool's needs (for a custom
  tool, what its module declares), as the sandbox reads them.
- **Paths.** For each path permission a tool keeps (read, write, execute), its paths are cut to the
  region where the caller holds that permission: a callee path inside a caller's path stays; a
  caller's path inside a callee path replaces it. A tool that had paths and has none left is dropped.
- **shell** keeps the commands both list (any caller shell tool's); none left, it is dropped.
- **allowed_domains** is the intersection, wildcards included (``*.example.com`` ∩ ``api.example.com``
  is ``api.example.com``); ``local`` stays when both have it.
- **Memory** stays the callee's own: its memory tools are kept as they are.
- Its own ``agent`` tools are kept while the depth allows one more level, ``remote_agent`` tools too
  when their host is still in the narrowed domains; the supervisor checks each call again anyway.

Paths are compared expanded (each spec with its own variables: ``${AGENT_NAME}`` differs) and
normalised, as written: the sandbox refuses a symbolic link on the way, so no link can widen them.
"""

from __future__ import annotations

import os
import urllib.parse
from collections.abc import Iterable

from runner.specs.catalog import BUILTIN_TOOLS, ToolInfo
from runner.specs.checking import expand
from runner.specs.custom_tools import describe_module
from runner.specs.domains import refusal
from runner.specs.models import AgentSpec, ToolSpec

PATH_PERMISSIONS = ("read", "write", "execute")
MEMORY_TOOLS = ("memory_search", "memory_save")


def narrow(callee: AgentSpec, caller: AgentSpec, *, callee_vars: dict[str, str], caller_vars: dict[str, str],
           callee_sources: dict[str, str], caller_sources: dict[str, str], deeper: bool) -> AgentSpec:
    """``callee`` with what ``caller`` holds too; ``deeper``: the callee may ask agents in its turn."""
    held = [_held(t, caller_vars, caller_sources) for t in caller.tools if not (t.agent or t.remote_agent)]
    holds = set().union(*(perms for perms, _paths in held)) if held else set()
    region = {p: [path for perms, paths in held if p in perms for path in paths] for p in PATH_PERMISSIONS}
    commands = {c for t in caller.tools if t.name == "shell" for c in t.commands}
    domains = intersect_domains(callee.constraints.allowed_domains, caller.constraints.allowed_domains)
    tools: list[ToolSpec] = []
    for tool in callee.tools:
        if tool.agent or tool.remote_agent:
            if deeper and (tool.agent or _reachable(tool.remote_agent or "", domains)):
                tools.append(tool)
            continue
        if tool.name in MEMORY_TOOLS:
            tools.append(tool)
            continue
        kept = _narrow_tool(tool, _info(tool.name, callee_sources), holds, region, commands, callee_vars)
        if kept is not None:
            tools.append(kept)
    constraints = callee.constraints.model_copy(update={"allowed_domains": domains})
    return callee.model_copy(update={"tools": tools, "constraints": constraints})


def _narrow_tool(tool: ToolSpec, info: ToolInfo, holds: set[str], region: dict[str, list[str]],
                 commands: set[str], variables: dict[str, str]) -> ToolSpec | None:
    own: set[str] = set(tool.permissions) if tool.permissions is not None else set(info.needs)
    perms = own & holds
    if (info.needs - perms) or (own and not perms):
        return None  # it cannot work without what it lost
    update: dict[str, object] = {"permissions": sorted(perms)}
    if tool.paths:
        paths = [_normal(expand(p, variables)) for p in tool.paths]
        # A path a custom tool is given is read at least, as the sandbox grants it.
        for perm in (perms & set(PATH_PERMISSIONS)) or {"read"}:
            paths = intersect_paths(paths, region[perm])
        if not paths:
            return None
        update["paths"] = paths
    if tool.name == "shell":
        kept = [c for c in tool.commands if c in commands]
        if not kept:
            return None
        update["commands"] = kept
    return tool.model_copy(update=update)


def _held(tool: ToolSpec, variables: dict[str, str], sources: dict[str, str]) -> tuple[set[str], list[str]]:
    """What a caller's tool holds: its permissions and its paths (expanded, normalised)."""
    info = _info(tool.name, sources)
    perms: set[str] = set(tool.permissions) if tool.permissions is not None else set(info.needs)
    if tool.name in MEMORY_TOOLS:
        perms = set()  # its read and write are of its own memory, not of files
    return perms, [_normal(expand(p, variables)) for p in tool.paths]


def _info(name: str, sources: dict[str, str]) -> ToolInfo:
    return BUILTIN_TOOLS.get(name) or describe_module(name, sources.get(name, "").encode())


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
