"""What the A2A protocol shows of our state: the Agent Cards of exposed agents, tasks made from runs, and the
``a2a_messages`` table that ties a message to the run it started (docs/a2a.md).

A task is a run: its id is the run id, its state the run's status mapped below, its artifact the run's
output. The table is what A2A adds to a run: the message id that de-duplicates a resend and the context id
the caller gave (or we made). A task is only ever found through this table, so the A2A endpoints show the
runs A2A started and no other (a cron run's input stays where it was).
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from a2a.server.request_handlers.response_helpers import agent_card_to_dict
from a2a.types.a2a_pb2 import (
    AgentCapabilities,
    AgentCard,
    AgentInterface,
    AgentProvider,
    AgentSkill,
    Artifact,
    HTTPAuthSecurityScheme,
    Message,
    Part,
    Role,
    SecurityRequirement,
    SecurityScheme,
    StringList,
    Task,
    TaskState,
    TaskStatus,
)
from a2a.utils.constants import PROTOCOL_VERSION_CURRENT, TransportProtocol

from runner.reconcile.applied import AppliedAgent, load_applied
from runner.specs.models import AgentSpec
from runner.state import Transaction, register
from runner.times import parse, utcnow

ENDPOINT = "/agents/v1/a2a"  # an agent's endpoint is ENDPOINT/NAME, its card ENDPOINT/NAME/.well-known/...
TEXT = "text/plain"
SCHEME = "bearer"  # the name of the one security scheme in every card
MAX_SKILL_TEXT = 1000  # characters of instructions shown as a skill's description, when there is no description

# Run status -> task state. A run that ended by itself without succeeding (failed, timed out, over budget,
# cut short by a daemon's death) is a failed task; only a stop someone asked for is canceled, and a run the
# daemon never started (its overlap policy, a shutdown) was rejected.
STATES: dict[str, TaskState] = {
    "queued": TaskState.TASK_STATE_SUBMITTED, "running": TaskState.TASK_STATE_WORKING,
    "succeeded": TaskState.TASK_STATE_COMPLETED, "failed": TaskState.TASK_STATE_FAILED,
    "timed_out": TaskState.TASK_STATE_FAILED, "budget_exceeded": TaskState.TASK_STATE_FAILED,
    "interrupted": TaskState.TASK_STATE_FAILED, "stopped": TaskState.TASK_STATE_CANCELED,
    "skipped": TaskState.TASK_STATE_REJECTED,
}

register("""
CREATE TABLE IF NOT EXISTS a2a_messages (
    client_id TEXT NOT NULL,
    message_id TEXT NOT NULL,
    agent TEXT NOT NULL,
    run_id TEXT NOT NULL,
    context_id TEXT NOT NULL,
    created_at TEXT NOT NULL,
    PRIMARY KEY (client_id, agent, message_id)
);
CREATE INDEX IF NOT EXISTS a2a_messages_run ON a2a_messages (client_id, run_id);
""")


@dataclass(frozen=True)
class Sent:
    """A message that started a run: a row of ``a2a_messages``."""

    message_id: str
    agent: str
    run_id: str
    context_id: str
    created_at: str


def exposed(conn: sqlite3.Connection, client_id: str, name: str | None = None) -> dict[str, AgentSpec]:
    """The client's applied agents (with a valid spec, the last good one included) that say ``a2a: {expose:
    true}``, by name; with ``name``, that one or nothing."""
    found: dict[str, AgentSpec] = {}
    for agent in load_applied(conn, client_id, name).values():
        spec = _spec(agent)
        if spec is not None and spec.a2a is not None and spec.a2a.expose and spec.enabled:
            found[agent.name] = spec
    return found


def _spec(agent: AppliedAgent) -> AgentSpec | None:
    try:
        return agent.spec
    except ValueError:  # a row written by a version whose spec model differed: not servable, not an error here
        return None


# -- cards ----------------------------------------------------------------------------------------------


def agent_card(base: str, name: str, spec: AgentSpec) -> dict[str, Any]:
    """The Agent Card of one exposed agent, as the sdk's own server serializes one."""
    card = _card(f"{base}{ENDPOINT}/{name}", name, spec.description or _skill_text(spec), [_skill(name, spec)])
    return agent_card_to_dict(card)


def root_card(base: str, client_id: str, agents: dict[str, AgentSpec]) -> dict[str, Any]:
    """The card at the root: one skill per exposed agent of the client, all served by ENDPOINT, where a
    message names its agent in ``metadata.skill``."""
    skills = [_skill(name, spec) for name, spec in sorted(agents.items())]
    description = (f"The agents of client '{client_id}' served over A2A: name one as the message's "
                   "metadata.skill (its skill id).")
    return agent_card_to_dict(_card(f"{base}{ENDPOINT}", f"agent-orchestrator ({client_id})", description, skills))


def _card(url: str, name: str, description: str, skills: list[AgentSkill]) -> AgentCard:
    return AgentCard(
        name=name, description=description, version=PROTOCOL_VERSION_CURRENT,
        provider=AgentProvider(organization="agent-orchestrator", url=url),
        supported_interfaces=[AgentInterface(url=url, protocol_binding=TransportProtocol.JSONRPC.value,
                                             protocol_version=PROTOCOL_VERSION_CURRENT)],
        capabilities=AgentCapabilities(streaming=False, push_notifications=False),
        default_input_modes=[TEXT], default_output_modes=[TEXT], skills=skills,
        security_schemes={SCHEME: SecurityScheme(http_auth_security_scheme=HTTPAuthSecurityScheme(
            scheme="Bearer", bearer_format="agentctl token",
            description="An API token of the agent's client (agentctl token create): viewer reads tasks, "
                        "operator sends messages and cancels."))},
        security_requirements=[SecurityRequirement(schemes={SCHEME: StringList()})],
    )


def _skill(name: str, spec: AgentSpec) -> AgentSkill:
    return AgentSkill(id=name, name=name, description=spec.description or _skill_text(spec), tags=["agent"],
                      input_modes=[TEXT], output_modes=[TEXT])


def _skill_text(spec: AgentSpec) -> str:
    return (spec.instructions or spec.name)[:MAX_SKILL_TEXT]


# -- tasks ----------------------------------------------------------------------------------------------


def task(run: dict[str, Any], sent: Sent, history_length: int | None = None) -> Task:
    """The task of a run: its state, the output as an artifact (and as the status message once it ended),
    and the history (the caller's message, then the agent's answer), cut to the last ``history_length``."""
    status = str(run["status"])
    state = STATES.get(status, TaskState.TASK_STATE_WORKING)
    output, error = run.get("output"), run.get("error")
    result = Task(id=sent.run_id, context_id=sent.context_id,
                  metadata={"agent": sent.agent, "run_status": status, **({"error": error} if error else {})})
    result.status.CopyFrom(TaskStatus(state=state))
    when = run.get("ended_at") or run.get("started_at") or run.get("queued_at")
    if when:
        result.status.timestamp.FromDatetime(when if isinstance(when, datetime) else parse(str(when)))
    history = [Message(message_id=sent.message_id, context_id=sent.context_id, task_id=sent.run_id,
                       role=Role.ROLE_USER, parts=[Part(text=str(run.get("input") or ""))])]
    answer = output if status == "succeeded" else error or output
    if answer:
        reply = Message(message_id=f"{sent.run_id}-answer", context_id=sent.context_id, task_id=sent.run_id,
                        role=Role.ROLE_AGENT, parts=[Part(text=str(answer))])
        result.status.message.CopyFrom(reply)
        history.append(reply)
    if output:
        result.artifacts.append(Artifact(artifact_id="output", name="output", parts=[Part(text=str(output))]))
    if history_length is not None:
        history = history[-history_length:] if history_length > 0 else []
    result.history.extend(history)
    return result


# -- the messages table ---------------------------------------------------------------------------------


def find_message(conn: sqlite3.Connection, client_id: str, agent: str, message_id: str) -> Sent | None:
    row = conn.execute("SELECT * FROM a2a_messages WHERE client_id = ? AND agent = ? AND message_id = ?",
                       (client_id, agent, message_id)).fetchone()
    return _sent(row) if row is not None else None


def find_task(conn: sqlite3.Connection, client_id: str, run_id: str) -> Sent | None:
    row = conn.execute("SELECT * FROM a2a_messages WHERE client_id = ? AND run_id = ?", (client_id, run_id)).fetchone()
    return _sent(row) if row is not None else None


def record(conn: sqlite3.Connection, client_id: str, message_id: str, agent: str, run_id: str,
           context_id: str) -> Sent:
    sent = Sent(message_id, agent, run_id, context_id, utcnow())
    with Transaction(conn) as tx:
        tx.execute("INSERT INTO a2a_messages (client_id, message_id, agent, run_id, context_id, created_at) "
                   "VALUES (?, ?, ?, ?, ?, ?)", (client_id, message_id, agent, run_id, context_id, sent.created_at))
    return sent


def _sent(row: sqlite3.Row) -> Sent:
    return Sent(row["message_id"], row["agent"], row["run_id"], row["context_id"], row["created_at"])
