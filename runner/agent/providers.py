"""Chat models by provider, the scripted model, and a fast check that the endpoint is there.

Imports of provider packages are lazy: a run pays only for the provider it uses.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from dataclasses import dataclass
from typing import Any

import yaml
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from runner.errors import ModelUnavailable
from runner.specs.checking import VARIABLE

PREFLIGHT_TIMEOUT = 3.0


@dataclass(frozen=True)
class ModelRef:
    provider: str  # ollama | openai | scripted
    name: str

    @classmethod
    def parse(cls, model: str) -> ModelRef:
        for provider in ("ollama", "openai", "scripted"):
            if model.startswith(provider + ":"):
                return cls(provider, model[len(provider) + 1:])
        return cls("ollama", model)


def chat_model(ref: ModelRef, *, ollama_host: str, openai_base: str, timeout: float,
               script: str | None = None, variables: dict[str, str] | None = None) -> BaseChatModel:
    if ref.provider == "scripted":
        return ScriptedChatModel(turns=parse_script(script or "", variables or {}))
    if ref.provider == "openai":
        from langchain_openai import ChatOpenAI

        # The key is not the run's to hold: the egress proxy adds it to requests for the endpoint.
        return ChatOpenAI(model=ref.name, base_url=openai_base, api_key="added-by-the-egress-proxy",
                          timeout=timeout, max_retries=0)
    from langchain_ollama import ChatOllama

    return ChatOllama(model=ref.name, base_url=ollama_host, client_kwargs={"timeout": timeout})


def limit_kwargs(ref: ModelRef, max_output: int | None) -> dict[str, Any]:
    """Per-call cap on output tokens, in each provider's own words."""
    if max_output is None or ref.provider == "scripted":
        return {}
    return {"max_tokens": max_output} if ref.provider == "openai" else {"num_predict": max_output}


def preflight(ref: ModelRef, *, ollama_host: str, openai_base: str) -> None:
    """Fail in seconds, with the fix, when the model's server or the model itself is missing."""
    if ref.provider == "scripted":
        return
    if ref.provider == "ollama":
        tags = _get_json(f"{ollama_host.rstrip('/')}/api/tags", f"Ollama at {ollama_host}",
                         "start it with `ollama serve`, or set OLLAMA_HOST")
        listed = tags.get("models", [])
        names = {m.get("name", "") for m in listed} | {m.get("model", "") for m in listed}
        wanted = {ref.name, f"{ref.name}:latest"}
        if not names & wanted:
            have = f" (it has: {', '.join(sorted(n for n in names if n)[:8])})" if names else ""
            raise ModelUnavailable(f"model '{ref.name}' is not on Ollama at {ollama_host}: "
                                   f"run `ollama pull {ref.name}`{have}")
        return
    # Inside the sandbox the base URL is the egress proxy's name for the endpoint (it adds the key).
    where = "the OpenAI-compatible server" + ("" if "://model.egress.internal" in openai_base else f" at {openai_base}")
    models = _get_json(f"{openai_base.rstrip('/')}/models", where,
                       "start it, or set LANGCHAIN_API_URL to its base URL (ending in /v1)")
    ids = {m.get("id", "") for m in models.get("data", [])}
    if ids and ref.name not in ids and len(ids) > 1:
        raise ModelUnavailable(f"model '{ref.name}' is not served at {openai_base} (it serves: "
                               f"{', '.join(sorted(ids)[:8])})")


def _get_json(url: str, what: str, fix: str) -> dict[str, Any]:
    try:
        with urllib.request.urlopen(url, timeout=PREFLIGHT_TIMEOUT) as resp:
            data = json.load(resp)
            return data if isinstance(data, dict) else {}
    except urllib.error.HTTPError as exc:
        if exc.headers.get("X-Egress-Error"):  # the run's egress proxy answered, not the server
            raise ModelUnavailable(f"cannot reach {what} ({exc.headers['X-Egress-Error']}): {fix}") from None
        raise ModelUnavailable(f"{what} answered HTTP {exc.code} to {url}: {fix}") from None
    except (urllib.error.URLError, OSError, ValueError) as exc:
        reason = getattr(exc, "reason", exc)
        raise ModelUnavailable(f"cannot reach {what} ({reason}): {fix}") from None


# -- the scripted model ---------------------------------------------------------------------------


def parse_script(text: str, variables: dict[str, str]) -> list[dict[str, Any]]:
    """Turns from a scripted model file; ${VAR} expands like spec paths, and ${INPUT} is the run's input (a script
    that echoes what it was given: a workflow's data passing, shown without a model)."""
    data = yaml.safe_load(text) or {}
    turns = data.get("turns") if isinstance(data, dict) else None
    if not isinstance(turns, list) or not all(isinstance(t, dict) for t in turns):
        raise ModelUnavailable("a scripted model file holds 'turns:', a list of mappings")
    return [_expand(t, variables) for t in turns]


def _expand(value: Any, variables: dict[str, str]) -> Any:
    if isinstance(value, str):
        return VARIABLE.sub(lambda m: variables.get(m.group(1), m.group(0)), value)
    if isinstance(value, list):
        return [_expand(v, variables) for v in value]
    if isinstance(value, dict):
        return {k: _expand(v, variables) for k, v in value.items()}
    return value


class ScriptedChatModel(BaseChatModel):
    """A chat model that answers from a script: turn N answers the Nth model call of the run.

    It keeps no state: the turn is the number of AI messages already in the conversation, so it
    behaves the same in any process. Past the last turn it answers that the script has ended.
    """

    turns: list[dict[str, Any]]

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def bind_tools(self, tools: Any, **kwargs: Any) -> ScriptedChatModel:
        return self

    def _generate(self, messages: list[BaseMessage], stop: list[str] | None = None, run_manager: Any = None,
                  **kwargs: Any) -> ChatResult:
        index = sum(1 for m in messages if isinstance(m, AIMessage))
        if index >= len(self.turns):
            raise ModelUnavailable(f"the scripted model has only {len(self.turns)} turn(s)")
        turn = self.turns[index]
        if turn.get("sleep"):
            time.sleep(float(turn["sleep"]))
        calls = [{"name": c.get("name", ""), "args": c.get("args") or {},
                  "id": c.get("id") or uuid.uuid4().hex[:12], "type": "tool_call"}
                 for c in turn.get("tool_calls") or []]
        usage = turn.get("usage") or {}
        inp, out = int(usage.get("input_tokens", 0)), int(usage.get("output_tokens", 0))
        message = AIMessage(content=str(turn.get("content") or ""), tool_calls=calls,
                            usage_metadata={"input_tokens": inp, "output_tokens": out, "total_tokens": inp + out})
        return ChatResult(generations=[ChatGeneration(message=message)])
