"""The agent spec. These models are the single description of a spec: the JSON Schema
(schemas/agent-spec.schema.json), the field table in docs/specs.md and the validation messages all
come from them. Checks that need context (cron syntax, known tools, path variables, unique names)
live in ``checking.py``; here are only the shapes.
"""

from __future__ import annotations

import math
import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

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
        None, gt=0, le=3600, description="Seconds one call may take (shell, http_get, an agent or remote "
        "agent asked); default 30 (an agent asked: its own max_runtime, which this caps; a remote agent: "
        "DEFAULT_AGENT_TIMEOUT)."
    )
    agent: str | None = Field(
        None, pattern=NAME_PATTERN, description="This tool asks another agent of the repository (an agent as a "
        "tool): the callee runs in its own sandbox with what both may do, and its tokens count against this "
        "run's max_tokens. The tool's name is then free.")
    remote_agent: str | None = Field(
        None, pattern=r"^https?://[^\s]+$", max_length=2000, description="This tool asks an A2A agent at this URL "
        "(its endpoint, or its card's). Its host must be in constraints.allowed_domains; the call goes out "
        "through the supervisor, which adds the credential (secret_env). The tool's name is then free.")
    secret_env: str | None = Field(
        None, pattern=r"^[A-Za-z_][A-Za-z0-9_]{0,127}$", description="remote_agent only: the daemon's "
        "environment variable holding the remote side's bearer token (never the token itself; the run never "
        "sees it). The operator must list it in AGENT_ORCH_REMOTE_SECRETS; the runner's own variables "
        "(OPENAI_API_KEY, AGENT_ORCH_*, LANGCHAIN_*) are refused.")

    @model_validator(mode="after")
    def _one_kind(self) -> ToolSpec:
        if self.agent and self.remote_agent:
            raise ValueError("a tool asks an agent or a remote_agent, not both")
        if self.secret_env and not self.remote_agent:
            raise ValueError("secret_env is the remote side's credential: it goes with remote_agent")
        if (self.agent or self.remote_agent) and (self.paths or self.commands or self.permissions):
            raise ValueError("an agent asked as a tool has its own tools: paths, commands and permissions "
                             "belong in its spec")
        return self


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


ENV_NAME = r"^[A-Za-z_][A-Za-z0-9_]{0,127}$"
RunEnd = Literal["succeeded", "failed", "timed_out", "stopped", "budget_exceeded", "interrupted", "skipped"]


class WebhookTrigger(Strict):
    type: Literal["webhook"] = Field(description="Runs when an HTTP POST arrives at "
                                     "/agents/v1/hooks/events/CLIENT/PATH (no API token: its own secret guards it).")
    auth: Literal["hmac", "bearer"] = Field(
        "hmac", description="hmac: the body's HMAC-SHA256 in X-Hub-Signature-256 (GitHub's form, "
        "'sha256=HEX'); bearer: 'Authorization: Bearer SECRET'.")
    secret_env: str | None = Field(None, pattern=ENV_NAME, description="The daemon's environment variable "
                                   "holding the secret (never the secret itself). One of secret_env, secret_file.")
    secret_file: str | None = Field(None, min_length=1, description="An absolute file holding the secret "
                                    "(read at each delivery, so it can be rotated; variables expand as in paths).")
    path: str | None = Field(None, pattern=r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$", description="The URL's last "
                             "segment; default the agent's or workflow's name.")
    dedupe: str | None = Field(None, max_length=2000, description="A template over headers and payload whose "
                               "value names a delivery, e.g. \"{{ headers['X-GitHub-Delivery'] }}\": a second "
                               "delivery with the same value starts nothing. Header names match without regard "
                               "to case.")
    inputs: dict[str, str] = Field(default_factory=dict, description="Workflows only: templates over headers "
                                   "and payload giving the workflow's inputs. An agent's run input is the payload.")

    @model_validator(mode="after")
    def _one_secret(self) -> WebhookTrigger:
        if (self.secret_env is None) == (self.secret_file is None):
            raise ValueError("a webhook needs its secret: name secret_env or secret_file (one of them)")
        return self


def _succeeded() -> list[RunEnd]:
    return ["succeeded"]


class RunCompletedTrigger(Strict):
    type: Literal["run_completed"] = Field(description="Runs when a run of another agent or workflow ends in "
                                           "one of the statuses; its output is this run's input.")
    agent: str | None = Field(None, pattern=NAME_PATTERN, description="The agent whose runs are watched (one of "
                              "agent, workflow).")
    workflow: str | None = Field(None, pattern=NAME_PATTERN, description="The workflow whose runs are watched.")
    status: list[RunEnd] = Field(default_factory=_succeeded, min_length=1,
                                 description="End states that fire it (default succeeded).")

    @model_validator(mode="after")
    def _one_source(self) -> RunCompletedTrigger:
        if (self.agent is None) == (self.workflow is None):
            raise ValueError("run_completed watches one agent or one workflow: name agent or workflow")
        return self


Trigger = Annotated[ScheduleTrigger | FileChangeTrigger | WebhookTrigger | RunCompletedTrigger,
                    Field(discriminator="type")]


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


class A2A(Strict):
    expose: bool = Field(False, description="Serve this agent over the A2A protocol (an Agent Card at "
                         "/agents/v1/a2a/NAME/.well-known/agent-card.json; calls need an API token).")


class AgentSpec(Strict):
    kind: Literal["agent"] = Field("agent", exclude=True, description="agent, the default (a workflow says kind: "
                                   "workflow).")
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
    a2a: A2A | None = Field(None, description="Other agents reach this one over the A2A protocol: "
                            "{expose: true}.")
    retry: Retry | None = Field(
        None, description="Retry runs started by a trigger that end in one of the 'on' states; each retry is "
        "a new run whose retry_of names the run it retries. Runs started by a user are not retried.",
    )

    @property
    def task(self) -> str:
        return self.instructions or self.description


# -- workflows ------------------------------------------------------------------------------------

InputType = Literal["string", "number", "integer", "boolean", "object", "array"]
STEP_ID_PATTERN = r"^[a-z_][a-z0-9_]{0,62}$"  # usable in an expression as steps.<id>


class WorkflowInput(Strict):
    type: InputType = Field("string", description="What the input holds: string, number, integer, boolean, "
                            "object or array.")
    default: Any = Field(None, description="Its value when a run does not give one; without a default the "
                         "input is required.")
    description: str = Field("", description="What the input is for.")


class Approval(Strict):
    timeout: float = Field(86400, gt=0, le=90 * 24 * 3600,
                           description="Seconds the step waits for a person before on_timeout decides.")
    on_timeout: Literal["fail", "approve", "reject"] = Field(
        "fail", description="What a timed-out approval becomes: fail (the step fails: timed_out), approve, or "
        "reject (the step fails).")
    message: str = Field("", description="What the person is asked (a template, as input).")


class WorkflowStep(Strict):
    model_config = ConfigDict(extra="forbid", frozen=True, populate_by_name=True)

    id: str = Field(pattern=STEP_ID_PATTERN, description="Unique in the workflow; lowercase letters, digits and "
                    "'_' (it is written steps.<id> in expressions).")
    agent: str | None = Field(None, pattern=NAME_PATTERN, description="The agent whose run this step is (in the "
                              "same repository). A step has agent or approval.")
    approval: Approval | None = Field(None, description="The step waits for a person: agentctl approve, or the "
                                      "API (operator role).")
    needs: list[str] = Field(default_factory=list, description="Steps that must have succeeded (or been skipped) "
                             "before this one starts.")
    if_: str | None = Field(None, alias="if", description="An expression, without braces: the step runs when it "
                            "is true, and is skipped otherwise.")
    for_each: str | None = Field(None, description="An expression, without braces, giving a list: one run per "
                                 "item ({{ item }} in input), their answers in steps.<id>.outputs, in order.")
    max_parallel: int | None = Field(None, ge=1, le=1000, description="Runs of a fan-out at once (MAX_AGENTS "
                                     "bounds them too); default: as many as MAX_AGENTS allows.")
    input: str = Field("", description="The run's input: a template over inputs, steps, item.")
    retry: Retry | None = Field(None, description="Retry the step's run when it ends in one of the 'on' "
                                "states: the agents' retry shape.")
    continue_on_error: bool = Field(False, description="A failure of this step does not fail the workflow; "
                                    "steps that need it still wait for its success.")


class WorkflowConstraints(Strict):
    max_runtime: float | None = Field(None, gt=0, le=90 * 24 * 3600, description="Seconds the whole workflow "
                                      "may take (approvals included); runs in flight are stopped at the deadline.")
    max_tokens: int | None = Field(None, gt=0, description="Tokens every step and retry together may use: each "
                                   "run's budget is capped at what is left.")


class WorkflowSpec(Strict):
    kind: Literal["workflow"] = Field(description="This file is a workflow (agents say kind: agent, the default).")
    name: str = Field(pattern=NAME_PATTERN, description="Unique within the repository, across agents and "
                      "workflows.")
    description: str = Field("", description="What the workflow is for.")
    enabled: bool = Field(True, description="A disabled workflow is applied but never triggered.")
    inputs: dict[str, WorkflowInput] = Field(default_factory=dict, description="Named inputs of a run "
                                             "(inputs.<name> in expressions).")
    triggers: list[Trigger] = Field(default_factory=list, description="What starts a run besides a user.")
    constraints: WorkflowConstraints = Field(default_factory=WorkflowConstraints,
                                             description="Limits of the whole workflow run.")
    steps: list[WorkflowStep] = Field(min_length=1, description="The steps: a DAG through 'needs'.")
