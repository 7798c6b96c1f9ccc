"""The tools of one run: what the model is shown, and the one door every call goes through.

``Toolbox.call`` looks the tool up, runs it, and records the call with its decision: ``allowed``
(with its duration, the start of its result, redacted, and the result's full size) or ``denied`` (with
the reason: nothing was read). A denied call
or a failing tool is answered to the model as a tool error so it can recover.

A tool that asks an agent (``agent:``) or a remote A2A agent (``remote_agent:``) takes one question and
asks the control plane over the run's channel (``agent.ask``, ``remote.ask``); the run waits for the
answer, which its supervisor bounds in time (docs/events.md). Its event names what answered: the
callee's run id, or the remote host and task. A callee's tokens are added to this run's budget count.
"""

from __future__ import annotations

import importlib.util
import re
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from langchain_core.tools import BaseTool, StructuredTool
from pydantic import BaseModel, Field

from runner.agent.builtin_tools import BUILTINS, ToolEnv
from runner.agent.recording import LogWriter, Recorder
from runner.errors import DeniedError, OrchestratorError, SpecError
from runner.sandbox.access import PathRule
from runner.specs.catalog import BUILTIN_TOOLS
from runner.specs.checking import expand
from runner.specs.models import AgentSpec, ToolSpec

MAX_RESULT = 32 * 1024  # characters of a tool result handed back to the model
TRANSCRIPT_RESULT = 4096  # characters of a tool result kept in its event (redacted; its full size beside it)
PATH_ARG = re.compile(r"(^|_)(path|file|folder|dir|directory)s?$")


class _Path(BaseModel):
    path: str = Field(description="Absolute path of a file or folder.")


class _Write(BaseModel):
    path: str = Field(description="Absolute path of the file to write.")
    content: str = Field(description="The text to write.")


class _Query(BaseModel):
    query: str = Field(description="One DuckDB SELECT; name files by absolute path, e.g. read_csv('/data/x.csv').")


class _Url(BaseModel):
    url: str = Field(description="http or https URL.")


class _Command(BaseModel):
    command: str = Field(description="A program and its arguments (no pipes or redirection).")


class _Search(BaseModel):
    query: str = Field(description="What to look for.")
    k: int = Field(5, description="How many memories to return.")


class _Save(BaseModel):
    text: str = Field(description="What to remember.")


class _Question(BaseModel):
    question: str = Field(description="What to ask, in full: the agent asked sees nothing else of this "
                          "conversation.")


ARGS: dict[str, type[BaseModel]] = {
    "file_reader": _Path, "file_writer": _Write, "data_analyzer": _Query, "http_get": _Url,
    "shell": _Command, "memory_search": _Search, "memory_save": _Save,
}


Ask = Callable[[dict[str, Any]], dict[str, Any]]  # a question to the control plane, and its answer


@dataclass
class _Entry:
    spec: ToolSpec
    env: ToolEnv
    lc_tool: BaseTool  # what the model sees (and, for custom tools, what runs)
    builtin: bool
    asks: bool = False  # an agent or a remote agent, asked through the control plane


@dataclass
class Asked:
    """What an agent asked as a tool said: the text for the model, and what the call's event keeps."""

    text: str
    detail: dict[str, Any] = field(default_factory=dict)
    failed: bool = False


class Toolbox:
    def __init__(self, spec: AgentSpec, *, variables: dict[str, str], base_env: ToolEnv,
                 custom_sources: dict[str, str], custom_dir: Path, recorder: Recorder, log: LogWriter,
                 ask: Ask | None = None) -> None:
        self.recorder, self.log, self.ask = recorder, log, ask
        self.entries: dict[str, _Entry] = {}
        for tool_spec in spec.tools:
            lc_tool: BaseTool
            if tool_spec.agent or tool_spec.remote_agent:
                what = f"agent '{tool_spec.agent}'" if tool_spec.agent else f"the A2A agent at {tool_spec.remote_agent}"
                lc_tool = StructuredTool.from_function(
                    func=_unused, name=tool_spec.name, args_schema=_Question,
                    description=tool_spec.description or f"Asks {what} a question and returns its answer.")
                self.entries[tool_spec.name] = _Entry(tool_spec, base_env, lc_tool, False, asks=True)
                continue
            paths = [expand(p, variables) for p in tool_spec.paths]
            env = ToolEnv(paths=PathRule.of(paths), commands=list(tool_spec.commands),
                          timeout=tool_spec.timeout or base_env.timeout, allowed_domains=base_env.allowed_domains,
                          remote_enabled=base_env.remote_enabled, memory=base_env.memory, run_id=base_env.run_id,
                          scratch=base_env.scratch)
            if tool_spec.name in BUILTIN_TOOLS:
                info = BUILTIN_TOOLS[tool_spec.name]
                lc_tool = StructuredTool.from_function(
                    func=_unused, name=tool_spec.name, args_schema=ARGS[tool_spec.name],
                    description=tool_spec.description or info.summary)
                self.entries[tool_spec.name] = _Entry(tool_spec, env, lc_tool, True)
            else:
                source = custom_sources.get(tool_spec.name)
                if source is None:
                    raise SpecError(f"custom tool '{tool_spec.name}' is not in the source's tools/ folder")
                lc_tool = load_custom_tool(tool_spec.name, source, custom_dir)
                if tool_spec.description:
                    lc_tool.description = tool_spec.description
                self.entries[tool_spec.name] = _Entry(tool_spec, env, lc_tool, False)

    @property
    def tools(self) -> list[BaseTool]:
        return [e.lc_tool for e in self.entries.values()]

    def call(self, name: str, args: dict[str, Any]) -> str:
        started = time.monotonic()
        entry = self.entries.get(name)
        self.recorder.tool_called()
        try:
            if entry is None:
                raise DeniedError(f"no tool named '{name}' is allowed for this agent "
                                  f"(allowed: {', '.join(self.entries) or 'none'})")
            if not isinstance(args, dict):
                raise DeniedError("tool arguments must be an object")
            result = self._run(entry, args)
        except DeniedError as exc:
            self.recorder.event("tool_call", name, "denied", {"args": args, "reason": exc.message,
                                                               "duration_ms": _ms(started)})
            self.log.write(f"tool {name} DENIED: {exc.message}", "WARNING")
            return f"error: denied: {exc.message}"
        except Exception as exc:  # a tool's own failure is the model's problem to handle, not the run's
            message = f"{type(exc).__name__}: {exc}"[:500]
            self.recorder.event("tool_call", name, "allowed", {"args": args, "error": message,
                                                                "duration_ms": _ms(started)})
            self.log.write(f"tool {name} failed: {message}", "WARNING")
            return f"error: {message}"
        extra: dict[str, Any] = {}
        if isinstance(result, Asked):
            extra = result.detail
            if result.failed:
                self.recorder.event("tool_call", name, "allowed", {"args": args, "error": result.text[:500],
                                                                    "duration_ms": _ms(started), **extra})
                self.log.write(f"tool {name} failed: {result.text[:500]}", "WARNING")
                return f"error: {result.text}"
            result = result.text
        text = result if isinstance(result, str) else str(result)
        self.recorder.event("tool_call", name, "allowed", {"args": args, "duration_ms": _ms(started),
                                                            "result": text[:TRANSCRIPT_RESULT],
                                                            "result_bytes": len(text.encode()), **extra})
        self.log.write(f"tool {name} ok ({len(text)} chars)")
        return text[:MAX_RESULT] + ("\n... (truncated)" if len(text) > MAX_RESULT else "")

    def _run(self, entry: _Entry, args: dict[str, Any]) -> Any:
        if entry.asks:
            try:
                question = _Question.model_validate(args).question
            except Exception as exc:
                raise DeniedError(f"bad arguments for {entry.spec.name}: {exc}".splitlines()[0]) from None
            return self._ask(entry.spec, question)
        if entry.builtin:
            schema = ARGS[entry.spec.name]
            try:
                parsed = schema.model_validate(args)
            except Exception as exc:
                raise DeniedError(f"bad arguments for {entry.spec.name}: {exc}".splitlines()[0]) from None
            return BUILTINS[entry.spec.name](entry.env, **parsed.model_dump())
        for key, value in args.items():
            if isinstance(value, str) and PATH_ARG.search(key):
                entry.env.paths.check(value, what=key)
        return entry.lc_tool.invoke(args)


    def _ask(self, spec: ToolSpec, question: str) -> Asked:
        """Ask the agent (or remote agent) of tool ``spec`` through the control plane. A refusal (a host not
        allowed, the depth or the budget used up) raises DeniedError; a failure to ask, OrchestratorError."""
        if self.ask is None:
            raise OrchestratorError("this run has no control plane to ask (agents are asked through the daemon)")
        if spec.agent:
            answer = self.ask({"op": "agent.ask", "tool": spec.name, "text": question, "k": 1})
            tokens = answer.get("tokens")
            self.recorder.borrow(tokens if type(tokens) is int else 0)
            detail = {"agent": spec.agent, "callee_run_id": answer.get("run_id"), "callee_status": answer.get("status"),
                      "callee_tokens": tokens}
            if answer.get("status") != "succeeded":
                return Asked(f"agent '{spec.agent}' (run {answer.get('run_id')}) ended {answer.get('status')}: "
                             f"{answer.get('reason') or 'no reason given'}", detail, failed=True)
            return Asked(str(answer.get("output") or ""), detail)
        answer = self.ask({"op": "remote.ask", "tool": spec.name, "text": question, "k": 1})
        return Asked(str(answer.get("output") or ""), {"remote_agent": spec.remote_agent, "host": answer.get("host"),
                                                        "task_id": answer.get("task_id"), "state": answer.get("state")})


def _unused(**_kwargs: Any) -> str:
    raise RuntimeError("builtin tools run through Toolbox.call")


def _ms(started: float) -> int:
    return int((time.monotonic() - started) * 1000)


def load_custom_tool(name: str, source: str, folder: Path) -> BaseTool:
    """Import tools/NAME.py (as of the applied revision) and return its LangChain tool NAME."""
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.py"
    path.write_text(source)
    module_name = f"agent_custom_tools.{name}"
    spec = importlib.util.spec_from_file_location(module_name, path)
    if spec is None or spec.loader is None:
        raise SpecError(f"custom tool '{name}' cannot be loaded from {path}")
    module = importlib.util.module_from_spec(spec)
    try:
        sys.modules[module_name] = module
        spec.loader.exec_module(module)
    except Exception as exc:
        raise SpecError(f"custom tool '{name}' failed to import: {type(exc).__name__}: {exc}") from None
    tool = getattr(module, name, None)
    if not isinstance(tool, BaseTool):
        raise SpecError(f"custom tool module tools/{name}.py has no LangChain tool named '{name}' (use @tool)")
    return tool
