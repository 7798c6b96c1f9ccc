"""Tools, metrics, tokens, the push webhook, health, the OpenAPI document, and the 404 for everything else."""

from __future__ import annotations

from typing import Any

import falcon
from prometheus_client import CONTENT_TYPE_LATEST

from runner import tokens
from runner.api.app import MAX_BODY, Resource
from runner.api.errors import NotFound, TooLarge, Unauthorized, without_credentials
from runner.api.openapi import document
from runner.errors import OrchestratorError
from runner.specs.catalog import BUILTIN_TOOLS
from runner.specs.validating import custom_tools_of


class Tools(Resource):
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        rt = self.client(req, "viewer")
        tools: list[dict[str, Any]] = [{"name": t.name, "kind": "builtin", "permissions": sorted(t.allowed),
                                        "needs": sorted(t.needs), "summary": t.summary, "error": None}
                                       for t in BUILTIN_TOOLS.values()]
        try:
            files = rt.source.files(rt.source.revision(fetch=False))
            custom = list(custom_tools_of(files).values())
        except OrchestratorError:
            custom = []
        tools += [{"name": t.name, "kind": "custom", "permissions": sorted(t.allowed), "needs": sorted(t.needs),
                   "summary": f"tools/{t.name}.py", "error": t.error} for t in custom]
        resp.media = {"tools": tools}


class MetricsResource(Resource):
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """The root one is open, for scrapers, and names no client, agent or tool: totals only. With a
        token (the API's own always needs one), the token's client's series, labels and all."""
        if req.path == "/metrics" and req.context.get("principal") is None:
            shown = None
        else:
            shown = self.api.require(req, "viewer").client_id
        resp.content_type = CONTENT_TYPE_LATEST
        resp.data = self.api.metrics.exposition(shown)


class TokenCollection(Resource):
    """GET /agents/v1/tokens: the client's tokens (admin), never the tokens themselves or their hashes."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        principal = self.api.require(req, "admin")
        resp.media = {"tokens": tokens.listed(self.api.runtime(req).conn(), principal.client_id)}


class TokenItem(Resource):
    """DELETE /agents/v1/tokens/{token_id}: revoke one of the client's tokens (admin). Another client's
    token is 404, as one that does not exist. The token is refused from its next request on."""

    def on_delete(self, req: falcon.Request, resp: falcon.Response, token_id: str) -> None:
        principal = self.api.require(req, "admin")
        if not tokens.revoke(self.api.runtime(req).conn(), principal.client_id, token_id):
            raise NotFound(f"no token with id '{token_id}'")
        resp.media = {"id": token_id, "revoked": True}


UNSIGNED = "the webhook signature is missing or does not match AGENT_ORCH_WEBHOOK_SECRET"


class GitHook(Resource):
    """POST /agents/v1/hooks/git: a push webhook (GitHub, Gitea, GitLab) asking for a reconcile.

    With AGENT_ORCH_WEBHOOK_SECRET set, the request must carry the provider's signature of the body
    (X-Hub-Signature-256 or X-Gitea-Signature: HMAC-SHA256; X-Gitlab-Token: the secret itself).
    Without a secret, an operator's bearer token is required instead. ``?client_id=`` picks the client.
    """

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        body = req.bounded_stream.read(MAX_BODY + 1)
        if len(body) > MAX_BODY:
            raise TooLarge(f"the body is over {MAX_BODY} bytes")
        principal = req.context.get("principal")
        client = principal.client_id if principal else (req.get_param("client_id") or "default")
        rt = self.api.runtimes.get(client)
        if rt is None:  # (no token here) answer as a served client would, so client ids cannot be probed
            if any(served.settings.webhook_secret.get_secret_value() for served in self.api.runtimes.values()):
                raise Unauthorized(UNSIGNED)
            self.api.require(req, "operator")
            raise Unauthorized(UNSIGNED)  # not reached: without a token, require() refuses
        secret = rt.settings.webhook_secret.get_secret_value()
        if secret:
            if not tokens.signed(body, secret, req.get_header):
                raise Unauthorized(UNSIGNED)
            who = "webhook"
        else:
            who = self.api.require(req, "operator").name
        rt.request_reconcile(f"webhook:{who}")
        resp.status = 202
        resp.media = {"reconcile": "requested", "client_id": client}


class Health(Resource):
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        """Open: only whether the daemon is well. With a token: the details of that token's client."""
        clients = {client: {k: without_credentials(v) if isinstance(v, str) else v for k, v in rt.health().items()}
                   for client, rt in self.api.runtimes.items()}
        ok = all(not c.get("error") for c in clients.values())
        body: dict[str, Any] = {"status": "ok" if ok else "degraded"}
        principal = req.context.get("principal")
        if principal is not None:
            body["client"] = {"client_id": principal.client_id, **clients[principal.client_id]}
        resp.media = body


class OpenApi(Resource):
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        resp.media = document()


def not_found(req: falcon.Request, resp: falcon.Response, **_kwargs: Any) -> None:
    raise NotFound(f"no such path: {req.path}")
