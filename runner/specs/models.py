"""The agent spec. These models are the single description of a spec: the JSON Schema
(schemas/agent-spec.schema.json), the field table in docs/specs.md and the validation messages all
come from them. Checks that need context (cron syntax, known tools, path variables, unique names)
live in ``checking.py``; here are only the shapes.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator

Permission = Literal["read", "write", "execute", "network"]
NAME_PATTERN = r"^[a-z0-9][a-z0-9_-]{0,62}$"
MODEL_PATTERN = r"^(ollama:|openai:|scripted:)?[^\s:][^\s]*$"


class Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class ToolSpec(Strict):
    name: str = Field(
        description="A builtin tool (file_reader, file_writer, data_analyzer, http_get, shell, memory_search, "
        "memory_save) or a custom tool from the source's tools/ folder.",
        pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,63}$",
    )
    description: str = Field("", description="What the agent should use the tool for (shown to the model).")
    permissions: list[Permission] | None = Field(
        None,
        description="What the tool may do: read, write, execute, network. Must fit the tool; when omitted, "
        "what the tool needs.",
    )
    paths: list[str] = Field(
        default_factory=list,
        description="Absolute folders or files the tool may touch (after ${CLIENT_ID}, ${AGENT_NAME} and "
        "${AGENT_ORCH_HOME} expand). Required for file tools.",
    )
    commands: list[str] = Field(
        default_factory=list,
        description="shell only: the programs it may run (by name or absolute path).",
    )
    timeout: float | None = Field(
        None, gt=0, le=3600, description="Seconds one call may take (shell, http_get); default 30."
    )


class MemorySpec(Strict):
    type: Literal["vector_db", "none"] = Field(
        "vector_db", description="vector_db: a sqlite-vec store of this agent's own; none: no memory."
    )
    collection: str | None = Field(
        None,
        pattern=NAME_PATTERN,
        description="Name of the agent's memory store; defaults to the agent name. Private to the agent "
        "and client whatever the name.",
    )
    recall: int = Field(3, ge=0, le=50, description="Memories recalled into the prompt before a run.")


class ScheduleTrigger(Strict):
    type: Literal["schedule"] = Field(description="Runs on a cron schedule.")
    cron: str = Field(
        description="Cron expression: five fields, or six with seconds first ('*/10 * * * * *').",
        min_length=1,
    )
    timezone: str = Field("UTC", description="IANA time zone the cron expression is read in.")
    persistent: bool = Field(
        True,
        description="After downtime, run one missed slot at start (like systemd's Persistent=true); "
        "never once per missed slot.",
    )


class FileChangeTrigger(Strict):
    type: Literal["file_change"] = Field(description="Runs when files appear or change in a folder.")
    path: str = Field(description="Absolute folder to watch (variables expand as in tool paths).")
    patterns: list[str] = Field(
        default_factory=lambda: ["*"], min_length=1, description="Glob patterns of file names that count."
    )
    debounce: float = Field(
        2.0, ge=0, le=3600, description="Seconds of quiet after a change before the run starts; changes "
        "in the window make one run whose input lists them all."
    )
    recursive: bool = Field(False, description="Watch subfolders too.")


Trigger = Annotated[ScheduleTrigger | FileChangeTrigger, Field(discriminator="type")]


class Constraints(Strict):
    max_runtime: float | None = Field(
        None, gt=0, le=7 * 24 * 3600,
        description="Seconds a run may take before it is stopped (timed_out); default DEFAULT_AGENT_TIMEOUT.",
    )
    max_tokens: int | None = Field(
        None, gt=0, description="Input plus output tokens a run may use (budget_exceeded past it)."
    )
    max_model_calls: int = Field(25, gt=0, le=1000, description="Model calls a run may make (stops tool loops).")
    max_memory_mb: int | None = Field(None, gt=16, description="Address space of the run process in MiB "
                                      "(default AGENT_ORCH_MAX_MEMORY_MB).")
    max_processes: int | None = Field(None, gt=0, description="Processes the run may have at once (default "
                                      "AGENT_ORCH_MAX_PROCESSES; enforced for non-root users).")
    max_file_mb: int | None = Field(None, gt=0, description="Largest file the run may write, in MiB (default "
                                    "AGENT_ORCH_MAX_FILE_MB).")
    allowed_domains: list[str] = Field(
        default_factory=list,
        description="Hosts network tools may reach: names, '*.example.com', or 'local' (this machine only). "
        "Hosts beyond this machine also need ENABLE_REMOTE_TOOLS.",
    )


RetryOn = Literal["failed", "timed_out", "interrupted"]


def _every_end() -> list[RetryOn]:
    return ["failed", "timed_out", "interrupted"]


class Retry(Strict):
    limit: int = Field(ge=1, le=100, description="Retries of one run at most (the first attempt not counted).")
    backoff: float = Field(0, ge=0, le=24 * 3600, description="Seconds between a run's end and its retry.")
    on: list[RetryOn] = Field(
        default_factory=_every_end, min_length=1,
        description="End states that are retried: failed, timed_out, interrupted (the daemon died while it ran).",
    )


MAX_RESOURCE = 1e6  # of one resource a run may claim
LABEL_KEY = re.compile(r"(?:[A-Za-z0-9][A-Za-z0-9._-]{0,62}/)?[A-Za-z0-9][A-Za-z0-9._-]{0,62}")
LABEL_VALUE = re.compile(r"[A-Za-z0-9._-]{0,63}")


class Placement(Strict):
    labels: dict[str, str] = Field(
        default_factory=dict, description="Node labels a node must have, all of them, to run this agent "
        "(Ray's node labels, e.g. {zone: lab}). Only with AGENT_ORCH_EXECUTOR=ray.")
    resources: dict[str, float] = Field(
        default_factory=dict, description="Ray resources one run holds on its node while it runs (e.g. "
        "{CPU: 1, GPU: 1}): a node runs as many at once as its totals allow.")

    @field_validator("resources")
    @classmethod
    def _positive(cls, value: dict[str, float]) -> dict[str, float]:
        for name, amount in value.items():
            if not math.isfinite(amount) or not 0 < amount <= MAX_RESOURCE:
                raise ValueError(f"resource '{name}' must be a number from above 0 to {MAX_RESOURCE:g}, not {amount}")
        return value

    @field_validator("labels")
    @classmethod
    def _operators_labels(cls, value: dict[str, str]) -> dict[str, str]:
        for key, label in value.items():
            if not LABEL_KEY.fullmatch(key):
                raise ValueError(f"label key {key[:80]!r}: letters, digits, '.', '_', '-' and one '/' (as Ray's "
                                 "labels), 1 to 127 characters")
            if key.lower().startswith("ray.io/"):
                raise ValueError(f"label '{key}': labels under ray.io/ are Ray's own (a node's id among them); "
                                 "place runs by the labels the operator gave the nodes")
            if not LABEL_VALUE.fullmatch(label):
                raise ValueError(f"label '{key}': its value {label[:80]!r} may hold letters, digits, '.', '_' and '-', "
                                 "up to 63 characters")
        return value


class AgentSpec(Strict):
    name: str = Field(
        pattern=NAME_PATTERN,
        description="Unique within the repository; lowercase letters, digits, '-' and '_' (it names files).",
    )
    description: str = Field("", description="What the agent is for.")
    instructions: str | None = Field(None, description="The task given to the model; defaults to description.")
    model: str = Field(
        pattern=MODEL_PATTERN,
        description="NAME or ollama:NAME (Ollama), openai:NAME (OpenAI-compatible endpoint), or "
        "scripted:PATH (a scripted model, PATH relative to the spec file).",
    )
    enabled: bool = Field(True, description="A disabled agent is applied but never triggered.")
    overlap: Literal["forbid", "queue", "replace"] = Field(
        "forbid",
        description="When a trigger fires while a run is in flight: forbid (skip it), queue, or replace "
        "(stop the old run).",
    )
    tools: list[ToolSpec] = Field(default_factory=list, description="Tools the agent may call.")
    memory: MemorySpec | None = Field(None, description="The agent's memory; none when omitted.")
    triggers: list[Trigger] = Field(default_factory=list, description="What starts a run besides a user.")
    constraints: Constraints = Field(default_factory=Constraints, description="Limits of each run.")
    placement: Placement | None = Field(
        None, description="Where runs go on a Ray cluster: nodes with these labels and resources. Without "
        "it, runs go to any node (a file_change trigger's runs stay on the daemon's node).",
    )
    retry: Retry | None = Field(
        None, description="Retry runs started by a trigger that end in one of the 'on' states; each retry is "
        "a new run whose retry_of names the run it retries. Runs started by a user are not retried.",
    )

    @property
    def task(self) -> str:
        return self.instructions or self.description
