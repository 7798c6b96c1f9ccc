"""Webhooks and the deliveries ledger (docs/events.md).

``POST /agents/v1/hooks/events/{client}/{name}`` is open: no API token, its own secret guards it (the
middleware does not read its Authorization header, which may carry a webhook's bearer secret). An unknown
client answers as an unknown hook does, so neither can be probed. ``GET /deliveries`` lists the token's
client's deliveries; ``POST /deliveries/{id}/replay`` (operator) starts a stored event again.
"""

from __future__ import annotations

import re

import falcon

from runner.api.app import MAX_BODY, MAX_PAGE, Resource, int_param
from runner.api.errors import BadRequest, NotFound, TooLarge
from runner.api.openapi import check_query
from runner.errors import NotFoundError
from runner.ledger.deliveries import get_delivery, list_deliveries

DELIVERY_ID = re.compile(r"dlv_[0-9a-f]{1,40}")
DECISIONS = ("accepted", "started", "duplicate", "rejected")
HOOK_PREFIX = "/agents/v1/hooks/events/"
KEPT_HEADERS = 64  # headers a delivery keeps at most (the rest are the sender's noise)


class EventHook(Resource):
    def on_post(self, req: falcon.Request, resp: falcon.Response, client: str, name: str) -> None:
        if req.content_length is not None and req.content_length > MAX_BODY:
            raise TooLarge(f"the body is over {MAX_BODY} bytes")
        body = req.bounded_stream.read(MAX_BODY + 1)
        if len(body) > MAX_BODY:
            raise TooLarge(f"the body is over {MAX_BODY} bytes")
        rt = self.api.runtimes.get(client)
        if rt is None:
            raise NotFound(f"no webhook '{name}' for client '{client}'")
        req.context.client = client  # its audit row is this client's
        headers = dict(list(req.headers.items())[:KEPT_HEADERS])
        received = rt.webhook(name, req.get_header, headers, body)
        resp.status = 200 if received.duplicate else 202
        resp.media = received.as_json()


class Collection(Resource):
    """GET /deliveries: newest first; ?trigger= (a trigger, or the agent or workflow it starts), ?decision=."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        rt = self.client(req, "viewer")
        check_query(req, "deliveries")
        limit = int_param(req, "limit", 100, 1, MAX_PAGE)
        decision = req.get_param("decision")
        if decision is not None and decision not in DECISIONS:
            raise BadRequest(f"'decision' must be one of {', '.join(DECISIONS)}", details=["decision"],
                             code="bad_param")
        before = None
        cursor = req.get_param("cursor")
        if cursor:
            last = get_delivery(rt.conn(), rt.settings.client_id, cursor) if DELIVERY_ID.fullmatch(cursor) else None
            if last is None:
                raise BadRequest("'cursor' must be a delivery id, as next_cursor gives it", details=["cursor"],
                                 code="bad_param")
            before = (last.received_at, last.delivery_id)
        found = list_deliveries(rt.conn(), rt.settings.client_id, trigger=req.get_param("trigger"),
                                decision=decision, before=before, limit=limit + 1)
        page = found[:limit]
        resp.media = {"deliveries": [d.as_json() for d in page],
                      "next_cursor": page[-1].delivery_id if len(found) > limit else None}


class Replay(Resource):
    """POST /deliveries/{id}/replay (operator): the stored event as a new delivery, started now."""

    def on_post(self, req: falcon.Request, resp: falcon.Response, delivery_id: str) -> None:
        principal = self.api.require(req, "operator")
        rt = self.api.runtime(req)
        if not DELIVERY_ID.fullmatch(delivery_id):
            raise NotFoundError(f"no delivery {delivery_id[:80]} for client '{rt.settings.client_id}'")
        resp.status = 202
        resp.media = rt.replay_delivery(delivery_id, principal.name)
