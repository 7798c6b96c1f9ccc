"""Validate a tree of spec files: each file on its own, then what spans files (unique names).

A tree is a list of ``SpecFile`` with git blob ids, whether it came from a folder on disk or from a
commit's objects; the blob id (with the validation context) keys a cache, so a repository of
10,000 specs where one changed re-validates one file.
"""

from __future__ import annotations

import hashlib
import json
import os
import posixpath
from collections.abc import Callable, Iterable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from runner.specs.catalog import ToolInfo
from runner.specs.checking import Context, check_document
from runner.specs.custom_tools import describe_module
from runner.specs.graph_checking import Ref, check_refs, refs_of
from runner.specs.loading import load_document
from runner.specs.models import AgentSpec, WorkflowSpec
from runner.specs.problems import Problem
from runner.specs.workflow_checking import check_workflow

KINDS = ("agent", "workflow")

SPEC_SUFFIXES = (".yaml", ".yml")


@dataclass(frozen=True)
class SpecFile:
    rel_path: str  # relative to the spec source folder, '/'-separated
    blob: str  # git blob id of the content
    read: Callable[[], bytes]
    display: str = ""  # how problems name the file (defaults to rel_path)


@dataclass
class SpecResult:
    rel_path: str
    blob: str
    file: str  # as problems name it
    name: str | None  # known even for most invalid files, so an invalid agent is not taken as deleted
    spec: AgentSpec | WorkflowSpec | None
    problems: list[Problem] = field(default_factory=list)
    # Known valid without re-reading: same blob, path and context as an applied, valid agent.
    known_good: bool = False
    name_at: tuple[int, int] = (1, 1)  # where the name is written, for problems about it
    kind: str = "agent"  # or workflow
    refs: list[Ref] = field(default_factory=list)  # the specs it names, where (graph_checking)

    @property
    def valid(self) -> bool:
        if self.known_good:
            return True
        return self.spec is not None and not any(p.severity == "error" for p in self.problems)


def is_spec_path(rel_path: str) -> bool:
    """Every *.yaml/*.yml file is a spec, except below tools/ and in files or folders named . or _*.

    The underscore rule leaves room for support files, such as scripted model turns in _scripts/.
    """
    parts = rel_path.split("/")
    if parts[0] == "tools" or any(p.startswith((".", "_")) for p in parts):
        return False
    return rel_path.endswith(SPEC_SUFFIXES)


def blob_id(data: bytes) -> str:
    """The git blob id of ``data`` (so files on disk and in git share cache entries)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def custom_tools_of(files: Iterable[SpecFile]) -> dict[str, ToolInfo]:
    tools = {}
    for f in files:
        parts = f.rel_path.split("/")
        if len(parts) == 2 and parts[0] == "tools" and parts[1].endswith(".py") and parts[1] != "__init__.py":
            name = parts[1][:-3]
            if name.isidentifier():
                tools[name] = describe_module(name, f.read())
    return tools


def validate_tree(
    files: list[SpecFile],
    *,
    client_id: str,
    home: str,
    cache: MutableMapping[str, dict[str, Any]] | None = None,
    custom_tools: dict[str, ToolInfo] | None = None,
    file_exists: Callable[[str], bool] | None = None,
    known_good: dict[str, tuple[str, str, str]] | None = None,
    across: bool = True,
) -> tuple[list[SpecResult], str]:
    """Validate every spec file of a tree; ``files`` may hold support files too (tools, scripts).

    ``known_good`` maps a path to (blob, context fingerprint, agent name) of specs already applied
    and valid: when blob and fingerprint still match, the file is not read at all. ``across``: check what
    spans files (unique names, the agents workflows name) here; a caller that puts trees together does it
    once over all of them. Returns the results and the context fingerprint.
    """
    all_paths = {f.rel_path for f in files}
    ctx = Context(
        client_id=client_id,
        home=home,
        custom_tools=custom_tools if custom_tools is not None else custom_tools_of(files),
        file_exists=file_exists or all_paths.__contains__,
    )
    fingerprint = _fingerprint(ctx, all_paths)
    known_good = known_good or {}
    results = []
    for f in files:
        if not is_spec_path(f.rel_path):
            continue
        known = known_good.get(f.rel_path)
        if known and known[0] == f.blob and known[1] == fingerprint:
            results.append(SpecResult(f.rel_path, f.blob, f.display or f.rel_path, known[2], None, known_good=True))
        else:
            results.append(validate_file(f, ctx, fingerprint, cache))
    if across:
        check_unique_names(results)
        check_refs(results)
    return results, fingerprint


def validate_file(
    f: SpecFile, ctx: Context, fingerprint: str, cache: MutableMapping[str, dict[str, Any]] | None
) -> SpecResult:
    display = f.display or f.rel_path
    key = hashlib.sha1(f"{f.blob}\0{f.rel_path}\0{display}\0{fingerprint}".encode()).hexdigest()
    if cache is not None and key in cache:
        return _from_cache(f, cache[key])
    doc, problems = load_document(f.read(), display)
    spec: AgentSpec | WorkflowSpec | None = None
    name = None
    kind, refs = "agent", list[Ref]()
    if doc is not None:
        raw_kind = doc.data.get("kind", "agent") if isinstance(doc.data, dict) else "agent"
        if raw_kind == "workflow":
            kind = "workflow"
            spec, problems, refs = check_workflow(doc, ctx, f.rel_path)
        elif raw_kind in KINDS:
            spec, problems = check_document(doc, ctx, f.rel_path)
            refs = refs_of(doc)
        else:
            problems = [Problem(display, *doc.position(("kind",)), "kind",
                                f"{raw_kind!r} is not a kind of spec: write agent (the default) or workflow")]
        raw_name = doc.data.get("name") if isinstance(doc.data, dict) else None
        name = raw_name if isinstance(raw_name, str) and raw_name else None
    result = SpecResult(f.rel_path, f.blob, display, spec.name if spec else name, spec, problems,
                        name_at=doc.position(("name",)) if doc is not None else (1, 1), kind=kind, refs=refs)
    if cache is not None:
        cache[key] = _to_cache(result)
    return result


def check_unique_names(results: list[SpecResult]) -> None:
    """Two files naming the same agent or workflow are both invalid: picking a winner by file order would be a
    guess."""
    by_name: dict[str, list[SpecResult]] = {}
    for r in results:
        if r.name:
            by_name.setdefault(r.name, []).append(r)
    for name, group in by_name.items():
        if len(group) < 2:
            continue
        for r in group:
            others = ", ".join(f"{o.rel_path} ({'an agent' if o.kind == 'agent' else 'a workflow'})"
                               if o.kind != r.kind else o.rel_path
                               for o in group if o is not r)
            problem = Problem(r.file, *r.name_at, "name", f"{r.kind} '{name}' is also defined in {others}"
                              + ("; agents and workflows share one set of names" if any(o.kind != r.kind
                                                                                       for o in group) else ""))
            if problem not in r.problems:  # idempotent: callers may check a tree and then all trees
                r.problems = [*r.problems, problem]
            r.spec = None
            r.known_good = False


def files_on_disk(paths: list[str]) -> list[tuple[Path, list[SpecFile]]]:
    """Group command-line PATHs into trees: a folder is a tree; a lone file is a tree of its folder."""
    trees = []
    for raw in paths:
        path = Path(raw)
        if path.is_dir():
            files = [_disk_file(p, path, os.path.join(raw, p.relative_to(path).as_posix()))
                     for p in sorted(path.rglob("*")) if p.is_file() or (p.is_symlink() and not p.exists())]
            trees.append((path, files))
        else:
            support = [_disk_file(p, path.parent, str(p)) for p in sorted((path.parent / "tools").glob("*.py"))]
            trees.append((path.parent, [_disk_file(path, path.parent, raw), *support]))
    return trees


def _disk_file(path: Path, root: Path, display: str) -> SpecFile:
    rel = path.relative_to(root).as_posix() if path != root else path.name

    def read() -> bytes:
        try:
            return path.read_bytes()
        except OSError as exc:
            return f"\0unreadable: {exc.strerror}".encode()

    try:
        blob = blob_id(path.read_bytes()) if rel.endswith(SPEC_SUFFIXES) or rel.endswith(".py") else ""
    except OSError:
        blob = ""
    return SpecFile(rel, blob, read, display)


def _fingerprint(ctx: Context, all_paths: set[str]) -> str:
    tools = sorted((t.name, sorted(t.allowed), t.error) for t in ctx.custom_tools.values())
    support = sorted(p for p in all_paths if not is_spec_path(p))
    return hashlib.sha1(json.dumps([ctx.client_id, ctx.home, tools, support]).encode()).hexdigest()


def _to_cache(r: SpecResult) -> dict[str, Any]:
    return {
        "name": r.name,
        "spec": r.spec.model_dump(mode="json", by_alias=True) if r.spec else None,
        "problems": [p.as_json() for p in r.problems],
        "name_at": list(r.name_at),
        "kind": r.kind,
        "refs": [list(ref) for ref in r.refs],
    }


def _from_cache(f: SpecFile, entry: dict[str, Any]) -> SpecResult:
    kind = entry.get("kind", "agent")
    model: type[AgentSpec] | type[WorkflowSpec] = WorkflowSpec if kind == "workflow" else AgentSpec
    spec = model.model_validate(entry["spec"]) if entry["spec"] else None
    problems = [Problem.from_json(p) for p in entry["problems"]]
    line, col = entry.get("name_at", [1, 1])
    refs: list[Ref] = [(str(n), int(a), int(b), str(c)) for n, a, b, c in entry.get("refs", [])]
    return SpecResult(f.rel_path, f.blob, f.display or f.rel_path, entry["name"], spec, problems, name_at=(line, col),
                      kind=kind, refs=refs)


def normalize_rel(path: str) -> str:
    return posixpath.normpath(path).lstrip("/")
