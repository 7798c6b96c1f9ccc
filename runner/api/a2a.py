"""The A2A protocol v1.0, as a2a-sdk 1.x speaks it: Agent Cards and a JSON-RPC endpoint per exposed agent.

The sdk's server parts are Starlette (ASGI) apps; our API is Falcon under waitress (WSGI). So the sdk
gives the types and the wire format, and these resources do the rest: the request is parsed into the
sdk's protobuf types (``ParseDict``) the way its ``JsonRpcDispatcher`` does, answers are its types
turned to JSON (``MessageToDict``), and errors are built by its ``build_error_response``, with HTTP 200
as its server sends them. What a method does is ours: SendMessage submits a run through the runtime,
GetTask and CancelTask read and stop it (``a2a_tasks`` maps runs to tasks).

Auth is the API's: a token picks the client (no token is 401 before any of this runs), GetTask needs a
viewer, SendMessage and CancelTask an operator (403). An agent that is not exposed, unknown or another
client's is the same 404, and so is its card; a task of another client or agent is TaskNotFound. Each
call is an ``audit`` row of its own (``a2a.METHOD``, the agent, the outcome), beside the request's.
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import falcon
from a2a.server.jsonrpc_models import JSONParseError as ParseErrorObject
from a2a.server.request_handlers.response_helpers import build_error_response
from a2a.types.a2a_pb2 import CancelTaskRequest, GetTaskRequest, SendMessageRequest, SendMessageResponse
from a2a.utils.constants import VERSION_HEADER
from a2a.utils.errors import (
    A2AError,
    ContentTypeNotSupportedError,
    InvalidParamsError,
    InvalidRequestError,
    JSONParseError,
    MethodNotFoundError,
    TaskNotCancelableError,
    TaskNotFoundError,
    UnsupportedOperationError,
    VersionNotSupportedError,
)
from google.protobuf.json_format import MessageToDict, ParseDict
from google.protobuf.message import Message as Proto

from runner import tokens
from runner.api import a2a_tasks
from runner.api.a2a_tasks import Sent
from runner.api.app import MAX_BODY, Api, Resource, _bounded
from runner.api.errors import BadRequest, Forbidden, NotFound
from runner.ledger.runs import TERMINAL, get_run
from runner.specs.models import AgentSpec
from runner.state import connect
from runner.supervise.runtime import Runtime
from runner.times import utcnow

# What each method needs, and its request type; the other methods of A2A v1.0 are named so that a client
# asking for one hears "not supported here", not "no such method".
METHODS: dict[str, tuple[tokens.Role, type[Proto]]] = {
    "SendMessage": ("operator", SendMessageRequest),
    "GetTask": ("viewer", GetTaskRequest),
    "CancelTask": ("operator", CancelTaskRequest),
}
UNSUPPORTED = {
    "SendStreamingMessage": "streaming is not offered (the card says capabilities.streaming false): "
                            "SendMessage, then GetTask",
    "SubscribeToTask": "streaming is not offered: poll GetTask",
    "ListTasks": "tasks are not listed over A2A: GET /agents/v1/runs lists runs",
    "CreateTaskPushNotificationConfig": "push notifications are not offered: poll GetTask",
    "GetTaskPushNotificationConfig": "push notifications are not offered",
    "ListTaskPushNotificationConfigs": "push notifications are not offered",
    "DeleteTaskPushNotificationConfig": "push notifications are not offered",
    "GetExtendedAgentCard": "there is no extended card: the card itself already needs a token",
}
# A blocking SendMessage holds one of the API's 24 threads while its run goes on: at most this long, and at
# most this many at once; past either the task is answered as it stands and the caller polls GetTask.
BLOCKING_WAIT = 120.0  # seconds
MAX_BLOCKING = 6
CANCEL_WAIT = 15.0  # seconds CancelTask waits for the stopped run to end (a stop is SIGTERM, then SIGKILL)
POLL = 0.2  # seconds between two reads of a run while waiting for it
# SendMessage's look-up, submit and record are one step, so two sends of one message id never make two
# runs: the API is one process, and the step is short (submitting writes a queued row).
_SENDING = threading.Lock()


def default_client(api: Api) -> str:
    """The client the root card is about: the one named ``default``, or else the first the daemon serves."""
    return "default" if "default" in api.runtimes else next(iter(api.runtimes))


def ensure_tables(api: Api) -> None:
    """Make ``a2a_messages`` in each client's state database: this module is imported after the daemon's
    first connections, which made the schema as it was then (runner.state.register)."""
    for rt in api.runtimes.values():
        connect(rt.settings.state_path).close()


class Card(Resource):
    """GET /agents/v1/a2a/{name}/.well-known/agent-card.json: the card of one exposed agent."""

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        rt = self.client(req, "viewer")
        spec = _exposed(rt, name)
        resp.media = a2a_tasks.agent_card(req.prefix, name, spec)


class RootCard(Resource):
    """GET /.well-known/agent-card.json: the default client's exposed agents as the skills of one card."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        rt = self.client(req, "viewer")
        _root_client(self.api, rt)
        agents = a2a_tasks.exposed(rt.conn(), rt.settings.client_id)
        resp.media = a2a_tasks.root_card(req.prefix, rt.settings.client_id, agents)


class Endpoint(Resource):
    """POST /agents/v1/a2a/{name} (one agent's), and POST /agents/v1/a2a (the root card's: the message names
    its agent): one JSON-RPC 2.0 call each."""

    def on_post(self, req: falcon.Request, resp: falcon.Response, name: str | None = None) -> None:
        principal = self.api.require(req, "viewer")  # who may call at all; each method then asks its own role
        rt = self.api.runtime(req)
        if name is not None:
            agents = {name: _exposed(rt, name)}
        else:
            _root_client(self.api, rt)
            agents = a2a_tasks.exposed(rt.conn(), rt.settings.client_id)
        call = Call(self.api, req, rt, principal, agents, named=name)
        resp.content_type = falcon.MEDIA_JSON
        resp.text = json.dumps(call.answer())


class Call:
    """One JSON-RPC call: parse, check the role, run the method, answer or say the JSON-RPC error."""

    def __init__(self, api: Api, req: falcon.Request, rt: Runtime, principal: tokens.Principal,
                 agents: dict[str, AgentSpec], named: str | None) -> None:
        self.api, self.req, self.rt, self.principal = api, req, rt, principal
        self.agents, self.named = agents, named
        self.client_id = rt.settings.client_id
        self.method, self.target = "unknown", named or "a2a"

    def answer(self) -> dict[str, Any]:
        request_id: str | int | None = None
        try:
            body = self._body()
            raw_id = body.get("id")
            request_id = raw_id if isinstance(raw_id, str | int) and not isinstance(raw_id, bool) else None
            handler, request = self._request(body)
            result, outcome = handler(request)
        except A2AError as exc:
            self._audit(f"error {type(exc).__name__}: {exc.message}"[:300])
            if isinstance(exc, JSONParseError):  # the sdk builds this one from its JSON-RPC model, as here
                return build_error_response(None, ParseErrorObject(message=exc.message))
            return build_error_response(request_id, exc)
        self._audit(outcome)
        return {"jsonrpc": "2.0", "id": request_id, "result": result}

    def _body(self) -> dict[str, Any]:
        raw = self.req.bounded_stream.read(MAX_BODY + 1)
        if len(raw) > MAX_BODY:
            raise InvalidRequestError(f"the body is over {MAX_BODY} bytes")
        try:
            body = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise JSONParseError(f"the body is not valid JSON: {exc}") from None
        except RecursionError:
            raise InvalidRequestError("the JSON is nested too deep") from None
        if isinstance(body, list):
            raise InvalidRequestError("batch requests are not supported: send one call per request")
        if not isinstance(body, dict):
            raise InvalidRequestError("the body must be a JSON-RPC 2.0 request object")
        try:
            _bounded(body, 0)
        except BadRequest as exc:
            raise InvalidRequestError(exc.message) from None
        return body

    def _request(self, body: dict[str, Any]) -> tuple[Callable[[Any], tuple[dict[str, Any], str]], Proto]:
        if body.get("jsonrpc") != "2.0":
            raise InvalidRequestError("'jsonrpc' must be exactly '2.0'")
        if "id" in body and (isinstance(body["id"], bool) or not isinstance(body["id"], str | int | None)):
            raise InvalidRequestError("'id' must be a string, an integer or null")
        method = body.get("method")
        if not isinstance(method, str) or not method:
            raise InvalidRequestError("'method' is required: SendMessage, GetTask or CancelTask")
        self.method = method[:60]
        if method in UNSUPPORTED:
            raise UnsupportedOperationError(f"{method}: {UNSUPPORTED[method]}")
        if method not in METHODS:
            raise MethodNotFoundError(f"no method '{method[:60]}': this endpoint answers "
                                      f"{', '.join(METHODS)}")
        _version(self.req)
        role, kind = METHODS[method]
        if not self.principal.may(role):
            self._audit("forbidden")
            raise Forbidden(f"{method} needs the {role} role; the token '{self.principal.name}' is "
                            f"{self.principal.role}")
        params = body.get("params", {})
        if not isinstance(params, dict):
            raise InvalidParamsError("'params' must be an object")
        try:
            request = ParseDict(params, kind(), ignore_unknown_fields=True)
        except Exception as exc:  # json_format's ParseError, or a TypeError from a value of the wrong kind
            raise InvalidParamsError(f"params: {exc}") from None
        handlers: dict[str, Callable[[Any], tuple[dict[str, Any], str]]] = {
            "SendMessage": self.send_message, "GetTask": self.get_task, "CancelTask": self.cancel_task}
        return handlers[method], request

    # -- the methods --------------------------------------------------------------------------------------

    def send_message(self, request: SendMessageRequest) -> tuple[dict[str, Any], str]:
        message = request.message
        if not request.HasField("message") or not message.message_id:
            raise InvalidParamsError("params.message with a messageId is required")
        if message.task_id:
            raise UnsupportedOperationError("a message here starts a new task (a run); it cannot continue task "
                                            f"'{message.task_id[:64]}': send it without taskId")
        agent = self.named or self._skill(request)
        self.target = agent
        text = _text(message)
        conn = self.rt.conn()
        with _SENDING:
            sent = a2a_tasks.find_message(conn, self.client_id, agent, message.message_id)
            duplicate = sent is not None
            if sent is None:
                run_id = self.rt.submit_run(agent, text, f"a2a:{self.principal.name}", trigger="a2a")
                sent = a2a_tasks.record(conn, self.client_id, message.message_id, agent, run_id,
                                        message.context_id or uuid.uuid4().hex)
        if not request.configuration.return_immediately:
            self._wait(sent.run_id)
        history = (request.configuration.history_length
                   if request.configuration.HasField("history_length") else None)
        task = a2a_tasks.task(self._run(sent), sent, history)
        outcome = f"duplicate of run {sent.run_id}" if duplicate else f"started run {sent.run_id}"
        return MessageToDict(SendMessageResponse(task=task)), outcome

    def get_task(self, request: GetTaskRequest) -> tuple[dict[str, Any], str]:
        sent = self._task(request.id)
        history = request.history_length if request.HasField("history_length") else None
        task = a2a_tasks.task(self._run(sent), sent, history)
        return MessageToDict(task), f"run {sent.run_id}"

    def cancel_task(self, request: CancelTaskRequest) -> tuple[dict[str, Any], str]:
        sent = self._task(request.id)
        run = self._run(sent)
        if run["status"] in TERMINAL or not self.rt.stop_run(sent.run_id, f"a2a:{self.principal.name}"):
            raise TaskNotCancelableError(f"task {sent.run_id} has ended ({run['status']})")
        self._wait(sent.run_id, CANCEL_WAIT)
        return MessageToDict(a2a_tasks.task(self._run(sent), sent)), f"stopped run {sent.run_id}"

    # -- what the methods share ---------------------------------------------------------------------------

    def _skill(self, request: SendMessageRequest) -> str:
        """The agent a message to the root endpoint names, in its own or the request's metadata.skill."""
        for metadata in (request.message.metadata, request.metadata):
            named = metadata.fields.get("skill")
            if named is not None and named.HasField("string_value"):
                if named.string_value in self.agents:
                    return named.string_value
                raise InvalidParamsError(f"no skill '{named.string_value[:64]}' here: the card lists "
                                         f"{', '.join(sorted(self.agents)) or 'none'}")
        raise InvalidParamsError("name the agent: metadata.skill must be one of the card's skill ids ("
                                 f"{', '.join(sorted(self.agents)) or 'none'})")

    def _task(self, task_id: str) -> Sent:
        sent = a2a_tasks.find_task(self.rt.conn(), self.client_id, task_id) if task_id else None
        if sent is None or sent.agent not in self.agents:
            raise TaskNotFoundError(f"no task '{task_id[:64]}'")
        self.target = sent.agent
        return sent

    def _run(self, sent: Sent) -> dict[str, Any]:
        run = get_run(self.rt.conn(), self.rt.settings.ledger_path, self.client_id, sent.run_id)
        if run is None:  # recorded, but the run is gone (a ledger deleted by hand): nothing to show
            raise TaskNotFoundError(f"no task '{sent.run_id}'")
        return run

    def _wait(self, run_id: str, limit: float = BLOCKING_WAIT) -> None:
        """Until the run ends, at most ``limit`` seconds; at once when MAX_BLOCKING calls already wait."""
        if not _WAITING.acquire(blocking=False):
            return
        try:
            deadline = time.monotonic() + limit
            while time.monotonic() < deadline:
                run = get_run(self.rt.conn(), self.rt.settings.ledger_path, self.client_id, run_id)
                if run is None or run["status"] in TERMINAL:
                    return
                time.sleep(POLL)
        finally:
            _WAITING.release()

    def _audit(self, outcome: str) -> None:
        self.api.audit.add(self.client_id, {
            "audit_id": uuid.uuid4().hex, "client_id": self.client_id, "ts": utcnow(), "actor": self.principal.name,
            "action": f"a2a.{self.method}", "target": self.target, "outcome": outcome,
            "detail": {"role": self.principal.role, "endpoint": self.req.path[:300]}})


_WAITING = threading.BoundedSemaphore(MAX_BLOCKING)


def _exposed(rt: Runtime, name: str) -> AgentSpec:
    spec = a2a_tasks.exposed(rt.conn(), rt.settings.client_id, name).get(name)
    if spec is None:  # unknown, not exposed, invalid or another client's: one answer, naming nothing
        raise NotFound(f"no A2A agent named '{name}'")
    return spec


def _root_client(api: Api, rt: Runtime) -> None:
    if rt.settings.client_id != default_client(api):
        raise NotFound("no A2A card here for this client: its agents have cards of their own, at "
                       f"{a2a_tasks.ENDPOINT}/NAME/.well-known/agent-card.json")


def _version(req: falcon.Request) -> None:
    """A2A-Version, when sent, must be 1.x; a call without it is taken as 1.0 (curl sends none)."""
    sent = (req.get_header(VERSION_HEADER) or "").strip()
    if sent and sent.split(".")[0] != "1":
        raise VersionNotSupportedError(f"A2A-Version {sent[:20]} is not served here: only 1.0")


def _text(message: Any) -> str:
    """The run's input: the message's text parts, and its data parts as JSON, in order."""
    pieces: list[str] = []
    for part in message.parts:
        kind = part.WhichOneof("content")
        if kind == "text":
            pieces.append(part.text)
        elif kind == "data":
            try:
                pieces.append(json.dumps(MessageToDict(part.data), allow_nan=False))
            except ValueError:  # NaN or Infinity in a data part: no JSON a run could be given
                raise InvalidParamsError("a data part holds NaN or Infinity, which JSON does not have") from None
        else:
            raise ContentTypeNotSupportedError(f"a {kind or 'empty'} part cannot be a run's input: send text "
                                               "or data parts")
    text = "\n".join(pieces)
    if not text.strip():
        raise InvalidParamsError("the message has no text: a run needs an input")
    return text
