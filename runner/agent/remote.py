"""Asking a remote A2A agent: the client end of a ``remote_agent`` tool, on the control plane's side.

The run asks (``remote.ask``); its supervisor calls the remote agent with a2a-sdk's client (protocol
v1.0, JSON-RPC): the Agent Card is read at the tool's URL when that names a card, else at
``URL/.well-known/agent-card.json``; one blocking ``SendMessage`` carries the question; the answer is
the text of the completed task's artifacts (or of its status message, or of a message answered
instead of a task). Every URL the call goes to, the card's own endpoint included, passes ``check``
first: a card cannot send the call to a host the run may not reach. The credential (a bearer token)
rides on the client's own HTTP connection, never through the run.

The client's transport (``_Guarded``) holds two rules whatever a2a-sdk does with the card: every request
goes to the tool's own origin (scheme, host and port, as httpx parses them: ``origin``), so a card cannot
send the call or the credential to another host or port; and a response is read as it arrives, up to
MAX_CARD_BYTES for the card and MAX_REPLY_BYTES for an answer (compressed bodies are not asked for, and
refused), so a remote side cannot fill the daemon's memory.
"""

from __future__ import annotations

import asyncio
import urllib.parse
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from runner.errors import DeniedError, OrchestratorError

CARD_PATH = "/.well-known/agent-card.json"
MAX_ANSWER = 16000  # characters of a remote answer handed to the run (as a callee's output)
MAX_CARD_BYTES = 1 << 20  # bytes of an Agent Card read (a GET)
MAX_REPLY_BYTES = 4 << 20  # bytes of an answer read (a POST): a task with its artifacts


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
    home = origin(base + card_path)
    check(base + card_path)
    headers = {"Accept-Encoding": "identity", **({"Authorization": f"Bearer {token}"} if token else {})}
    async with httpx.AsyncClient(headers=headers, timeout=timeout, follow_redirects=False, trust_env=False,
                                 transport=_guarded(home)) as http:
        try:
            card = await A2ACardResolver(http, base, card_path).get_agent_card()
        except AgentCardResolutionError as exc:
            raise OrchestratorError(f"the remote agent's card at {base + card_path} cannot be read: "
                                    f"{str(exc)[:300]}") from None
        for interface in card.supported_interfaces:
            check(interface.url)  # where the card sends the call: the same rules as the card's own URL
            if origin(interface.url) != home:
                raise DeniedError(f"the remote agent's card names {_show(origin(interface.url))}, not the tool's "
                                  f"origin {_show(home)}: the call and its credential go nowhere else")
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


def origin(url: str) -> tuple[str, str, int]:
    """(scheme, host, port) of ``url`` as httpx connects to it (its own parsing: IDNA, default ports), the one
    reading the checks and the transport share. Raises DeniedError for a URL httpx cannot use."""
    import httpx

    try:
        parsed = httpx.URL(url)
    except (httpx.InvalidURL, ValueError, TypeError) as exc:
        raise DeniedError(f"'{url[:200]}' is not a URL the remote agent can be asked at: {exc}") from None
    if parsed.scheme not in ("http", "https") or not parsed.host:
        raise DeniedError(f"only http and https URLs with a host are allowed, not '{url[:200]}'")
    return parsed.scheme, parsed.host.lower().rstrip("."), parsed.port or (443 if parsed.scheme == "https" else 80)


def _show(where: tuple[str, str, int]) -> str:
    scheme, host, port = where
    return f"{scheme}://{f'[{host}]' if ':' in host else host}:{port}"


def _guarded(home: tuple[str, str, int]) -> Any:
    """The client's transport: requests to ``home`` only, responses capped as they are read."""
    import httpx

    class Capped(httpx.AsyncByteStream):
        def __init__(self, stream: Any, limit: int, what: str) -> None:
            self.stream, self.limit, self.what = stream, limit, what

        async def __aiter__(self) -> Any:
            seen = 0
            async for chunk in self.stream:
                seen += len(chunk)
                if seen > self.limit:
                    raise OrchestratorError(f"the remote agent's {self.what} is over {self.limit >> 20} MiB: refused")
                yield chunk

        async def aclose(self) -> None:
            await self.stream.aclose()

    class Guarded(httpx.AsyncBaseTransport):
        def __init__(self) -> None:
            self.inner = httpx.AsyncHTTPTransport(trust_env=False)

        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            where = origin(str(request.url))
            if where != home:
                raise DeniedError(f"a request to {_show(where)}, not the tool's origin {_show(home)}: refused")
            limit, what = (MAX_CARD_BYTES, "card") if request.method == "GET" else (MAX_REPLY_BYTES, "answer")
            response = await self.inner.handle_async_request(request)
            encoding = response.headers.get("content-encoding", "identity").strip().lower()
            length = response.headers.get("content-length", "").strip()
            problem = None
            if encoding not in ("", "identity"):
                problem = f"the remote agent's {what} came {encoding}-encoded, which was not asked for: refused"
            elif length.isdigit() and int(length) > limit:
                problem = f"the remote agent's {what} is {int(length)} bytes, over {limit >> 20} MiB: refused"
            if problem:
                await response.aclose()
                raise OrchestratorError(problem)
            return httpx.Response(response.status_code, headers=response.headers, request=request,
                                  stream=Capped(response.stream, limit, what), extensions=response.extensions)

        async def aclose(self) -> None:
            await self.inner.aclose()

    return Guarded()


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
