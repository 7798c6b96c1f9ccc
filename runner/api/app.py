"""The Falcon application: middleware (limits, auth, audit, metrics), routes, one error handler.

The API serves one or more clients; each has a ``Runtime`` (``runner.supervise.runtime``: the daemon's
view of that client, its settings, state, source, process table). A request's token picks the client;
nothing of another client is ever visible (404, never 403, for another client's names).
"""

from __future__ import annotations

import json
import re
import sqlite3
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import falcon

from runner import tokens
from runner.api.errors import BadRequest, Forbidden, TooLarge, Unauthorized, handle_any
from runner.ledger.schema import journal
from runner.specs.models import NAME_PATTERN
from runner.state import Transaction
from runner.supervise.metrics import Metrics
from runner.supervise.runtime import Runtime
from runner.times import utcnow

MAX_BODY = 1024 * 1024
MAX_PAGE = 1000  # items in one page of a list
MAX_DEPTH = 32
MAX_STRING = 64 * 1024
OPEN_PATHS = {"/healthz", "/openapi.json", "/metrics", "/agents/v1/hooks/git"}
# Webhooks: open, and their Authorization header (a webhook's own bearer secret) is not an API token.
UNTOKENED = "/agents/v1/hooks/events/"
# The dashboard (runner.api.ui, docs/dashboard.md): its pages take the principal from this cookie, and only
# they do. A browser sends a cookie by itself, with any request any page makes: honoured by the API, it
# would let another site's page act with the user's token (CSRF). So the API reads the Authorization
# header alone, and the dashboard, which checks a CSRF token in every form, the cookie alone.
UI = "/ui"
SESSION_COOKIE = "ao_session"


def is_ui(path: str) -> bool:
    return path == UI or path.startswith(UI + "/")


class Api:
    def __init__(self, runtimes: dict[str, Runtime], metrics: Metrics) -> None:
        self.runtimes, self.metrics = runtimes, metrics
        self.started = time.time()
        self.audit = AuditWriter(runtimes)
        self.cache = PageCache()

    def runtime(self, req: falcon.Request) -> Runtime:
        principal: tokens.Principal = req.context.principal
        return self.runtimes[principal.client_id]

    def require(self, req: falcon.Request, role: tokens.Role) -> tokens.Principal:
        principal: tokens.Principal | None = req.context.get("principal")
        if principal is None:
            raise Unauthorized("send Authorization: Bearer TOKEN (agentctl token create)")
        if not principal.may(role):
            raise Forbidden(f"this needs the {role} role; the token '{principal.name}' is {principal.role}")
        return principal

    def any_conn(self) -> sqlite3.Connection:
        return next(iter(self.runtimes.values())).conn()


class Resource:
    """An API resource: each handler names the role it needs and gets its client's runtime."""

    def __init__(self, api: Api) -> None:
        self.api = api

    def client(self, req: falcon.Request, role: tokens.Role) -> Runtime:
        self.api.require(req, role)
        return self.api.runtime(req)


class Middleware:
    def __init__(self, api: Api) -> None:
        self.api = api

    def process_request(self, req: falcon.Request, resp: falcon.Response) -> None:
        req.context.started = time.perf_counter()
        req.context.principal = None
        if req.content_length and req.content_length > MAX_BODY:
            raise TooLarge(f"the body is over {MAX_BODY} bytes")
        header = req.get_header("Authorization") or ""
        if req.path.startswith(UNTOKENED):
            return
        if is_ui(req.path):
            # No principal is no error here: each page decides (the login page and static files are open;
            # the others send the browser to log in). The Authorization header is not read.
            cookie = next(iter(req.get_cookie_values(SESSION_COOKIE) or []), "")
            req.context.principal = self.lookup(cookie) if cookie else None
            return
        if header:
            scheme, _, token = header.partition(" ")
            principal = self.lookup(token.strip()) if scheme.lower() == "bearer" else None
            if principal is None:
                raise Unauthorized("unknown or malformed bearer token")
            req.context.principal = principal
        elif req.path not in OPEN_PATHS:
            raise Unauthorized("send Authorization: Bearer TOKEN (agentctl token create)")

    def lookup(self, token: str) -> tokens.Principal | None:
        """The token's principal, if the token is known, unexpired and of a client served here."""
        principal = tokens.lookup(self.api.any_conn(), token)
        return principal if principal is not None and principal.client_id in self.api.runtimes else None

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: object,
                         req_succeeded: bool) -> None:
        route = str(req.uri_template) if getattr(req, "uri_template", None) else "unmatched"
        status = int(str(resp.status).split()[0]) if not isinstance(resp.status, int) else resp.status
        started = req.context.get("started")
        elapsed = time.perf_counter() - started if isinstance(started, float) else 0.0
        self.api.metrics.request(req.method, route, status, elapsed)
        principal: tokens.Principal | None = req.context.get("principal")
        client = principal.client_id if principal else req.context.get("client") or next(iter(self.api.runtimes))
        if req.method != "GET" or status >= 400:
            self.api.cache.clear()  # a write (or a failed one) may have changed what pages show
        if req.path.startswith(UNTOKENED) and status in (401, 404, 413):
            return  # anyone's refused webhook: a counter (agent_orch_webhook_refused_total), never a ledger row
        if req.path.startswith(f"{UI}/static/"):
            return  # the dashboard's scripts and styles: fetched with every page, and they change nothing
        self.api.audit.add(client, {
            "audit_id": uuid.uuid4().hex, "client_id": client, "ts": utcnow(),
            "actor": principal.name if principal else None, "action": f"{req.method} {route}",
            "target": req.path[:300], "outcome": str(status),
            "detail": {"role": principal.role if principal else None, "ms": round(elapsed * 1000, 2)}})


class AuditWriter:
    """Audit rows are queued and written to the journal in batches, every 0.2 s, by one thread.

    One SQLite write per request would serialize the API's threads on the database lock. The cost of
    batching: a kill -9 can lose the audit rows of the last 0.2 s of requests (never a run's record), or,
    while the disk is full and rows wait here, of the whole episode.
    """

    def __init__(self, runtimes: dict[str, Runtime]) -> None:
        self.runtimes = runtimes
        self.pending: list[tuple[str, dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._loop, name="audit", daemon=True)
        self.thread.start()

    def add(self, client: str, row: dict[str, Any]) -> None:
        with self.lock:
            self.pending.append((client, row))

    def flush(self) -> None:
        with self.lock:
            batch, self.pending = self.pending, []
        by_client: dict[str, list[dict[str, Any]]] = {}
        for client, row in batch:
            by_client.setdefault(client, []).append(row)
        kept: list[tuple[str, dict[str, Any]]] = []
        for client, rows in by_client.items():
            runtime = self.runtimes.get(client)
            if runtime is None:
                continue
            try:
                with Transaction(runtime.conn()) as tx:
                    for row in rows:
                        journal(tx, "audit", row)
            except sqlite3.Error:  # a full disk, say: the rows go back in front of the queue for the next round
                kept += [(client, row) for row in rows]
        with self.lock:
            self.pending[:0] = kept

    def _loop(self) -> None:
        while True:
            time.sleep(0.2)
            self.flush()  # rows it cannot write wait for the next round: add() never fails a request


class PageCache:
    """Rendered GET pages that are costly to build (the agent list), kept for a second."""

    TTL = 1.0

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pages: dict[tuple[Any, ...], tuple[float, Any]] = {}

    def get(self, key: tuple[Any, ...], build: Callable[[], Any]) -> Any:
        now = time.monotonic()
        with self.lock:
            hit = self.pages.get(key)
            if hit and now - hit[0] < self.TTL:
                return hit[1]
        value = build()
        with self.lock:
            if len(self.pages) > 1000:
                self.pages.clear()
            self.pages[key] = (now, value)
        return value

    def clear(self) -> None:
        with self.lock:
            self.pages.clear()


def read_json(req: falcon.Request) -> dict[str, Any]:
    """The request body as a JSON object, bounded in size, depth and string length."""
    raw = req.bounded_stream.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise TooLarge(f"the body is over {MAX_BODY} bytes")
    if not raw.strip():
        raise BadRequest("the body must be a JSON object", code="bad_json")
    try:
        data = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise BadRequest(f"the body is not valid JSON: {exc}", code="bad_json") from None
    except RecursionError:  # nested thousands deep: the parser gives up before _bounded can say so
        raise BadRequest(f"the JSON is nested deeper than {MAX_DEPTH}", code="too_deep") from None
    if not isinstance(data, dict):
        raise BadRequest("the body must be a JSON object", code="bad_json")
    _bounded(data, 0)
    return data


def _bounded(value: Any, depth: int) -> None:
    if depth > MAX_DEPTH:
        raise BadRequest(f"the JSON is nested deeper than {MAX_DEPTH}", code="too_deep")
    if isinstance(value, str):
        if len(value) > MAX_STRING:
            raise BadRequest(f"a string is longer than {MAX_STRING} characters", code="too_long")
        # JSON's \ud800 escapes decode to lone surrogates, which no UTF-8 writer downstream (the ledger,
        # the log, our own responses) can encode: refuse them here rather than fail later.
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest("a string holds a lone surrogate (\\ud800-\\udfff): not valid Unicode",
                             code="bad_json") from None
    if isinstance(value, dict):
        for k, v in value.items():
            _bounded(k, depth + 1)
            _bounded(v, depth + 1)
    elif isinstance(value, list):
        for v in value:
            _bounded(v, depth + 1)


def name_cursor(req: falcon.Request, what: str) -> str:
    """The ``cursor`` of a list paged by name (agents, workflows): a name, as next_cursor gives it, or ''."""
    after: str = req.get_param("cursor") or ""
    if after and not re.fullmatch(NAME_PATTERN, after):
        raise BadRequest(f"'cursor' must be {what} name, as next_cursor gives it", details=["cursor"],
                         code="bad_param")
    return after


def int_param(req: falcon.Request, name: str, default: int, low: int, high: int) -> int:
    raw = req.get_param(name)
    if raw is None:
        return default
    try:
        value = int(raw)
    except ValueError:
        raise BadRequest(f"'{name}' must be a whole number", details=[name], code="bad_param") from None
    if not low <= value <= high:
        raise BadRequest(f"'{name}' must be between {low} and {high}", details=[name], code="bad_param")
    return value


def create_app(runtimes: dict[str, Runtime], metrics: Metrics | None = None) -> falcon.App[Any, Any]:
    from runner.api import a2a, agents, deliveries, runs, system, ui, workflows

    api = Api(runtimes, metrics or Metrics(runtimes))
    middleware: list[Any] = [Middleware(api), ui.Headers()]
    app = falcon.App(middleware=middleware)
    app.req_options.strip_url_path_trailing_slash = True
    # Falcon registers its own handler for its HTTPError, more specific than Exception: replace it too,
    # so a 405 from routing has the same JSON shape as every other error (the dashboard's pages: as HTML).
    handler = ui.pages_or(handle_any)
    app.add_error_handler(Exception, handler)
    app.add_error_handler(falcon.HTTPError, handler)
    base = "/agents/v1"
    app.add_route(f"{base}/agents", agents.Collection(api))
    app.add_route(f"{base}/agents/{{name}}", agents.Item(api))
    app.add_route(f"{base}/agents/{{name}}/start", agents.Operation(api, "start"))
    app.add_route(f"{base}/agents/{{name}}/stop", agents.Operation(api, "stop"))
    app.add_route(f"{base}/agents/{{name}}/runs", agents.Operation(api, "run"))
    app.add_route(f"{base}/agents/{{name}}/logs", runs.Logs(api))
    app.add_route(f"{base}/runs", runs.Collection(api))
    app.add_route(f"{base}/runs/{{run_id}}", runs.Item(api))
    app.add_route(f"{base}/runs/{{run_id}}/events", runs.Events(api))
    app.add_route(f"{base}/runs/{{run_id}}/transcript", runs.Transcript(api))
    app.add_route(f"{base}/workflows", workflows.Collection(api))
    app.add_route(f"{base}/workflows/{{name}}", workflows.Item(api))
    app.add_route(f"{base}/workflows/{{name}}/runs", workflows.Start(api))
    app.add_route(f"{base}/workflow-runs", workflows.Runs(api))
    app.add_route(f"{base}/workflow-runs/{{workflow_run_id}}", workflows.Run(api))
    app.add_route(f"{base}/workflow-runs/{{workflow_run_id}}/cancel", workflows.Cancel(api))
    app.add_route(f"{base}/workflow-runs/{{workflow_run_id}}/resume", workflows.Resume(api))
    app.add_route(f"{base}/workflow-runs/{{workflow_run_id}}/steps/{{step}}/approve", workflows.Approve(api))
    app.add_route(f"{base}/tools", system.Tools(api))
    app.add_route(f"{base}/metrics", system.MetricsResource(api))
    app.add_route(f"{base}/tokens", system.TokenCollection(api))
    app.add_route(f"{base}/tokens/{{token_id}}", system.TokenItem(api))
    app.add_route(f"{base}/hooks/git", system.GitHook(api))
    app.add_route(f"{base}/hooks/events/{{client}}/{{name}}", deliveries.EventHook(api))
    app.add_route(f"{base}/deliveries", deliveries.Collection(api))
    app.add_route(f"{base}/deliveries/{{delivery_id}}/replay", deliveries.Replay(api))
    a2a.ensure_tables(api)
    app.add_route(f"{base}/a2a", a2a.Endpoint(api))
    app.add_route(f"{base}/a2a/{{name}}", a2a.Endpoint(api))
    app.add_route(f"{base}/a2a/{{name}}/.well-known/agent-card.json", a2a.Card(api))
    app.add_route("/.well-known/agent-card.json", a2a.RootCard(api))
    app.add_route("/metrics", system.MetricsResource(api))
    app.add_route("/healthz", system.Health(api))
    app.add_route("/openapi.json", system.OpenApi(api))
    ui.install(app, api)
    app.add_sink(system.not_found, r"/")
    return app
