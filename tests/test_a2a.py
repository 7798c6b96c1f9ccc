"""A2A, end to end: a real `agentctl serve` on a free port, real spec repositories, and a2a-sdk's own client
in its default (v1.0) mode: its card resolver, its JSON-RPC transport, its AuthInterceptor for the token.

One daemon serves the module, for two clients: 'default' with the agents, and 'other', whose exposed agent
the default client's tokens must not reach. Every wait is a bounded poll, never a sleep.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from typing import Any

import httpx
import pytest
from a2a.client import (
    A2ACardResolver,
    A2AClientError,
    AgentCardResolutionError,
    AuthInterceptor,
    Client,
    ClientCallContext,
    ClientConfig,
    ClientFactory,
    CredentialService,
)
from a2a.helpers.proto_helpers import new_text_message
from a2a.types.a2a_pb2 import (
    AgentCard,
    CancelTaskRequest,
    GetTaskRequest,
    Role,
    SendMessageConfiguration,
    SendMessageRequest,
    Task,
    TaskState,
)
from a2a.utils.errors import InvalidParamsError, TaskNotFoundError
from api_helpers import Served, make_repo, poll, scripted, two_clients
from daemon_helpers import wait_ledger

EXPOSED = {"a2a": {"expose": True}}


@pytest.fixture(scope="module")
def main(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("a2a")
    files: dict[str, Any] = {
        **scripted("helper", [{"content": "the answer is 42"}], overlap="queue", **EXPOSED),
        **scripted("sleeper", [{"sleep": 60, "content": "too late"}], constraints={"max_runtime": 120}, **EXPOSED),
        **scripted("hidden", [{"content": "hidden"}]),
    }
    default_repo = make_repo(base / "repo-default", files)
    other_repo = make_repo(base / "repo-other", scripted("theirs", [{"content": "theirs"}], **EXPOSED))
    served = two_clients(base, default_repo, other_repo)
    try:
        served.tokens = {role: served.token(role, f"{role}-default") for role in ("viewer", "operator")}
        served.tokens["other"] = served.token("operator", "operator-other", "other")
        yield served
    finally:
        served.stop()


class Bearer(CredentialService):
    """The API token, handed to the sdk's AuthInterceptor for the card's bearer scheme."""

    def __init__(self, token: str) -> None:
        self.token = token

    async def get_credentials(self, security_scheme_name: str, context: ClientCallContext | None) -> str | None:
        return self.token


def url(served: Served, name: str | None = None) -> str:
    return f"http://127.0.0.1:{served.port}/agents/v1/a2a" + (f"/{name}" if name else "")


async def fetch_card(served: Served, name: str | None, token: str | None) -> AgentCard:
    async with httpx.AsyncClient(timeout=30) as http:
        resolver = A2ACardResolver(http, url(served, name) if name else f"http://127.0.0.1:{served.port}")
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return await resolver.get_agent_card(http_kwargs={"headers": headers})


@asynccontextmanager
async def connected(served: Served, name: str | None, role: str) -> AsyncIterator[Client]:
    """A client of the sdk made from the agent's card (fetched with the operator's token), calling with
    ``role``'s token through the AuthInterceptor."""
    card = await fetch_card(served, name, served.tokens["operator"])
    async with httpx.AsyncClient(timeout=60) as http:
        factory = ClientFactory(ClientConfig(httpx_client=http, streaming=False))
        client = factory.create(card, interceptors=[AuthInterceptor(Bearer(served.tokens[role]))])
        try:
            yield client
        finally:
            await client.close()


async def send(client: Client, text: str, *, message_id: str | None = None, immediately: bool = False,
               skill: str | None = None) -> Task:
    message = new_text_message(text, role=Role.ROLE_USER)
    if message_id:
        message.message_id = message_id
    if skill:
        message.metadata.update({"skill": skill})
    request = SendMessageRequest(message=message, configuration=SendMessageConfiguration(
        return_immediately=immediately))
    answers = [answer async for answer in client.send_message(request)]
    assert len(answers) == 1 and answers[0].HasField("task"), answers
    return answers[0].task


def runs_of(served: Served, agent: str) -> list[dict[str, Any]]:
    reply = served.api("GET", f"/runs?agent={agent}", role="viewer")
    assert reply.status == 200, reply.body
    runs: list[dict[str, Any]] = reply.json["runs"]
    return runs


def test_the_card_says_what_the_sdk_needs_to_call_the_agent(main: Served) -> None:
    card = asyncio.run(fetch_card(main, "helper", main.tokens["viewer"]))
    assert card.name == "helper" and card.description == "test agent helper"
    assert [s.id for s in card.skills] == ["helper"]
    [interface] = card.supported_interfaces
    assert interface.url == url(main, "helper")
    assert interface.protocol_binding == "JSONRPC" and interface.protocol_version == "1.0"
    assert not card.capabilities.streaming
    assert list(card.default_input_modes) == list(card.default_output_modes) == ["text/plain"]
    assert card.security_schemes["bearer"].http_auth_security_scheme.scheme == "Bearer"
    assert [list(r.schemes) for r in card.security_requirements] == [["bearer"]]

    root = asyncio.run(fetch_card(main, None, main.tokens["viewer"]))
    assert sorted(s.id for s in root.skills) == ["helper", "sleeper"]  # not 'hidden': it is not exposed
    assert root.supported_interfaces[0].url == url(main)


def test_cards_need_a_token_and_name_only_exposed_agents_of_the_callers_client(main: Served) -> None:
    path = "/agents/v1/a2a/{}/.well-known/agent-card.json"
    assert main.request("GET", path.format("helper")).status == 401
    assert main.request("GET", "/.well-known/agent-card.json").status == 401
    with pytest.raises(AgentCardResolutionError) as refused:
        asyncio.run(fetch_card(main, "hidden", main.tokens["viewer"]))
    assert refused.value.status_code == 404
    hidden = main.request("GET", path.format("hidden"), role="viewer")
    unknown = main.request("GET", path.format("nobody"), role="viewer")
    foreign = main.request("GET", path.format("theirs"), role="viewer")
    assert hidden.status == unknown.status == foreign.status == 404
    messages = {r.error()["message"].replace(n, "X") for r, n in ((hidden, "hidden"), (unknown, "nobody"),
                                                                  (foreign, "theirs"))}
    assert len(messages) == 1, messages
    assert main.request("GET", path.format("theirs"), role="other").status == 200
    assert main.request("GET", "/.well-known/agent-card.json", role="other").status == 404  # the default's card


def test_send_message_answers_a_completed_task_that_get_task_reads(main: Served) -> None:
    async def talk() -> tuple[Task, Task]:
        async with connected(main, "helper", "operator") as client:
            task = await send(client, "what is the answer?")
        async with connected(main, "helper", "viewer") as client:
            read = await client.get_task(GetTaskRequest(id=task.id))
        return task, read

    task, read = asyncio.run(talk())
    assert task.status.state == TaskState.TASK_STATE_COMPLETED, task
    assert task.artifacts[0].parts[0].text == "the answer is 42"
    assert task.context_id  # none was sent: one was made
    assert [m.role for m in task.history] == [Role.ROLE_USER, Role.ROLE_AGENT]
    assert task.history[0].parts[0].text == "what is the answer?"
    assert read.id == task.id and read.context_id == task.context_id
    assert read.status.state == TaskState.TASK_STATE_COMPLETED and read.artifacts == task.artifacts
    run = main.api("GET", f"/runs/{task.id}", role="viewer").json  # the task is the run
    assert run["agent"] == "helper" and run["trigger"] == "a2a" and run["requested_by"] == "a2a:operator-default"
    assert run["output"] == "the answer is 42"


def test_a_repeated_message_id_starts_no_second_run(main: Served) -> None:
    message_id = f"m-{uuid.uuid4().hex}"

    async def twice() -> tuple[Task, Task]:
        async with connected(main, "helper", "operator") as client:
            return await send(client, "once", message_id=message_id), await send(client, "once", message_id=message_id)

    before = len(runs_of(main, "helper"))
    first, second = asyncio.run(twice())
    assert first.id == second.id and first.context_id == second.context_id
    assert len(runs_of(main, "helper")) == before + 1
    # Another message id is another run.
    third = asyncio.run(_send_once(main, "helper", "again"))
    assert third.id != first.id and len(runs_of(main, "helper")) == before + 2


async def _send_once(served: Served, name: str | None, text: str, **kwargs: Any) -> Task:
    async with connected(served, name, "operator") as client:
        return await send(client, text, **kwargs)


def test_a_non_blocking_send_then_cancel_ends_canceled(main: Served) -> None:
    async def start() -> Task:
        async with connected(main, "sleeper", "operator") as client:
            return await send(client, "take your time", immediately=True)

    task = asyncio.run(start())
    assert task.status.state in (TaskState.TASK_STATE_SUBMITTED, TaskState.TASK_STATE_WORKING), task
    poll(lambda: main.api("GET", f"/runs/{task.id}", role="viewer").json["status"] == "running",
         "the sleeper to run", 30)

    async def cancel() -> Task:
        async with connected(main, "sleeper", "operator") as client:
            return await client.cancel_task(CancelTaskRequest(id=task.id))

    canceled = asyncio.run(cancel())
    assert canceled.id == task.id
    assert main.wait_run(task.id)["status"] == "stopped"

    async def read() -> Task:
        async with connected(main, "sleeper", "viewer") as client:
            return await client.get_task(GetTaskRequest(id=task.id))

    assert asyncio.run(read()).status.state == TaskState.TASK_STATE_CANCELED


def test_the_root_endpoint_runs_the_agent_the_message_names(main: Served) -> None:
    task = asyncio.run(_send_once(main, None, "via the root", skill="helper"))
    assert task.status.state == TaskState.TASK_STATE_COMPLETED
    assert main.api("GET", f"/runs/{task.id}", role="viewer").json["agent"] == "helper"
    with pytest.raises(InvalidParamsError, match=r"metadata\.skill"):
        asyncio.run(_send_once(main, None, "to whom?"))
    with pytest.raises(InvalidParamsError, match="no skill 'hidden'"):
        asyncio.run(_send_once(main, None, "to the hidden one", skill="hidden"))


def test_roles_and_clients_guard_the_calls(main: Served) -> None:
    async def as_viewer() -> None:
        async with connected(main, "helper", "viewer") as client:
            await send(client, "may I?")

    before = len(runs_of(main, "helper"))
    with pytest.raises(A2AClientError, match="403"):
        asyncio.run(as_viewer())
    assert len(runs_of(main, "helper")) == before

    call = {"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": {"id": "x"}}
    assert main.request("POST", "/agents/v1/a2a/helper", body=call).status == 401
    foreign = main.request("POST", "/agents/v1/a2a/theirs", role="operator", body=call)
    unknown = main.request("POST", "/agents/v1/a2a/nobody", role="operator", body=call)
    assert foreign.status == unknown.status == 404

    # Another client's task, through its own exposed agent: not found, as an unknown id is.
    theirs = main.request("POST", "/agents/v1/a2a/theirs", token=main.tokens["other"], body={
        "jsonrpc": "2.0", "id": 2, "method": "SendMessage", "params": {"message": {
            "messageId": "m-theirs", "role": "ROLE_USER", "parts": [{"text": "hi"}]}}})
    assert theirs.status == 200 and theirs.json["result"]["task"]["status"]["state"] == "TASK_STATE_COMPLETED"
    their_id = theirs.json["result"]["task"]["id"]

    async def get(task_id: str) -> Task:
        async with connected(main, "helper", "viewer") as client:
            return await client.get_task(GetTaskRequest(id=task_id))

    for task_id in (their_id, "0" * 32):
        with pytest.raises(TaskNotFoundError):
            asyncio.run(get(task_id))


def test_malformed_calls_get_json_rpc_errors_never_a_500(main: Served) -> None:
    def call(data: bytes) -> dict[str, Any]:
        reply = main.request("POST", "/agents/v1/a2a/helper", role="operator", data=data,
                             headers={"Content-Type": "application/json"})
        assert reply.status == 200, reply.body
        answer: dict[str, Any] = reply.json
        assert answer["jsonrpc"] == "2.0" and set(answer) == {"jsonrpc", "id", "error"}, answer
        return answer

    def code(body: Any) -> int:
        return int(call(json.dumps(body).encode())["error"]["code"])

    assert call(b"{not json")["error"]["code"] == -32700
    assert call(b"")["error"]["code"] == -32700
    assert code([{"jsonrpc": "2.0", "id": 1, "method": "GetTask"}]) == -32600  # a batch
    assert code("GetTask") == -32600
    assert code({"jsonrpc": "1.0", "id": 1, "method": "GetTask"}) == -32600
    assert code({"jsonrpc": "2.0", "id": 1}) == -32600
    assert code({"jsonrpc": "2.0", "id": 1, "method": "Teleport"}) == -32601
    assert code({"jsonrpc": "2.0", "id": 1, "method": "SendStreamingMessage"}) == -32004
    assert code({"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": []}) == -32602
    assert code({"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {"message": {"parts": 5}}}) == -32602
    assert code({"jsonrpc": "2.0", "id": 1, "method": "SendMessage",
                 "params": {"message": {"messageId": "m-empty", "parts": []}}}) == -32602
    assert code({"jsonrpc": "2.0", "id": 1, "method": "GetTask", "params": {"id": "nope"}}) == -32001
    nan = (b'{"jsonrpc": "2.0", "id": 1, "method": "SendMessage", "params": {"message": {"messageId": "m-nan", '
           b'"role": "ROLE_USER", "parts": [{"data": {"n": NaN}}]}}}')
    assert call(nan)["error"]["code"] == -32602  # NaN is no JSON a run could be given
    answer = call(json.dumps({"jsonrpc": "2.0", "id": "abc", "method": "Teleport"}).encode())
    assert answer["id"] == "abc"
    assert "Traceback" not in main.log() and "internal error" not in main.log()


def test_each_call_is_an_audit_row(main: Served) -> None:
    task = asyncio.run(_send_once(main, "helper", "for the record"))

    [found] = wait_ledger(main.home, "SELECT action, target, outcome, actor FROM audit WHERE action = "
                          "'a2a.SendMessage' AND outcome = ?", [f"started run {task.id}"], until=bool,
                          what="the SendMessage in the audit table")
    row = tuple(found.values())
    assert row == ("a2a.SendMessage", "helper", f"started run {task.id}", "operator-default")
