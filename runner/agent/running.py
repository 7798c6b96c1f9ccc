"""The run loop, inside the run process: ask the model, run the tools it calls, until it answers.

Budgets are checked between steps, against the providers' own usage reports:
- every model call may produce at most the output tokens left in ``max_tokens``;
- the run ends ``budget_exceeded`` once input plus output tokens pass ``max_tokens`` (or reach it
  with work still pending), or when the model hit the per-call cap that the budget imposed; the tokens
  of the agents it asked as tools count as its own here (``Recorder.borrowed``);
- ``max_model_calls`` ends a tool loop the same way.
The deadline (``max_runtime``) is not kept here: the launcher kills the process group at it, which
also stops a call that hangs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import AIMessage, BaseMessage, HumanMessage, SystemMessage, ToolMessage

from runner.agent.builtin_tools import ToolEnv
from runner.agent.memory import ChannelMemory, Remembers, open_memory
from runner.agent.providers import ModelRef, chat_model, limit_kwargs, preflight
from runner.agent.recording import LogWriter, Recorder
from runner.agent.toolbox import Toolbox
from runner.errors import OrchestratorError
from runner.plan import RunPlan
from runner.sandbox.access import PathRule

DEFAULT_MAX_OUTPUT = 2048  # output tokens per model call when no budget says less
TRANSCRIPT_TEXT = 2000  # characters of what a model call produced, kept in its event (its full size beside it)
TRANSCRIPT_MEMORY = 300  # characters of each memory recalled or saved, kept in its event


@dataclass
class RunResult:
    status: str
    output: str | None = None
    error: str | None = None

    def to_json(self) -> str:
        full = len(self.output or "")
        return json.dumps({"status": self.status, "output": (self.output or "")[:16000] or None,
                           "error": (self.error or "")[:4000] or None,
                           **({"output_chars": full} if full > 16000 else {})})


def execute(plan: RunPlan, sink: Callable[[dict[str, Any]], None], sandbox: dict[str, Any] | None = None,
            ask: Callable[[dict[str, Any]], dict[str, Any]] | None = None) -> RunResult:
    """Run the agent once, recording through ``sink``; ``ask`` reaches the control plane (its memory),
    or without it the run opens its memory store itself. Never raises: every ending is a RunResult."""
    recorder = Recorder(sink, plan.run_id)
    log = recorder.log
    memory: Remembers | None = None
    try:
        plan.scratch.mkdir(parents=True, exist_ok=True)
        recorder.event("log", "sandbox", None, sandbox or {"mode": "none"})
        memory = open_memory(plan) if ask is None else _asked_memory(plan, ask)
        result = _loop(plan, recorder, log, memory, ask)
        if memory is not None and result.status == "succeeded":
            summary = f"Run {plan.run_id} ({plan.trigger}): input: {(plan.input or '-')[:300]} | " \
                      f"answer: {(result.output or '')[:600]}"
            memory.add(summary, kind="run_summary", run_id=plan.run_id)
            recorder.event("memory", "save", None, {"kind": "run_summary", "chars": len(summary),
                                                    "text": summary[:TRANSCRIPT_MEMORY]})
        return result
    except OrchestratorError as exc:
        log.write(f"failed: {exc.message}", "ERROR")
        return RunResult("failed", error=exc.message)
    except Exception as exc:  # a bug or a provider error: the run fails, with the reason on record
        message = f"{type(exc).__name__}: {exc}"
        log.write(f"failed: {message}", "ERROR")
        return RunResult("failed", error=message[:4000])
    finally:
        if memory is not None:
            memory.close()


def _asked_memory(plan: RunPlan, ask: Callable[[dict[str, Any]], dict[str, Any]]) -> Remembers | None:
    mem = plan.spec.memory
    return None if mem is None or mem.type == "none" else ChannelMemory(ask)


def _loop(plan: RunPlan, recorder: Recorder, log: LogWriter, memory: Remembers | None,
          ask: Callable[[dict[str, Any]], dict[str, Any]] | None) -> RunResult:
    spec, s = plan.spec, plan.settings
    ref = ModelRef.parse(spec.model)
    log.write(f"run started ({plan.trigger}) model={spec.model} revision={(plan.revision or '-')[:12]}")
    preflight(ref, ollama_host=s.ollama_host, openai_base=s.langchain_api_url)
    model = chat_model(ref, ollama_host=s.ollama_host, openai_base=s.langchain_api_url,
                       timeout=plan.deadline_seconds, script=plan.script,
                       variables={**plan.variables, "INPUT": plan.input or ""})  # a script may answer ${INPUT}
    base_env = ToolEnv(paths=PathRule.of([]), allowed_domains=list(spec.constraints.allowed_domains),
                       remote_enabled=s.enable_remote_tools, memory=memory, run_id=plan.run_id,
                       scratch=str(plan.scratch))
    toolbox = Toolbox(spec, variables=plan.variables, base_env=base_env, custom_sources=plan.custom_sources,
                      custom_dir=plan.scratch / "tools", recorder=recorder, log=log, ask=ask)
    bound = model.bind_tools(toolbox.tools) if toolbox.tools else model
    messages: list[BaseMessage] = [SystemMessage(_system_prompt(plan, recorder, memory)),
                                   HumanMessage(plan.input or "Begin the task.")]
    budget = spec.constraints.max_tokens
    cap = spec.constraints.max_model_calls
    last_input: tuple[int, int] | None = None  # (input tokens of the last call, messages it had)
    for call in range(cap + 1):
        if call == cap:
            return _stop(log, "budget_exceeded", f"reached max_model_calls ({cap}) without a final answer")
        used = recorder.used
        # The call's own prompt counts against the budget too: leave room for it (estimated).
        prompt = _prompt_estimate(messages, last_input) if ref.provider != "scripted" else 0
        remaining = None if budget is None else budget - used - prompt
        if remaining is not None and remaining <= 0:
            return _stop(log, "budget_exceeded", f"token budget of {budget} used up ({used} tokens"
                         + (f", {recorder.borrowed} of them used by agents it asked" if recorder.borrowed else "")
                         + ", no room left for another model call)")
        per_call = DEFAULT_MAX_OUTPUT if remaining is None else min(DEFAULT_MAX_OUTPUT, remaining)
        started = time.monotonic()
        ai = bound.invoke(messages, **limit_kwargs(ref, per_call))
        latency = int((time.monotonic() - started) * 1000)
        assert isinstance(ai, AIMessage)
        inp, out, estimated = _usage(ai, messages)
        last_input = (inp, len(messages))
        recorder.usage(inp, out)
        truncated = _finish(ai) == "length"
        said = ai.text if isinstance(ai.content, list) else str(ai.content)
        recorder.event("llm_call", ref.provider + ":" + ref.name, None, {
            "input_tokens": inp, "output_tokens": out, "estimated": estimated, "latency_ms": latency,
            "tool_calls": [c["name"] for c in ai.tool_calls], "finish_reason": _finish(ai),
            "text": said[:TRANSCRIPT_TEXT], "text_chars": len(said)})
        log.write(f"model call {call + 1}: {inp}+{out} tokens, {latency} ms, "
                  f"{len(ai.tool_calls)} tool call(s)")
        messages.append(ai)
        total = recorder.used  # with the tokens of the agents it asked as tools
        if budget is not None and (total > budget or (total >= budget and ai.tool_calls)
                                   or (truncated and per_call < DEFAULT_MAX_OUTPUT)):
            return _stop(log, "budget_exceeded", f"token budget of {budget} reached ({total} tokens"
                         + (f", {recorder.borrowed} of them used by agents it asked" if recorder.borrowed else "")
                         + ")")
        if not ai.tool_calls:
            answer = ai.text if isinstance(ai.content, list) else str(ai.content)
            recorder.event("log", "final_answer", None, {"chars": len(answer)})
            log.write(f"succeeded: {answer[:200]}")
            return RunResult("succeeded", output=answer)
        for tool_call in ai.tool_calls:
            content = toolbox.call(tool_call["name"], tool_call.get("args") or {})
            messages.append(ToolMessage(content=content, tool_call_id=tool_call.get("id") or "call"))
    raise AssertionError("unreachable")


def _system_prompt(plan: RunPlan, recorder: Recorder, memory: Remembers | None) -> str:
    spec = plan.spec
    text = (f"You are '{spec.name}', an agent run by agent-orchestrator.\n\nYour task:\n{spec.task}\n\n"
            "Use the tools you are given when they help. A tool answer starting with 'error:' means the action "
            "was refused or failed: do not repeat it, adapt. When you are done, reply with your final answer "
            "and call no tool.")
    if memory is not None and spec.memory and spec.memory.recall:
        found = memory.search(plan.input or spec.task, spec.memory.recall)
        recorder.event("memory", "recall", None, {"query_chars": len(plan.input or spec.task),
                                                  "found": len(found), "ids": [m.id for m in found],
                                                  "texts": [m.text[:TRANSCRIPT_MEMORY] for m in found]})
        if found:
            text += "\n\nWhat you remember from earlier runs:\n" + "\n".join(f"- {m.text}" for m in found)
    return text


def _usage(ai: AIMessage, messages: list[BaseMessage]) -> tuple[int, int, bool]:
    meta = ai.usage_metadata
    if meta and (meta.get("input_tokens") or meta.get("output_tokens")):
        return int(meta.get("input_tokens", 0)), int(meta.get("output_tokens", 0)), False
    # No usage report (some servers): estimate at four characters a token, and say so.
    prompt = sum(len(str(m.content)) for m in messages)
    return prompt // 4 + 1, len(str(ai.content)) // 4 + 1, True


def _prompt_estimate(messages: list[BaseMessage], last: tuple[int, int] | None) -> int:
    """Input tokens of the next call: the last call's real count plus the messages added since, at
    three characters a token (the first call is all estimate; chat templates add tokens of their own,
    so we err toward stopping early). The scripted model declares its usage: it gets no estimate."""
    known, seen = last if last else (0, 0)
    return known + sum(len(str(m.content)) for m in messages[seen:]) // 3


def _finish(ai: AIMessage) -> str | None:
    meta: dict[str, Any] = ai.response_metadata or {}
    value = meta.get("finish_reason") or meta.get("done_reason")
    return str(value) if value else None


def _stop(log: LogWriter, status: str, message: str) -> RunResult:
    log.write(f"{status}: {message}", "WARNING")
    return RunResult(status, error=message)
