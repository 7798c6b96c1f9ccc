"""Runs, their events, transcripts, and agent logs.

Runs, events and transcripts are read through ``runner.ledger.runs``, which knows both stores (the
live one in the state database, and the DuckDB archive); a GET never writes, and never waits for a
flush. ``GET /runs/{id}/events?follow=1`` streams a run's events as server-sent events until its final
status (see ``Follow``).
"""

from __future__ import annotations

import json
import os
import re
import threading
import time
from collections.abc import Callable, Generator, Iterator
from datetime import UTC, datetime, timedelta
from typing import Any

import falcon

from runner.agent.recording import agent_log_path
from runner.api.app import MAX_PAGE, Api, Resource, int_param
from runner.api.errors import BadRequest, NotFound, Unavailable
from runner.api.openapi import check_query
from runner.errors import TransientError
from runner.ledger.runs import MAX_PAGE as MAX_EVENTS
from runner.ledger.runs import STATUSES, TERMINAL, get_run, list_runs, run_events, transcript
from runner.reconcile.applied import load_applied
from runner.specs.checking import did_you_mean
from runner.specs.models import NAME_PATTERN
from runner.supervise.runtime import Runtime
from runner.times import parse

MAX_LOG_PAGE = 1024 * 1024
RUN_ID = re.compile(r"[0-9a-f]{1,64}")  # run ids are hex (recording.new_run_id)
AGO = re.compile(r"(\d{1,6})([smhdw])")
UNIT = {"s": "seconds", "m": "minutes", "h": "hours", "d": "days", "w": "weeks"}
# A stream holds one of the server's threads (waitress runs eight) for as long as it lasts: at most this
# many at once, so plain requests always have threads left; the next is 503 with Retry-After.
MAX_STREAMS = 8  # streams open at once: each holds one of the API's 24 threads
MAX_CLIENT_STREAMS = 4  # of them, one client's: a client cannot take every slot from the others
STREAM_POLL = 0.2  # seconds between two reads of the stores while a run is followed
STREAM_KEEPALIVE = 15.0  # seconds of silence before a comment line (proxies and waitress keep the connection)
STREAM_LIFE = 3600.0  # seconds a stream lasts at most; a client that wants more reconnects with Last-Event-ID


class Collection(Resource):
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        rt = self.client(req, "viewer")
        check_query(req, "runs")
        limit = int_param(req, "limit", 50, 1, MAX_PAGE)
        agent, status, since_raw, cursor = (req.get_param(k) for k in ("agent", "status", "since", "cursor"))
        if agent and not re.fullmatch(NAME_PATTERN, agent):
            raise BadRequest("'agent' must be an agent name (lowercase letters, digits, '-' and '_')",
                             details=["agent"], code="bad_param")
        if status and status not in STATUSES:
            raise BadRequest(f"'status' must be one of {', '.join(STATUSES)}{did_you_mean(status, STATUSES)}",
                             details=["status"], code="bad_param")
        since = since_param(since_raw) if since_raw else None
        if cursor and not RUN_ID.fullmatch(cursor):
            raise BadRequest("'cursor' must be a run id, as next_cursor gives it", details=["cursor"],
                             code="bad_param")

        def build() -> bytes:
            runs, next_cursor = list_runs(rt.conn(), rt.settings.ledger_path, rt.settings.client_id, agent=agent,
                                          status=status, since=since, cursor=cursor, limit=limit)
            return json.dumps({"runs": runs, "next_cursor": next_cursor}).encode()

        resp.content_type = falcon.MEDIA_JSON
        # Keyed by each filter's name too: ?agent=failed and ?status=failed are different pages.
        key = ("runs", rt.settings.client_id, agent, status, since, cursor, limit)
        resp.data = self.api.cache.get(key, build)


def since_param(raw: str, now: datetime | None = None) -> datetime:
    """``since`` as a UTC time: an ISO 8601 date or time (no offset means UTC), or an age such as ``30m``,
    ``12h``, ``7d``."""
    ago = AGO.fullmatch(raw)
    try:
        if ago:
            return (now or datetime.now(UTC)) - timedelta(**{UNIT[ago.group(2)]: int(ago.group(1))})
        return parse(raw)
    except (ValueError, OverflowError):
        raise BadRequest(f"'since' must be an ISO 8601 date or time (2025-01-31, 2025-01-31T08:00:00Z) or an "
                         f"age (30m, 12h, 7d), not {raw[:40]!r}", details=["since"], code="bad_param") from None


class Item(Resource):
    def on_get(self, req: falcon.Request, resp: falcon.Response, run_id: str) -> None:
        rt = self.client(req, "viewer")
        check_query(req, "run")
        resp.media = _run(rt, run_id)


class Transcript(Resource):
    def on_get(self, req: falcon.Request, resp: falcon.Response, run_id: str) -> None:
        rt = self.client(req, "viewer")
        check_query(req, "transcript")
        found = transcript(rt.conn(), rt.settings.ledger_path, rt.settings.client_id, run_id)
        if found is None:
            raise NotFound(f"no run '{run_id}'")
        resp.media = found


class Events(Resource):
    """A run's events: a page of JSON, or with ``follow=1`` a stream of server-sent events."""

    def __init__(self, api: Api) -> None:
        super().__init__(api)
        self.streams = threading.BoundedSemaphore(MAX_STREAMS)
        self._mine: dict[str, threading.BoundedSemaphore] = {}
        self._lock = threading.Lock()

    def _slot(self, client: str) -> Callable[[], None] | None:
        """A stream's slot, within the client's share: the function that gives it back, or None."""
        with self._lock:
            mine = self._mine.setdefault(client, threading.BoundedSemaphore(MAX_CLIENT_STREAMS))
        if not mine.acquire(blocking=False):
            return None
        if not self.streams.acquire(blocking=False):
            mine.release()
            return None

        def release() -> None:
            self.streams.release()
            mine.release()

        return release

    def on_get(self, req: falcon.Request, resp: falcon.Response, run_id: str) -> None:
        rt = self.client(req, "viewer")
        check_query(req, "events")
        limit = int_param(req, "limit", 500, 1, MAX_EVENTS)
        after = int_param(req, "after", 0, 0, 10**9)
        follow = flag_param(req, "follow")
        run = _run(rt, run_id)
        if not follow:
            resp.media = {"run_id": run_id, "events": run_events(rt.conn(), rt.settings.ledger_path, run_id,
                                                                 after=after, limit=limit)}
            return
        last = (req.get_header("Last-Event-ID") or "").strip()
        if last:
            if not last.isdigit() or len(last) > 9:
                raise BadRequest("'Last-Event-ID' must be an event's id (its seq), as the stream sent it",
                                 details=["Last-Event-ID"], code="bad_param")
            after = max(after, int(last))
        release = self._slot(rt.settings.client_id)
        if release is None:
            resp.set_header("Retry-After", "5")
            raise Unavailable(f"{MAX_STREAMS} streams are open already ({MAX_CLIENT_STREAMS} at most per client); "
                              "try again shortly, or read the events without follow", code="too_many_streams")
        resp.content_type = "text/event-stream; charset=utf-8"
        resp.set_header("Cache-Control", "no-cache")
        resp.set_header("X-Accel-Buffering", "no")  # a reverse proxy passes each event on as it comes
        resp.stream = Follow(rt, run_id, after, limit, run["status"] in TERMINAL, release,
                             req.env.get("waitress.client_disconnected"))


class Follow:
    """The body of a followed run: its events from ``after`` on as server-sent events (``id`` is the seq,
    ``event`` the kind, ``data`` the event as JSON), read from the stores every 0.2 s, ending after the
    run's final ``status`` event (or, for a run that never had one, once it is over and read to its end).

    waitress sends each write at once (its send_bytes is 1 from 3.0 on) and runs the iteration on the
    request's thread, so the state database connection is that thread's. A client that goes away is
    seen at the next write (a comment line every 15 s when nothing happens), or at once where waitress
    reports it (``waitress.client_disconnected``, with ``channel_request_lookahead`` above 0). ``close``
    gives the stream's slot back, whether the stream ran to its end, was cut, or never started.
    """

    def __init__(self, rt: Runtime, run_id: str, after: int, limit: int, ended: bool, release: Callable[[], None],
                 gone: Callable[[], bool] | None) -> None:
        self.rt, self.run_id, self.after, self.limit, self.ended = rt, run_id, after, limit, ended
        self._release: Callable[[], None] | None = release
        self.gone = gone or (lambda: False)
        self._events = self._run()

    def __iter__(self) -> Iterator[bytes]:
        return self._events

    def close(self) -> None:
        self._events.close()
        if self._release is not None:
            release, self._release = self._release, None
            release()

    def _run(self) -> Generator[bytes, None, None]:
        rt = self.rt
        yield b"retry: 1000\n\n"
        deadline = time.monotonic() + STREAM_LIFE
        quiet = time.monotonic()
        while time.monotonic() < deadline and not self.gone():
            try:
                events = run_events(rt.conn(), rt.settings.ledger_path, self.run_id, after=self.after,
                                    limit=self.limit)
            except TransientError:  # the ledger is busy a moment: the next read takes the events
                events = []
            for event in events:
                self.after = event["seq"]
                yield f"id: {event['seq']}\nevent: {event['kind']}\ndata: {json.dumps(event)}\n\n".encode()
                if event["kind"] == "status":
                    return
            if events:
                quiet = time.monotonic()
                continue
            if self.ended:
                return  # over, and read to its end: a run that never ran has no status event
            try:
                run = get_run(rt.conn(), rt.settings.ledger_path, rt.settings.client_id, self.run_id)
            except TransientError:
                run = {"status": "running"}  # not known to be over: go on
            self.ended = run is None or run["status"] in TERMINAL  # one more read, then done
            if not self.ended and time.monotonic() - quiet >= STREAM_KEEPALIVE:
                quiet = time.monotonic()
                yield b": keepalive\n\n"
            if not self.ended:
                time.sleep(STREAM_POLL)


def flag_param(req: falcon.Request, name: str) -> bool:
    raw = req.get_param(name)
    if raw is None:
        return False
    if raw.lower() in ("1", "true", "yes"):
        return True
    if raw.lower() in ("0", "false", "no", ""):
        return False
    raise BadRequest(f"'{name}' must be 1 or 0 (true or false)", details=[name], code="bad_param")


def _run(rt: Runtime, run_id: str) -> dict[str, Any]:
    run = get_run(rt.conn(), rt.settings.ledger_path, rt.settings.client_id, run_id) if RUN_ID.fullmatch(run_id) \
        else None
    if run is None:
        raise NotFound(f"no run '{run_id}'")
    return run


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
