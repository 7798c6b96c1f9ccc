"""From a parsed document to an AgentSpec, with every problem of the file, each at its position.

Two passes over the same document, both always run so a file's problems come out together:
the pydantic models check shapes (types, unknown fields, choices), and ``_semantics`` checks what
needs context (cron syntax, time zones, known tools and their permissions, path variables, the
runner's own folders no tool path may touch). The semantic pass reads the raw data defensively, so it
works even where the shape is wrong.
"""

from __future__ import annotations

import difflib
import functools
import os
import re
import sys
import types
import typing
import urllib.parse
import zoneinfo
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from croniter import croniter
from pydantic import BaseModel, ValidationError

from runner.errors import ExpressionError, UsageError
from runner.settings import Settings, client_ids, own_variable
from runner.specs import domains
from runner.specs.catalog import BUILTIN_TOOLS, PERMISSIONS, ToolInfo
from runner.specs.expressions import Names, check
from runner.specs.loading import Document, Loc
from runner.specs.models import AgentSpec
from runner.specs.problems import Problem, Severity, field_path

VARIABLE = re.compile(r"\$\{([^}]*)\}")
HOSTNAME = re.compile(r"^(\*\.)?([a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)(\.[a-z0-9]([a-z0-9-]{0,61}[a-z0-9])?)*$")
WHY = "a run sees nothing of the runner's own files or the system's"
CRON_ALIASES = {"@yearly", "@annually", "@monthly", "@weekly", "@daily", "@midnight", "@hourly"}

FIELD_HINTS = {
    "name": "use lowercase letters, digits, '-' and '_' (at most 63, starting with a letter or digit)",
    "model": "write NAME, ollama:NAME, openai:NAME or scripted:PATH",
    "collection": "use lowercase letters, digits, '-' and '_'",
}


@dataclass(frozen=True)
class Context:
    """What validating a spec depends on besides the file itself."""

    client_id: str = "default"
    home: str = "/var/lib/agent-orchestrator"
    custom_tools: dict[str, ToolInfo] = field(default_factory=dict)
    # Whether a support file exists, by path relative to the spec source folder (scripted models).
    file_exists: Callable[[str], bool] = lambda _path: True
    # The runner's own folders and files, as (what, path), that no tool path may overlap. None: those of
    # the settings at ``home`` (its settings file and this environment), as a daemon on that home sees them.
    protected: tuple[tuple[str, str], ...] | None = None

    def variables(self, agent_name: str) -> dict[str, str]:
        return {"CLIENT_ID": self.client_id, "AGENT_NAME": agent_name, "AGENT_ORCH_HOME": self.home}

    @functools.cached_property
    def protected_paths(self) -> tuple[tuple[str, str], ...]:
        """``protected``, or worked out once from the settings at ``home``."""
        if self.protected is not None:
            return self.protected
        try:
            settings = Settings.load(home=self.home, client_id=self.client_id)
        except UsageError:
            # A broken settings file stops the daemon anyway; the home's own layout still holds here.
            settings = Settings.model_construct(home=Path(self.home).expanduser().absolute())
        return protected_folders(settings)

    def tool(self, name: str) -> ToolInfo | None:
        return BUILTIN_TOOLS.get(name) or self.custom_tools.get(name)


def check_document(doc: Document, ctx: Context, rel_path: str) -> tuple[AgentSpec | None, list[Problem]]:
    """All problems of one document; the spec when there is no error among them."""
    problems: list[Problem] = []
    spec: AgentSpec | None = None
    try:
        spec = AgentSpec.model_validate(doc.data)
    except ValidationError as exc:
        problems.extend(from_pydantic(doc, exc))
    problems.extend(_Semantics(doc, ctx, rel_path).run())
    problems.sort(key=lambda p: (p.line, p.col))
    if any(p.severity == "error" for p in problems):
        spec = None
    return spec, problems


def expand(value: str, variables: dict[str, str]) -> str:
    """Expand ${VAR} from ``variables``; raises KeyError naming the first unknown variable."""
    return VARIABLE.sub(lambda m: variables[m.group(1)], value)


HOME = "the home (AGENT_ORCH_HOME)"
# The one folder of the home that is the client's agents' own: $AGENT_ORCH_HOME/data/CLIENT (the
# README's inbox lives there). A path in it is not "in the home"; the home's other entries (settings,
# state, ledger, mirrors, logs, memory, scratch) and other clients' data stay out of reach, and a
# path holding the home is refused as before.
AGENT_DATA = "the client's data folder"


def protected_folders(settings: Settings) -> tuple[tuple[str, str], ...]:
    """What no spec path may be in or hold, as (what, path): the runner's own files for every client
    of the home (``private_folders``), the runner's installation (a write there would run in every
    later run), and the system's folders (a root daemon's run is still uid 0 on files it owns)."""
    import runner

    install = (("the runner's installation", os.path.dirname(os.path.realpath(runner.__file__))),
               ("the runner's Python (sys.prefix)", sys.prefix), ("the runner's Python", sys.base_prefix))
    return private_folders(settings) + install + tuple(("a system folder", p) for p in SYSTEM_FOLDERS)


SYSTEM_FOLDERS = ("/etc", "/boot", "/root", "/proc", "/sys", "/dev", "/run", "/var/run", "/var/lib", "/var/spool",
                  "/var/log", "/var/cache", "/var/backups", "/var/mail", "/usr", "/bin", "/sbin", "/lib", "/lib32",
                  "/lib64")


def private_folders(settings: Settings) -> tuple[tuple[str, str], ...]:
    """The runner's own folders and files: the home (but for this client's data folder), the source
    mirrors, the state database, and every client's source repository, log and memory folders (one
    client's spec must not write another's spec repository, or its own). The home holds most of them
    by default; they are named too because they can live elsewhere."""
    folders = [(AGENT_DATA, str(settings.home / "data" / settings.client_id)), (HOME, str(settings.home)),
               ("the source mirrors", str(settings.home / "sources")), ("the state database", str(settings.state_path))]
    clients = [settings]
    for cid in client_ids(settings.home):
        if cid != settings.client_id:
            try:
                clients.append(Settings.load(home=settings.home, client_id=cid))
            except UsageError:
                continue
    for c in clients:
        who = "" if c.client_id == settings.client_id else f" of client {c.client_id}"
        folders += [(f"the log folder{who} (AGENT_ORCH_LOG_DIR)", str(c.logs_dir)),
                    (f"the memory folder{who} (VECTOR_DB_URL)", str(c.memory_dir))]
        folders += [(f"the spec repository{who} (AGENT_ORCH_SOURCE)", f) for f in _source_folders(c)]
    return tuple(folders)


def _source_folders(settings: Settings) -> list[str]:
    """A spec repository on this machine, as what a run must not touch: a bare repository whole; a
    checkout's .git (refs, objects, hooks) and its spec folder. Nothing for a remote repository (its
    mirror is in the home). An empty source is the git checkout around the working directory."""
    source = settings.source
    if source.startswith("file://"):
        source = source[len("file://"):]
    elif "://" in source or (":" in source and not source.startswith("/")):  # ssh, https, git@host:path
        return []
    top = os.path.abspath(os.path.expanduser(source)) if source else _checkout_of(os.getcwd())
    if not top:
        return []
    if not os.path.exists(os.path.join(top, ".git")):
        return [top]  # a bare repository
    return [os.path.join(top, ".git"), os.path.normpath(os.path.join(top, settings.source_path))]


def _checkout_of(here: str) -> str | None:
    while not os.path.exists(os.path.join(here, ".git")):
        parent = os.path.dirname(here)
        if parent == here:
            return None
        here = parent
    return here


def forbidden_overlap(path: str, settings: Settings) -> str | None:
    """Why ``path`` (absolute, variables expanded) must not be given to a run, or None.

    A run sees nothing of the runner's own files (settings, state, ledger, mirrors, sources, logs,
    memory), so a spec path may neither lie in one of the ``protected_folders`` nor contain one (``/``,
    or ``/srv`` when the home is /srv/agents/var). Validation says this of every tool path; the run is
    given the list again at run time (``RunPlan.protected``), since the settings, or a symbolic link on
    the way, may have changed since the spec was applied.
    """
    return overlap_reason(path, protected_folders(settings))


def overlap_reason(path: str, protected: Iterable[tuple[str, str]]) -> str | None:
    """``forbidden_overlap`` against any list of (what, folder)."""
    mine = _forms(path)
    folders = [(what, folder, _forms(folder)) for what, folder in protected if what != AGENT_DATA]
    exempt = [form for what, folder in protected if what == AGENT_DATA for form in _forms(folder)]
    # In one of them: name the narrowest (the memory folder, not the home that holds it).
    for what, folder, theirs in reversed(folders):
        for form in mine:
            if what == HOME and any(_within(form, data) for data in exempt):
                continue
            if form in theirs:
                return f"{_shown(path, form)} is {what}: {WHY}; name a folder outside it"
            if any(_within(form, their) for their in theirs):
                return f"{_shown(path, form)} is in {folder}, {what}: {WHY}; name a folder outside it"
    # Holding one of them: name the widest (the home, rather than the state database in it).
    for what, folder, theirs in folders:
        for form in mine:
            if any(_within(their, form) for their in theirs):
                return f"{_shown(path, form)} contains {folder}, {what}: {WHY}; name a narrower folder outside it"
    return None


def _forms(path: str) -> list[str]:
    """The path as written (normalised) and as the kernel would resolve it: a symbolic link on the way
    may lead into the home from outside, or the home itself may be reached through one."""
    written = os.path.normpath(os.path.abspath(path))
    real = os.path.realpath(written)
    return [written] if real == written else [written, real]


def _within(path: str, folder: str) -> bool:
    return path == folder or path.startswith(folder.rstrip("/") + "/")


def _shown(path: str, form: str) -> str:
    written = os.path.normpath(os.path.abspath(path))
    return f"'{path}'" if form == written else f"'{path}' (really {form})"


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    return f"; did you mean '{close[0]}'?" if close else ""


# -- shape errors -------------------------------------------------------------------------------


def from_pydantic(doc: Document, exc: ValidationError, root: type[BaseModel] = AgentSpec) -> list[Problem]:
    """Pydantic's errors for a document validated as ``root``, as problems at their positions."""
    out = []
    for err in exc.errors(include_url=False):
        loc = _data_loc(doc.data, tuple(err["loc"]))
        kind, ctx, value = err["type"], err.get("ctx") or {}, err.get("input")
        at_key = False
        if kind == "extra_forbidden":
            known = _fields_at(loc[:-1], doc.data, root)
            message = f"unknown field '{loc[-1]}'{did_you_mean(str(loc[-1]), known)}"
            if known:
                message += f" (known: {', '.join(sorted(known))})" if not did_you_mean(str(loc[-1]), known) else ""
            at_key = True
        elif kind == "missing":
            message = f"required field '{loc[-1]}' is missing"
        elif kind == "literal_error":
            choices = re.findall(r"'([^']*)'", str(ctx.get("expected", "")))
            message = f"{value!r} is not one of {', '.join(choices)}{did_you_mean(str(value), choices)}"
        elif kind in ("union_tag_invalid", "union_tag_not_found"):
            choices = re.findall(r"'([^']*)'", str(ctx.get("expected_tags", "")))
            if kind == "union_tag_not_found":  # pydantic names no tags here: take them from the models
                message = f"required field 'type' is missing (one of {', '.join(_tags_at(loc, root))})"
                loc = (*loc, "type")
            else:
                message = f"{ctx.get('tag')!r} is not one of {', '.join(choices)}"
                message += did_you_mean(str(ctx.get("tag")), choices)
                loc = (*loc, "type")
        elif kind == "string_pattern_mismatch":
            hint = FIELD_HINTS.get(str(loc[-1]), f"it must match {ctx.get('pattern')}")
            message = f"{value!r} is not valid: {hint}"
        elif kind in ("model_type", "model_attributes_type", "dict_type"):  # not "instance of ToolSpec"
            message = f"input should be a mapping of fields, not {_describe(value)}"
        elif kind.endswith("_type") or kind.endswith("_parsing"):
            message = f"{_lower(err['msg'])}, not {_describe(value)}"
        elif kind == "value_error":  # our validators' own sentences
            message = str(ctx.get("error") or err["msg"])
        else:
            message = _lower(err["msg"])
        line, col = doc.position(loc, key=at_key)
        out.append(Problem(doc.file, line, col, field_path(loc), message))
    return out


def _data_loc(data: Any, loc: Loc) -> Loc:
    """Drop the discriminator tags pydantic puts in locations (triggers.0.schedule.cron)."""
    out: list[str | int] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and isinstance(part, str) and part not in node and node.get("type") == part:
            continue
        out.append(part)
        node = node.get(part) if isinstance(node, dict) else (
            node[part] if isinstance(node, list) and isinstance(part, int) and part < len(node) else None)
    return tuple(out)


def _fields_at(loc: Loc, data: Any, root: type[BaseModel]) -> set[str]:
    """Field names of the model found at ``loc`` (for did-you-mean on unknown fields)."""
    tp: Any = root
    node = data
    for part in loc:
        node = node.get(part) if isinstance(node, dict) else (
            node[part] if isinstance(node, list) and isinstance(part, int) and part < len(node) else None)
        tp = _unwrap(tp.model_fields[part].annotation if isinstance(part, str) and _is_model(tp)
                     and part in tp.model_fields else tp, node)
    tp = _unwrap(tp, node)
    return {f.alias or n for n, f in tp.model_fields.items()} if _is_model(tp) else set()


def _tags_at(loc: Loc, root: type[BaseModel]) -> list[str]:
    """The 'type' values the tagged union at ``loc`` accepts (triggers[0] -> schedule, file_change)."""
    tp: Any = root
    for part in (*loc, None):
        while typing.get_origin(tp) in (typing.Annotated, list):
            tp = typing.get_args(tp)[0]
        if isinstance(part, str):
            tp = tp.model_fields[part].annotation if _is_model(tp) and part in tp.model_fields else None
    return [tag for member in typing.get_args(tp) if _is_model(member) and "type" in member.model_fields
            for tag in typing.get_args(member.model_fields["type"].annotation)]


def _unwrap(tp: Any, node: Any) -> Any:
    for _ in range(6):
        origin = typing.get_origin(tp)
        if origin is typing.Annotated:
            tp = typing.get_args(tp)[0]
        elif origin is list:
            tp = typing.get_args(tp)[0]
            if not isinstance(node, dict):
                return tp
        elif origin in (typing.Union, types.UnionType):
            members = [a for a in typing.get_args(tp) if a is not type(None)]
            tag = node.get("type") if isinstance(node, dict) else None
            tagged = [m for m in members if _is_model(m) and "type" in m.model_fields
                      and tag in typing.get_args(m.model_fields["type"].annotation)]
            tp = tagged[0] if tagged else members[0]
        else:
            return tp
    return tp


def _is_model(tp: Any) -> bool:
    return isinstance(tp, type) and issubclass(tp, BaseModel)


def _lower(msg: str) -> str:
    return msg[:1].lower() + msg[1:]


def _describe(value: Any) -> str:
    if isinstance(value, dict):
        return "a mapping"
    if isinstance(value, list):
        return "a list"
    if value is None:
        return "empty"
    return f"{type(value).__name__} {value!r}"


# -- semantic checks ----------------------------------------------------------------------------


class _Semantics:
    def __init__(self, doc: Document, ctx: Context, rel_path: str) -> None:
        self.doc, self.ctx, self.rel_path = doc, ctx, rel_path
        self.problems: list[Problem] = []
        data = doc.data if isinstance(doc.data, dict) else {}
        self.data = data
        name = data.get("name")
        self.variables = ctx.variables(name if isinstance(name, str) else "")

    def run(self) -> list[Problem]:
        self._model()
        self._tools()
        self._triggers()
        self._domains()
        if not self.data.get("instructions") and not self.data.get("description"):
            self._add((), "no 'instructions' or 'description': the model gets no task", "warning")
        return self.problems

    def _add(self, loc: Loc, message: str, severity: Severity = "error", key: bool = False) -> None:
        line, col = self.doc.position(loc, key=key)
        self.problems.append(Problem(self.doc.file, line, col, field_path(loc), message, severity))

    def _model(self) -> None:
        model = self.data.get("model")
        if isinstance(model, str) and model.endswith(":") and model.count(":") == 1:
            self._add(("model",), f"'{model}' names no model: write {model}NAME")
        elif isinstance(model, str) and model.startswith("scripted:"):
            target = os.path.normpath(os.path.join(os.path.dirname(self.rel_path), model[len("scripted:"):]))
            if target.startswith("..") or os.path.isabs(target):
                self._add(("model",), "a scripted model file must be inside the spec source folder")
            elif not self.ctx.file_exists(target):
                self._add(("model",), f"scripted model file '{target}' not found in the spec source")

    def _tools(self) -> None:
        tools = self.data.get("tools")
        if not isinstance(tools, list):
            return
        seen: dict[str, int] = {}
        for i, tool in enumerate(tools):
            if not isinstance(tool, dict) or not isinstance(tool.get("name"), str):
                continue
            name = tool["name"]
            if name in seen:
                self._add(("tools", i, "name"), f"tool '{name}' is listed twice (first as tools[{seen[name]}])")
                continue
            seen[name] = i
            if tool.get("agent") or tool.get("remote_agent"):
                self._asked(i, tool)
                continue
            info = self.ctx.tool(name)
            if info is None:
                known = [*BUILTIN_TOOLS, *self.ctx.custom_tools]
                self._add(("tools", i, "name"), f"unknown tool '{name}'{did_you_mean(name, known)} "
                          "(builtins: " + ", ".join(BUILTIN_TOOLS) + "; custom tools live in tools/NAME.py)")
                continue
            if info.error:
                self._add(("tools", i, "name"), f"custom tool '{name}' cannot be loaded: {info.error}")
                continue
            self._tool(i, tool, info)

    def _asked(self, i: int, tool: dict[str, Any]) -> None:
        """A tool that asks an agent or a remote A2A agent: its name is free (nothing is looked up), but not a
        builtin's; a remote agent's host must be one the spec's allowed_domains allow (by name, as the egress
        rules read them; ENABLE_REMOTE_TOOLS is the daemon's, checked at each call as for http_get). Whether the
        agent named exists is a question of the whole tree (validating.py)."""
        if tool["name"] in BUILTIN_TOOLS:
            self._add(("tools", i, "name"), f"'{tool['name']}' is a builtin tool: a tool that asks an agent needs a "
                      "name of its own (ask_reviewer, say)")
        secret = tool.get("secret_env")
        if isinstance(secret, str) and own_variable(secret):
            self._add(("tools", i, "secret_env"), f"{secret} is one of the runner's own variables (OPENAI_API_KEY, "
                      "AGENT_ORCH_*, LANGCHAIN_*, RAY_*, a setting's): it is never sent to a remote agent; name a "
                      "variable of the remote side's credential, listed by the operator in AGENT_ORCH_REMOTE_SECRETS")
        url = tool.get("remote_agent")
        if not isinstance(url, str) or not url.startswith(("http://", "https://")):
            return
        constraints = self.data.get("constraints")
        allowed = constraints.get("allowed_domains") if isinstance(constraints, dict) else None
        allowed = [d.lower() for d in allowed if isinstance(d, str)] if isinstance(allowed, list) else []
        try:
            parts = urllib.parse.urlsplit(url)
            host = parts.hostname or ""
        except ValueError:
            parts, host = None, ""
        if parts is None or not host:
            self._add(("tools", i, "remote_agent"), f"'{url[:200]}' names no host")
            return
        if "@" in parts.netloc or parts.query or parts.fragment:
            self._add(("tools", i, "remote_agent"), "a remote agent's URL carries no user, password, query or "
                      "fragment (a credential there would go wherever the URL goes): name the credential's "
                      "variable in secret_env")
            return
        if not host.isascii():
            self._add(("tools", i, "remote_agent"), f"'{host[:200]}' is not an ASCII host name: write it as the "
                      "name is looked up (xn--...), as allowed_domains must")
            return
        why = domains.refusal(host, allowed, None)
        if why:
            self._add(("tools", i, "remote_agent"), f"the remote agent's host is not allowed: {why} (list it in "
                      "constraints.allowed_domains, 'local' for this machine)")

    def _tool(self, i: int, tool: dict[str, Any], info: ToolInfo) -> None:
        perms = tool.get("permissions")
        if isinstance(perms, list):
            for j, perm in enumerate(perms):
                if perm in PERMISSIONS and perm not in info.allowed:
                    may = ", ".join(sorted(info.allowed)) or "none"
                    self._add(("tools", i, "permissions", j),
                              f"{info.name} cannot be granted '{perm}' (it may have: {may})")
            for need in sorted(info.needs - {p for p in perms if isinstance(p, str)}):
                self._add(("tools", i, "permissions"), f"{info.name} needs '{need}' to work")
        paths = tool.get("paths")
        if info.file_tool and not paths:
            self._add(("tools", i), f"{info.name} touches files: name the folders it may use in 'paths'")
        elif info.name == "data_analyzer" and not paths:
            self._add(("tools", i), "data_analyzer has no 'paths': its queries can read no files", "warning")
        elif paths and info.builtin and not info.file_tool and info.name not in ("data_analyzer", "shell"):
            self._add(("tools", i, "paths"), f"{info.name} does not use 'paths'; they are ignored", "warning")
        if isinstance(paths, list):
            for j, path in enumerate(paths):
                if isinstance(path, str):
                    self._path(("tools", i, "paths", j), path, given_to_run=True)
        commands = tool.get("commands")
        if info.name == "shell" and not commands:
            self._add(("tools", i), "shell runs only listed programs: name them in 'commands'")
        elif commands and info.name != "shell":
            self._add(("tools", i, "commands"), "only the shell tool takes 'commands'")

    def _path(self, loc: Loc, value: str, given_to_run: bool = False) -> None:
        """A path a spec names (``given_to_run``: a tool's, which the run itself gets access to; else a
        trigger's watched folder). Neither may overlap the runner's or the system's folders."""
        try:
            expanded = expand(value, self.variables)
        except KeyError as exc:
            known = ", ".join(f"${{{v}}}" for v in self.variables)
            self._add(loc, f"unknown variable ${{{exc.args[0]}}} (known: {known})")
            return
        if not os.path.isabs(expanded):
            self._add(loc, f"'{expanded}' is not an absolute path")
        else:  # a watched folder too: the names of its files become a run's input
            reason = overlap_reason(expanded, self.ctx.protected_paths)
            if reason:
                self._add(loc, reason)

    def _triggers(self) -> None:
        triggers = self.data.get("triggers")
        if not isinstance(triggers, list):
            return
        for i, trig in enumerate(triggers):
            if not isinstance(trig, dict):
                continue
            if trig.get("type") == "schedule" and isinstance(trig.get("cron"), str):
                problem = cron_problem(trig["cron"])
                if problem:
                    self._add(("triggers", i, "cron"), problem)
            tz = trig.get("timezone")
            if isinstance(tz, str) and tz not in _timezones():
                self._add(("triggers", i, "timezone"),
                          f"unknown time zone '{tz}'{did_you_mean(tz, _timezones())} (use an IANA name "
                          "such as Europe/Berlin)")
            if trig.get("type") == "file_change" and isinstance(trig.get("path"), str):
                self._path(("triggers", i, "path"), trig["path"])
            if trig.get("type") == "webhook":
                self._webhook(i, trig)

    def _webhook(self, i: int, trig: dict[str, Any]) -> None:
        if isinstance(trig.get("secret_file"), str):
            try:
                path = expand(trig["secret_file"], self.variables)
            except KeyError as exc:
                self._add(("triggers", i, "secret_file"), f"unknown variable ${{{exc.args[0]}}}")
            else:
                if not os.path.isabs(path):
                    self._add(("triggers", i, "secret_file"), f"'{path}' is not an absolute path")
        inputs = trig.get("inputs")
        if inputs and self.data.get("kind", "agent") != "workflow":
            self._add(("triggers", i, "inputs"), "inputs map a webhook into a workflow's inputs; an agent's run "
                      "input is the payload itself")
        texts: list[tuple[Loc, Any]] = [(("triggers", i, "dedupe"), trig.get("dedupe"))]
        texts += [(("triggers", i, "inputs", k), v) for k, v in (inputs.items() if isinstance(inputs, dict) else [])]
        for loc, text in texts:
            if isinstance(text, str):
                for problem in names_read(text, template=True, known=("headers", "payload", "event"))[1]:
                    self._add(loc, problem)

    def _domains(self) -> None:
        constraints = self.data.get("constraints")
        domains = constraints.get("allowed_domains") if isinstance(constraints, dict) else None
        if not isinstance(domains, list):
            domains = []
        for i, dom in enumerate(domains):
            if isinstance(dom, str) and dom != "local" and not HOSTNAME.match(dom.lower()):
                self._add(("constraints", "allowed_domains", i),
                          f"'{dom}' is not a host name ('example.com', '*.example.com' or 'local')")
        tools = self.data.get("tools")
        uses_http = isinstance(tools, list) and any(isinstance(t, dict) and t.get("name") == "http_get" for t in tools)
        if uses_http and not domains:
            self._add(("constraints",), "http_get can reach nothing: constraints.allowed_domains is empty",
                      "warning")


def names_read(text: str, *, template: bool, known: Iterable[str]) -> tuple[Names | None, list[str]]:
    """What an expression or template reads (None when it cannot be read), and its problems: it does not parse,
    or it names what is not ``known`` there."""
    known = list(known)
    try:
        names = check(text, template=template)
    except ExpressionError as exc:
        return None, [f"{'template' if template else 'expression'} cannot be read: {exc}"]
    return names, [f"unknown name '{name}'{did_you_mean(name, known)} (known: {', '.join(known)})"
                   for name in sorted(names.used - set(known))]


def trigger_problems(doc: Document, ctx: Context, rel_path: str) -> list[Problem]:
    """The problems of a document's triggers (cron, time zone, watched folder), for any kind of spec."""
    semantics = _Semantics(doc, ctx, rel_path)
    semantics._triggers()
    return semantics.problems


def cron_problem(expr: str) -> str | None:
    """Why ``expr`` is not a cron expression we accept, or None."""
    text = expr.strip()
    if text in CRON_ALIASES:
        return None
    fields = text.split()
    if len(fields) not in (5, 6):
        return (f"cron expression '{expr}' has {len(fields)} fields; write five (minute hour day month weekday) "
                "or six with seconds first")
    if not croniter.is_valid(text, second_at_beginning=len(fields) == 6):
        return f"'{expr}' is not a valid cron expression"
    return None


@functools.cache
def _timezones() -> frozenset[str]:
    return frozenset(zoneinfo.available_timezones())
