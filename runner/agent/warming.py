"""Pay LangChain's first-use costs once, in the process that forks runs.

Importing LangChain is only part of its cost: building a tool's schema, a chat model class's
validators and the message classes the first time costs about as much again. A forked run inherits
whatever its parent has already built, so the launcher warms up once (a scripted model answering
one tool call, every builtin tool's schema) and each run then starts warm.
"""

from __future__ import annotations

import json

from langchain_core.messages import AIMessage, HumanMessage, SystemMessage, ToolMessage
from langchain_core.tools import StructuredTool
from langchain_core.utils.function_calling import convert_to_openai_tool

from runner.agent.providers import ScriptedChatModel
from runner.agent.toolbox import ARGS
from runner.plan import RunPlan
from runner.settings import Settings
from runner.specs.models import AgentSpec

_warm = False


def warm() -> None:
    global _warm
    if _warm:
        return
    tools = [StructuredTool.from_function(func=_noop, name=name, args_schema=schema, description=name)
             for name, schema in ARGS.items()]
    model = ScriptedChatModel(turns=[{"tool_calls": [{"name": "file_reader", "args": {"path": "/"}}]},
                                     {"content": "done"}])
    bound = model.bind_tools(tools)
    messages = [SystemMessage("warm"), HumanMessage("warm")]
    first = bound.invoke(messages)
    assert isinstance(first, AIMessage)
    messages += [first, ToolMessage(content="ok", tool_call_id=first.tool_calls[0]["id"] or "x")]
    bound.invoke(messages)
    for tool in tools:  # what bind_tools does for real providers
        convert_to_openai_tool(tool)
    _warm_plan()
    _warm = True


def _warm_plan() -> None:
    """Parse one plan as a run parses its own: the validators' first-use costs (about 1 MB of pages each
    run would otherwise write) are paid here, once. Defaults only: the zygote reads no settings."""
    spec = AgentSpec.model_validate({"name": "warm", "description": "warm", "model": "scripted:warm.yaml"})
    plan = RunPlan("0", "default", "warm", None, spec, Settings.model_validate({}))
    RunPlan.from_json(json.loads(json.dumps(plan.to_json())))


def _noop(**_kwargs: object) -> str:
    return ""
