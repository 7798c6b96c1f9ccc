"""Runs, their events, and agent logs.

Runs are listed from ``run_progress`` in the state database (indexed, cheap: the daemon's own record
of each run's row); events come from the DuckDB ledger, read under a shared lock that the ledger
flusher respects.
"""

from __future__ import annotations

import json
import os
import re
from datetime import UTC, datetime, timedelta
from typing import Any

import falcon

from runner.agent.recording import TERMINAL, agent_log_path
from runner.api.app import MAX_PAGE, Resource, int_param
from runner.api.errors import BadRequest, NotFound
from runner.api.openapi import check_query
from runner.ledger.ingesting import flush
from runner.ledger.reading import query
from runner.reconcile.applied import load_applied
from runner.specs.checking import did_you_mean
from runner.specs.models import NAME_PATTERN

STATUSES = ("queued", "running", *TERMINAL)
MAX_LOG_PAGE = 1024 * 1024
RUN_ID = re.compile(r"[0-9a-f]{1,64}")  # run ids are hex (recording.new_run_id)
AGO = re.compile(r"(\d{1,6})([smhdw])")
UNIT = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}


def run_json(row: Any) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(row["row"]) if row["row"] else {}
    data.setdefault("run_id", row["run_id"])
    data.setdefault("agent", row["agent"])
    data["status"] = row["status"]
    data["input_tokens"] = max(int(data.get("input_tokens") or 0), int(row["input_tokens"]))
    data["output_tokens"] = max(int(data.get("output_tokens") or 0), int(row["output_tokens"]))
    return data


class Collection(Resource):
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        rt = self.client(req, "viewer")
        check_query(req, "runs")
        limit = int_param(req, "limit", 50, 1, MAX_PAGE)
        where, params = ["client_id = ?"], [rt.settings.client_id]
        agent, status, since, cursor = (req.get_param(k) for k in ("agent", "status", "since", "cursor"))
        if agent:
            if not re.fullmatch(NAME_PATTERN, agent):
                raise BadRequest("'agent' must be an agent name (lowercase letters, digits, '-' and '_')",
                                 details=["agent"], code="bad_param")
            where.append("agent = ?")
            params.append(agent)
        if status:
            if status not in STATUSES:
                raise BadRequest(f"'status' must be one of {', '.join(STATUSES)}{did_you_mean(status, STATUSES)}",
                                 details=["status"], code="bad_param")
            where.append("status = ?")
            params.append(status)
        if since:
            since = since_param(since)
            # run_progress.started_at keeps the value of the run's first write (None while queued: see
            # recording.write_run), so the start time is read from the row as the run last wrote it.
            where.append("coalesce(json_extract(row, '$.started_at'), json_extract(row, '$.queued_at'), "
                         "started_at, updated_at) >= ?")
            params.append(since)
        if cursor:
            if not RUN_ID.fullmatch(cursor):
                raise BadRequest("'cursor' must be a run id, as next_cursor gives it", details=["cursor"],
                                 code="bad_param")
            where.append("run_id < ?")
            params.append(cursor)

        def build() -> bytes:
            rows = rt.conn().execute(f"SELECT * FROM run_progress WHERE {' AND '.join(where)} "
                                     "ORDER BY run_id DESC LIMIT ?", [*params, limit + 1]).fetchall()
            page = rows[:limit]
            cursor_out = json.dumps(page[-1]["run_id"] if len(rows) > limit else None)
            # A finished run's stored row is its final JSON already: it goes out as it is, unparsed.
            items = ",".join(r["row"] if r["row"] and r["status"] in TERMINAL else json.dumps(run_json(r))
                             for r in page)
            return f'{{"runs": [{items}], "next_cursor": {cursor_out}}}'.encode()

        resp.content_type = falcon.MEDIA_JSON
        # Keyed by each filter's name too: ?agent=failed and ?status=failed are different pages.
        key = ("runs", rt.settings.client_id, agent, status, since, cursor, limit)
        resp.data = self.api.cache.get(key, build)


def since_param(raw: str, now: datetime | None = None) -> str:
    """``since`` as the ledger writes times (UTC, to the millisecond, compared as text): an ISO 8601 date
    or time (no offset means UTC), or an age such as ``30m``, ``12h``, ``7d``."""
    ago = AGO.fullmatch(raw)
    try:
        if ago:
            moment = (now or datetime.now(UTC)) - timedelta(**{UNIT[ago.group(2)]: int(ago.group(1))})
        else:
            moment = datetime.fromisoformat(raw)
            moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    except (ValueError, OverflowError):
        raise BadRequest(f"'since' must be an ISO 8601 date or time (2025-01-31, 2025-01-31T08:00:00Z) or an "
                         f"age (30m, 12h, 7d), not {raw[:40]!r}", details=["since"], code="bad_param") from None
    return moment.replace(tzinfo=None).isoformat(timespec="milliseconds")


class Item(Resource):
    def on_get(self, req: falcon.Request, resp: falcon.Response, run_id: str) -> None:
        rt = self.client(req, "viewer")
        check_query(req, "run")
        row = rt.conn().execute("SELECT * FROM run_progress WHERE client_id = ? AND run_id = ?",
                                (rt.settings.client_id, run_id)).fetchone()
        if row is None:
            raise NotFound(f"no run '{run_id}'")
        resp.media = run_json(row)


class Events(Resource):
    def on_get(self, req: falcon.Request, resp: falcon.Response, run_id: str) -> None:
        rt = self.client(req, "viewer")
        check_query(req, "events")
        known = rt.conn().execute("SELECT 1 FROM run_progress WHERE client_id = ? AND run_id = ?",
                                  (rt.settings.client_id, run_id)).fetchone()
        if known is None:
            raise NotFound(f"no run '{run_id}'")
        limit = int_param(req, "limit", 500, 1, 5000)
        after = int_param(req, "after", 0, 0, 10**9)
        # wait=True: when the daemon's flusher holds the lock, its batch may not hold the run's last events;
        # wait for it, then move the rest (of every client). The rows it moves are the metrics' only feed.
        flush(rt.conn(), rt.settings.ledger_path, wait=True, observe=self.api.metrics.observe_row)
        cols, rows = query(rt.settings.ledger_path,
                           "SELECT seq, ts, kind, name, decision, detail FROM run_events WHERE run_id = ? AND seq > ? "
                           "ORDER BY seq LIMIT ?", [run_id, after, limit])
        events = []
        for r in rows:
            event = dict(zip(cols, r, strict=True))
            event["ts"] = str(event["ts"])
            event["detail"] = json.loads(event["detail"]) if event["detail"] else {}
            events.append(event)
        resp.media = {"run_id": run_id, "events": events}


class Logs(Resource):
    """A page of the agent's log: ``offset`` and ``limit`` in bytes, optionally one run's lines."""

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        rt = self.client(req, "viewer")
        check_query(req, "logs")
        if name not in load_applied(rt.conn(), rt.settings.client_id, name):
            raise NotFound(f"no agent named '{name}'")
        offset = int_param(req, "offset", 0, 0, 2**62)
        limit = int_param(req, "limit", 64 * 1024, 1, MAX_LOG_PAGE)
        run = req.get_param("run")
        if run and not RUN_ID.fullmatch(run):
            raise BadRequest("'run' must be a run id", details=["run"], code="bad_param")
        path = agent_log_path(rt.settings.logs_dir, rt.settings.client_id, name)
        size = os.path.getsize(path) if path.exists() else 0
        data = b""
        if path.exists() and offset < size:
            with open(path, "rb") as handle:
                handle.seek(offset)
                data = handle.read(limit)
            if offset + len(data) < size and b"\n" in data:
                data = data[: data.rindex(b"\n") + 1]  # whole lines only
        lines = data.decode("utf-8", "replace").splitlines()
        if run:
            lines = [line for line in lines if f" run={run} " in line]
        resp.media = {"name": name, "offset": offset, "next_offset": offset + len(data), "size": size,
                      "eof": offset + len(data) >= size, "lines": lines}
