"""Asking a remote A2A agent: the client end of a ``remote_agent`` tool, on the control plane's side.

The run asks (``remote.ask``); its supervisor calls the remote agent with a2a-sdk's client (protocol
v1.0, JSON-RPC): the Agent Card is read at the tool's URL when that names a card, else at
``URL/.well-known/agent-card.json``; one blocking ``SendMessage`` carries the question; the answer is
the text of the completed task's artifacts (or of its status message, or of a message answered
instead of a task). Every URL the call goes to, the card's own endpoint included, passes ``check``
first: a card cannot send the call to a host the run may not reach. The credential (a bearer token)
rides on the client's own HTTP connection, never through the run.
"""

from __future__ import annotations

import asyncio
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from runner.errors import OrchestratorError

CARD_PATH = "/.well-known/agent-card.json"
MAX_ANSWER = 16000  # characters of a remote answer handed to the run (as a callee's output)


@dataclass(frozen=True)
class RemoteAnswer:
    text: str
    task_id: str | None
    state: str


def ask_remote(url: str, question: str, *, token: str | None, timeout: float,
               check: Callable[[str], None]) -> RemoteAnswer:
    """Ask the A2A agent at ``url``; ``check(url)`` raises (DeniedError) for a URL the run may not reach.
    Raises OrchestratorError when the agent cannot be asked or its task did not complete."""
    try:
        return asyncio.run(asyncio.wait_for(_ask(url, question, token, timeout, check), timeout))
    except TimeoutError:
        raise OrchestratorError(f"the remote agent at {url} did not answer within {timeout:g}s") from None


async def _ask(url: str, question: str, token: str | None, timeout: float,
               check: Callable[[str], None]) -> RemoteAnswer:
    import httpx  # a2a-sdk's transport; loaded by the first remote ask, not by every daemon
    from a2a.client import A2AClientError, AgentCardResolutionError, ClientConfig, ClientFactory
    from a2a.client.card_resolver import A2ACardResolver
    from a2a.types.a2a_pb2 import Message, Part, Role, SendMessageRequest
    from a2a.utils.errors import A2AError

    base, card_path = card_location(url)
    check(base + card_path)
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with httpx.AsyncClient(headers=headers, timeout=timeout, follow_redirects=False,
                                 trust_env=False) as http:
        try:
            card = await A2ACardResolver(http, base, card_path).get_agent_card()
        except AgentCardResolutionError as exc:
            raise OrchestratorError(f"the remote agent's card at {base + card_path} cannot be read: "
                                    f"{str(exc)[:300]}") from None
        for interface in card.supported_interfaces:
            check(interface.url)  # where the card sends the call: the same rules as the card's own URL
        try:
            client = ClientFactory(ClientConfig(streaming=False, httpx_client=http)).create(card)
        except ValueError as exc:
            raise OrchestratorError(f"the remote agent at {url} speaks no protocol binding we do: {exc}") from None
        request = SendMessageRequest(message=Message(message_id=uuid.uuid4().hex, role=Role.ROLE_USER,
                                                     parts=[Part(text=question)]))
        try:
            async for response in client.send_message(request):
                return _answer_of(response, url)
        except (A2AClientError, A2AError) as exc:  # the transport's faults, and the errors the agent answered
            raise OrchestratorError(f"the remote agent at {url} failed: {type(exc).__name__}: "
                                    f"{str(exc)[:300]}") from None
    raise OrchestratorError(f"the remote agent at {url} sent no answer")


def card_location(url: str) -> tuple[str, str]:
    """(base, path) of the Agent Card for a tool's URL: the card itself, or the agent's endpoint."""
    parts = urllib.parse.urlsplit(url)
    path = parts.path.rstrip("/")
    if path.endswith(CARD_PATH):
        path, card = path[: -len(CARD_PATH)], CARD_PATH
    else:
        card = CARD_PATH
    return urllib.parse.urlunsplit((parts.scheme, parts.netloc, path, "", "")), card


def _answer_of(response: Any, url: str) -> RemoteAnswer:
    from a2a.types.a2a_pb2 import TaskState

    if response.HasField("message"):
        return RemoteAnswer(_text(response.message.parts), None, "message")
    task = response.task
    state = TaskState.Name(task.status.state)
    if task.status.state != TaskState.TASK_STATE_COMPLETED:
        said = _text(task.status.message.parts) if task.status.HasField("message") else ""
        raise OrchestratorError(f"the remote agent at {url} ended its task {task.id} {state}"
                                + (f": {said[:500]}" if said else ""))
    text = "\n".join(_text(a.parts) for a in task.artifacts if _text(a.parts))
    if not text and task.status.HasField("message"):
        text = _text(task.status.message.parts)
    return RemoteAnswer(text[:MAX_ANSWER], task.id or None, state)


def _text(parts: Any) -> str:
    return "\n".join(p.text for p in parts if p.text)
