"""Runs, their events and transcripts, read from both stores: the one read path of the API and the CLI.

A run lives in two stores in turn. The live store (``state.sqlite``) holds its row in ``run_progress``
while it is queued or running and until its final row is archived, and the ``journal`` holds its rows
and events not archived yet. The archive (``runs.duckdb``) holds what the flusher moved. The flusher
commits to DuckDB before it deletes from SQLite, so at any moment a run, and each of its events, is in
one store or both. Hence the order of every read here: the live store first, then the archive. A run
pruned from the live store before the first read is in the archive by the second; one in both is
taken from the live store (its row there is the newer); events are the same in both, keyed by
(run_id, seq).

Reads never write: no flush, no file created (a home without a ledger has an empty archive). The
archive is read only when the live store cannot answer alone: a live run's row, and events the
journal still holds from the asked-for one on, cost one SQLite read.

DuckDB is the costly store: every read opens the file (about 10 ms), and one process reads it one
connection at a time (``reading.query`` holds the ledger lock). So point reads of archived runs and
events that arrive together (a burst of API requests on eight threads) are answered by one query
(``_Coalesced``), and what the archive says of an ended run, which never changes again, is kept in
memory within a byte budget (``_Lru``).

Every time goes out in the one format (``runner.times.stamp``): DuckDB hands TIMESTAMPs back naive,
and older live rows lack the ``Z``.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Generic, TypeVar

import duckdb

from runner.errors import TransientError
from runner.ledger.reading import query
from runner.ledger.schema import column_types, columns
from runner.times import parse, stamp

TERMINAL = ("succeeded", "failed", "timed_out", "budget_exceeded", "stopped", "interrupted", "skipped")
STATUSES = ("queued", "running", *TERMINAL)
COUNTERS = ("input_tokens", "output_tokens", "model_calls", "tool_calls", "denied", "tool_errors")
MAX_PAGE = 5000  # events in one read
MAX_TRANSCRIPT = 20_000  # events in one transcript (a run's channel carries at most 20,000 messages)
RUN_BUDGET = 8 << 20  # bytes of archived run rows kept in memory
EVENT_BUDGET = 16 << 20  # bytes of archived events kept in memory


def list_runs(conn: sqlite3.Connection, ledger_path: Path, client_id: str, *, agent: str | None = None,
              status: str | None = None, since: datetime | None = None, cursor: str | None = None,
              limit: int = 50, trigger: str | None = None) -> tuple[list[dict[str, Any]], str | None]:
    """A page of ``client_id``'s runs, newest first (run ids are time-ordered), and the cursor of the next
    page (None on the last). ``since`` keeps runs started (or queued) at or after it; ``trigger`` those
    started by that kind of trigger (manual, schedule, webhook...)."""
    where, params = ["client_id = ?"], [client_id]
    if cursor:
        where.append("run_id < ?")
        params.append(cursor)
    with _snapshot(conn):  # the live ids and the live rows as of one moment
        live_ids = {r[0] for r in conn.execute(f"SELECT run_id FROM run_progress WHERE {' AND '.join(where)}",
                                               params)}
        matched = _live_page(conn, where, params, agent, status, since, limit + 1, trigger)
    runs = {r["run_id"]: r for r in matched}
    for row in _archive_page(ledger_path, client_id, agent, status, since, cursor, limit + 1, live_ids, trigger):
        runs.setdefault(row["run_id"], row)  # live wins: a run pruned meanwhile is in both reads
    page = [runs[k] for k in sorted(runs, reverse=True)[:limit + 1]]
    return page[:limit], page[limit - 1]["run_id"] if len(page) > limit else None


def get_run(conn: sqlite3.Connection, ledger_path: Path, client_id: str, run_id: str) -> dict[str, Any] | None:
    """The run as last written, or None (unknown, or another client's)."""
    live = conn.execute("SELECT * FROM run_progress WHERE run_id = ?", (run_id,)).fetchone()
    if live is not None:
        return _live_run(live) if live["client_id"] == client_id else None
    row = _archived_run(ledger_path, run_id)
    return row if row is not None and row["client_id"] == client_id else None


def run_events(conn: sqlite3.Connection, ledger_path: Path, run_id: str, *, after: int = 0,
               limit: int = 500) -> list[dict[str, Any]]:
    """The run's events numbered after ``after``, in order, at most ``limit``. (The caller has checked the
    run is its client's: events name no client.)"""
    with _snapshot(conn):
        live = [_event(json.loads(r[0])) for r in conn.execute(
            "SELECT row FROM journal WHERE run_id = ? AND tbl = 'run_events' AND json_extract(row, '$.seq') > ?",
            (run_id, after))]
        progress = conn.execute("SELECT seq, status FROM run_progress WHERE run_id = ?", (run_id,)).fetchone()
    live.sort(key=lambda e: e["seq"])
    # The journal holds a run's newest events (a flush moves the oldest journal rows first): when they go
    # on from `after` without a gap, or the run in flight has numbered nothing past `after`, they are the
    # answer. (An ended run's last events may have moved in a flush that stopped short of its final row.)
    quiet = progress is not None and int(progress[0] or 0) <= after and progress[1] not in TERMINAL
    if [e["seq"] for e in live] == list(range(after + 1, after + 1 + len(live))) and (live or quiet):
        return live[:limit]
    archived = _archived_events(ledger_path, run_id, after, ended=progress is None and not live)
    merged = {e["seq"]: e for e in archived}
    merged.update((e["seq"], e) for e in live)
    return [merged[k] for k in sorted(merged)[:limit]]


def transcript(conn: sqlite3.Connection, ledger_path: Path, client_id: str, run_id: str) -> dict[str, Any] | None:
    """What the run did, in order: its input, each step (model calls with their text, tool calls with
    their decision and result, egress decisions, memory, logs, the final status) and its answer, with a
    summary of what it cost. None when the run is not the client's. A denied step shows what was asked
    and why it was refused: there is no content of it to show."""
    run = get_run(conn, ledger_path, client_id, run_id)
    if run is None:
        return None
    events: list[dict[str, Any]] = []
    while len(events) <= MAX_TRANSCRIPT:
        page = run_events(conn, ledger_path, run_id, after=events[-1]["seq"] if events else 0, limit=MAX_PAGE)
        events += page
        if len(page) < MAX_PAGE:
            break
    steps = [step_of(e) for e in events[:MAX_TRANSCRIPT]]
    return {"run_id": run_id, "agent": run["agent"], "status": run["status"], "trigger": run["trigger"],
            "requested_by": run["requested_by"], "spec_revision": run["spec_revision"], "input": run["input"],
            "steps": steps, "output": run["output"], "error": run["error"], "summary": summary_of(run, events),
            "complete": run["status"] in TERMINAL and any(e["kind"] == "status" for e in events),
            "truncated": len(events) > MAX_TRANSCRIPT}


def last_runs(conn: sqlite3.Connection, ledger_path: Path, client_id: str) -> dict[str, dict[str, Any]]:
    """The newest run of each of the client's agents, by agent name."""
    found: dict[str, dict[str, Any]] = {}
    if ledger_path.exists():  # (status pages ask this together: the requests that meet make one query)
        found = dict(_LAST_READS.get(ledger_path, client_id) or {})
    for live in conn.execute("SELECT * FROM run_progress WHERE run_id IN (SELECT max(run_id) FROM run_progress "
                             "WHERE client_id = ? GROUP BY agent)", (client_id,)):
        have = found.get(live["agent"])
        if have is None or live["run_id"] >= have["run_id"]:  # live wins: its row is the newer
            found[live["agent"]] = _live_run(live)
    return found


def client_of(conn: sqlite3.Connection, ledger_path: Path, run_id: str) -> str | None:
    """The client a run belongs to (events name none), from whichever store has its row."""
    live = conn.execute("SELECT client_id FROM run_progress WHERE run_id = ?", (run_id,)).fetchone()
    if live is not None:
        return str(live[0])
    queued = conn.execute("SELECT json_extract(row, '$.client_id') FROM journal WHERE run_id = ? AND tbl = 'runs' "
                          "LIMIT 1", (run_id,)).fetchone()
    if queued is not None and queued[0]:
        return str(queued[0])
    row = _archived_run(ledger_path, run_id)
    return str(row["client_id"]) if row else None


@dataclass
class Totals:
    """What the archive holds, summed: the metrics' counters start from it."""

    runs: list[dict[str, Any]] = field(default_factory=list)  # client_id, agent, status, runs, tokens...
    tool_calls: list[dict[str, Any]] = field(default_factory=list)  # client_id, tool, decision, calls


def totals(ledger_path: Path) -> Totals:
    """Ended runs by client, agent and status (with their tokens, denials, tool errors, CPU and bytes
    written), and tool calls by client, tool and decision, as archived."""
    if not ledger_path.exists():
        return Totals()
    marks = ", ".join("?" * len(TERMINAL))
    cols, rows = _query(ledger_path, "SELECT client_id, agent, status, count(*) AS runs, "
                        "sum(input_tokens) AS input_tokens, sum(output_tokens) AS output_tokens, "
                        "sum(denied) AS denied, sum(tool_errors) AS tool_errors, sum(cpu_seconds) AS cpu_seconds, "
                        f"sum(bytes_written) AS bytes_written FROM runs WHERE status IN ({marks}) GROUP BY ALL",
                        list(TERMINAL))
    tcols, trows = _query(ledger_path, "SELECT r.client_id, e.name AS tool, e.decision, count(*) AS calls "
                          "FROM run_events e JOIN runs r USING (run_id) WHERE e.kind = 'tool_call' GROUP BY ALL")
    return Totals([dict(zip(cols, r, strict=True)) for r in rows], [dict(zip(tcols, r, strict=True)) for r in trows])


# -- transcripts ----------------------------------------------------------------------------------------


def step_of(event: dict[str, Any]) -> dict[str, Any]:
    """One event as a transcript step. Each kind of step shows the fields it has and nothing else, so a
    field an event should not carry (content of a denied call) never reaches a reader."""
    kind, name, decision = event["kind"], event["name"], event["decision"]
    d = event["detail"] if isinstance(event["detail"], dict) else {}
    step: dict[str, Any] = {"seq": event["seq"], "ts": event["ts"]}
    if kind == "llm_call":
        step |= {"type": "model_call", "model": name, **_pick(d, "input_tokens", "output_tokens", "estimated",
                                                              "latency_ms", "finish_reason", "tool_calls"),
                 "text": d.get("text"), "text_chars": d.get("text_chars")}
    elif kind == "tool_call" and decision == "denied":
        step |= {"type": "tool_call", "tool": name, "decision": "denied", "args": d.get("args"),
                 "reason": d.get("reason"), **_pick(d, "duration_ms")}
    elif kind == "tool_call":
        step |= {"type": "tool_call", "tool": name, "decision": decision, "args": d.get("args"),
                 "result": d.get("result"), "result_bytes": d.get("result_bytes"), "error": d.get("error"),
                 **_pick(d, "duration_ms")}
    elif kind == "log" and name == "egress":
        step |= {"type": "egress", "decision": decision, **_pick(d, "host", "port", "method", "reason")}
    elif kind == "memory" and name == "recall":
        step |= {"type": "memory_recall", "found": d.get("found"), "texts": d.get("texts")}
    elif kind == "memory" and name == "save":
        step |= {"type": "memory_save", "text": d.get("text"), **_pick(d, "chars")}
    elif kind == "status":
        step |= {"type": "status", "status": name, "error": d.get("error")}
    else:  # the run's other logs (sandbox, output, final_answer) and kinds to come
        step |= {"type": kind, "name": name, "decision": decision, "detail": d}
    return step


def summary_of(run: dict[str, Any], events: list[dict[str, Any]]) -> dict[str, Any]:
    """What the run cost. Denials and tool errors come from the run row; a row that predates them is
    counted from its events."""
    calls = [e for e in events if e["kind"] == "tool_call"]
    denied = run.get("denied")
    errors = run.get("tool_errors")
    duration = None
    if run["started_at"] and run["ended_at"]:
        duration = round((parse(run["ended_at"]) - parse(run["started_at"])).total_seconds(), 3)
    inp, out = int(run["input_tokens"] or 0), int(run["output_tokens"] or 0)
    return {"status": run["status"], "queued_at": run["queued_at"], "started_at": run["started_at"],
            "ended_at": run["ended_at"], "duration_seconds": duration, "input_tokens": inp, "output_tokens": out,
            "tokens": inp + out, "model_calls": run["model_calls"], "tool_calls": run["tool_calls"],
            "denied": denied if denied is not None else sum(1 for e in calls if e["decision"] == "denied"),
            "tool_errors": errors if errors is not None else sum(
                1 for e in calls if e["decision"] != "denied" and isinstance(e["detail"], dict)
                and e["detail"].get("error")),
            "cpu_seconds": run.get("cpu_seconds"), "max_rss_mb": run.get("max_rss_mb"),
            "bytes_written": run.get("bytes_written"), "attempt": run.get("attempt"), "retry_of": run.get("retry_of"),
            "node": run.get("node"), "parent_run_id": run.get("parent_run_id"),
            "trigger_run_id": run.get("trigger_run_id"), "chain_depth": run.get("chain_depth") or 0}


def _pick(detail: dict[str, Any], *keys: str) -> dict[str, Any]:
    return {k: detail[k] for k in keys if k in detail}


# -- the live store -------------------------------------------------------------------------------------


@contextmanager
def _snapshot(conn: sqlite3.Connection) -> Iterator[None]:
    """Reads that see the live store as of one moment (a deferred read transaction in WAL mode)."""
    if conn.in_transaction:
        yield
        return
    conn.execute("BEGIN")
    try:
        yield
    finally:
        conn.execute("COMMIT")


def _live_page(conn: sqlite3.Connection, where: list[str], params: list[Any], agent: str | None,
               status: str | None, since: datetime | None, limit: int,
               trigger: str | None = None) -> list[dict[str, Any]]:
    where, params = list(where), list(params)
    if agent:
        where.append("agent = ?")
        params.append(agent)
    if status:
        where.append("status = ?")
        params.append(status)
    if trigger:
        where.append("json_extract(row, '$.trigger') = ?")
        params.append(trigger)
    if since is not None:
        # Times compare as text: written to the millisecond, with a Z (or, in older rows, without one),
        # so the bound goes without it (a longer string with the same start sorts after it).
        where.append("coalesce(json_extract(row, '$.started_at'), json_extract(row, '$.queued_at'), started_at, "
                     "updated_at) >= ?")
        params.append(stamp(since).removesuffix("Z"))
    rows = conn.execute(f"SELECT * FROM run_progress WHERE {' AND '.join(where)} ORDER BY run_id DESC LIMIT ?",
                        [*params, limit]).fetchall()
    return [_live_run(r) for r in rows]


def _live_run(r: sqlite3.Row) -> dict[str, Any]:
    """A run_progress row in the ledger's shape. The row JSON is the run as last written; while the run is
    in flight its counters move ahead of it (they are kept per message), and its process id too."""
    data: dict[str, Any] = json.loads(r["row"]) if r["row"] else {}
    run = {c: data.get(c) for c in RUN_COLUMNS}
    keys = r.keys()
    run.update(run_id=r["run_id"], client_id=run["client_id"] or r["client_id"], agent=run["agent"] or r["agent"],
               status=r["status"])
    if run["retry_of"] is None and "retry_of" in keys:
        run["retry_of"] = r["retry_of"]
    if r["status"] not in TERMINAL:
        for c in COUNTERS:
            if c in keys and r[c] is not None:
                run[c] = max(int(run[c] or 0), int(r[c]))
        if run["pid"] is None and "pid" in keys:
            run["pid"] = r["pid"]
    return _typed(run)


def _event(raw: dict[str, Any]) -> dict[str, Any]:
    detail = raw.get("detail")
    if isinstance(detail, str):
        detail = json.loads(detail) if detail else None
    return {"seq": int(raw["seq"]), "ts": _time(raw.get("ts")), "kind": raw.get("kind"), "name": raw.get("name"),
            "decision": raw.get("decision"), "detail": detail if detail is not None else {}}


RUN_COLUMNS = columns("runs")
_TYPES = column_types("runs")


def _typed(run: dict[str, Any]) -> dict[str, Any]:
    """One JSON for a run from either store: times in the one format, numbers as their column's type."""
    for c, value in run.items():
        kind = _TYPES.get(c)
        if value is None or kind is None:
            continue
        if kind == "TIMESTAMP":
            run[c] = _time(value)
        elif kind in ("BIGINT", "INTEGER") and not isinstance(value, bool):
            run[c] = int(value)
        elif kind == "DOUBLE":
            run[c] = float(value)
    return run


def _time(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, datetime):
        return stamp(value)
    try:
        return stamp(parse(str(value)))
    except ValueError:
        return str(value)


# -- the archive ----------------------------------------------------------------------------------------


def _query(ledger_path: Path, sql: str, params: list[Any] | None = None) -> tuple[list[str], list[tuple[Any, ...]]]:
    """``reading.query``; a ledger without the tables yet (made by an older version) holds no rows."""
    try:
        return query(ledger_path, sql, params)
    except duckdb.CatalogException:
        return [], []


def _archive_run(cols: list[str], row: tuple[Any, ...]) -> dict[str, Any]:
    # By name: a ledger the flusher has not migrated yet lacks the newest columns (None until it has them).
    got = dict(zip(cols, row, strict=True))
    return _typed({c: got.get(c) for c in RUN_COLUMNS})


def _archive_page(ledger_path: Path, client_id: str, agent: str | None, status: str | None,
                  since: datetime | None, cursor: str | None, limit: int, live_ids: set[str],
                  trigger: str | None = None) -> list[dict[str, Any]]:
    if not ledger_path.exists():
        return []
    where: list[str] = ["client_id = ?"]
    params: list[Any] = [client_id]
    for column, value in (("agent", agent), ("status", status), ("trigger", trigger)):
        if value:
            where.append(f"{column} = ?")
            params.append(value)
    if since is not None:
        where.append("coalesce(started_at, queued_at) >= ?")
        params.append(parse(stamp(since)).replace(tzinfo=None))
    # Rows the live store has too are left out here, whatever they say (its row is the newer), so a page
    # may take a second query; there are few of them (runs in flight, and ended ones for a moment).
    found: list[dict[str, Any]] = []
    size = limit + min(len(live_ids), 1000)
    while True:
        bound = ["run_id < ?"] if cursor else []
        cols, rows = _query(ledger_path, f"SELECT * FROM runs WHERE {' AND '.join(where + bound)} "
                            "ORDER BY run_id DESC LIMIT ?", [*params, *([cursor] if cursor else []), size])
        found += [run for run in (_archive_run(cols, r) for r in rows) if run["run_id"] not in live_ids]
        if len(found) >= limit or len(rows) < size:
            return found[:limit]
        cursor = str(rows[-1][cols.index("run_id")])  # the page was full: go on below it


def _archived_run(ledger_path: Path, run_id: str) -> dict[str, Any] | None:
    if not ledger_path.exists():
        return None
    key = (str(ledger_path), run_id)
    cached = _RUNS.get(key)
    if cached is not None:
        return dict(cached)
    row: dict[str, Any] | None = _RUN_READS.get(ledger_path, run_id)
    if row is not None and row["status"] in TERMINAL:  # an ended run's row never changes again
        _RUNS.put(key, row, 512 + len(row["input"] or "") + len(row["output"] or "") + len(row["error"] or ""))
    return dict(row) if row is not None else None


def _archived_events(ledger_path: Path, run_id: str, after: int, *, ended: bool) -> list[dict[str, Any]]:
    """The archive's events of the run after ``after``. ``ended``: the live store has nothing of the run
    left, so the archive has every event it will ever have, and they are read whole and kept."""
    if not ledger_path.exists():
        return []
    if not ended:
        return _EVENT_READS.get(ledger_path, (run_id, after)) or []
    key = (str(ledger_path), run_id)
    whole = _EVENTS.get(key)
    if whole is None:
        whole = _EVENT_READS.get(ledger_path, (run_id, 0)) or []
        if whole and whole[-1]["kind"] == "status":  # all there is: the final status is a run's last event
            _EVENTS.put(key, whole, sum(128 + len(json.dumps(e["detail"])) for e in whole))
    return [dict(e) for e in whole if e["seq"] > after]


def _fetch_runs(ledger_path: Path, run_ids: list[str]) -> dict[str, dict[str, Any]]:
    marks = ", ".join("?" * len(run_ids))
    cols, rows = _query(ledger_path, f"SELECT * FROM runs WHERE run_id IN ({marks})", run_ids)
    return {r["run_id"]: r for r in (_archive_run(cols, row) for row in rows)}


def _fetch_events(ledger_path: Path, keys: list[tuple[str, int]]) -> dict[tuple[str, int], list[dict[str, Any]]]:
    ids = sorted({run_id for run_id, _after in keys})
    marks = ", ".join("?" * len(ids))
    _cols, rows = _query(ledger_path, "SELECT run_id, seq, ts, kind, name, decision, detail FROM run_events "
                         f"WHERE run_id IN ({marks}) AND seq > ? ORDER BY run_id, seq",
                         [*ids, min(after for _run_id, after in keys)])
    by_run: dict[str, list[dict[str, Any]]] = {}
    for run_id, seq, ts, kind, name, decision, detail in rows:
        event = _event({"seq": seq, "ts": ts, "kind": kind, "name": name, "decision": decision, "detail": detail})
        by_run.setdefault(run_id, []).append(event)
    return {(run_id, after): [e for e in by_run.get(run_id, []) if e["seq"] > after] for run_id, after in keys}


def _fetch_last(ledger_path: Path, clients: list[str]) -> dict[str, dict[str, dict[str, Any]]]:
    marks = ", ".join("?" * len(clients))
    cols, rows = _query(ledger_path, "SELECT * FROM runs WHERE run_id IN (SELECT max(run_id) FROM runs "
                        f"WHERE client_id IN ({marks}) GROUP BY client_id, agent)", clients)
    found: dict[str, dict[str, dict[str, Any]]] = {c: {} for c in clients}
    for run in (_archive_run(cols, row) for row in rows):
        found[run["client_id"]][run["agent"]] = run
    return found


K = TypeVar("K")
V = TypeVar("V")


class _Coalesced(Generic[K, V]):
    """Point reads of one ledger that arrive while another is being answered wait for it, then go as one
    query: ``fetch(ledger_path, keys)`` answers a whole batch. One thread (the leader) runs each batch;
    when it is done it hands the lead to the first thread that queued meanwhile, so no thread answers for
    others longer than one batch."""

    WAIT = 60.0

    def __init__(self, fetch: Callable[[Path, list[K]], dict[K, V]]) -> None:
        self.fetch = fetch
        self.lock = threading.Lock()
        self.queues: dict[str, list[_Ask[K, V]]] = {}

    def get(self, ledger_path: Path, key: K) -> V | None:
        ask: _Ask[K, V] = _Ask(key)
        name = str(ledger_path)
        with self.lock:
            queue = self.queues.get(name)
            ask.lead = queue is None
            if queue is None:
                self.queues[name] = queue = []
            queue.append(ask)
        if not ask.lead and not ask.done.wait(self.WAIT):
            with self.lock:  # leave the queue, unless the lead came meanwhile
                queue = self.queues.get(name) or []
                if not ask.lead and not ask.done.is_set():
                    if ask in queue:
                        queue.remove(ask)
                    raise TransientError(f"the ledger {ledger_path} did not answer within {self.WAIT:g}s")
        if ask.lead:  # first in, or handed the lead
            self._lead(ledger_path, name)
        if ask.error is not None:
            raise ask.error
        return ask.value

    def _lead(self, ledger_path: Path, name: str) -> None:
        with self.lock:
            batch, self.queues[name] = self.queues[name], []
        try:
            found = self.fetch(ledger_path, list(dict.fromkeys(a.key for a in batch)))
            for a in batch:
                a.value = found.get(a.key)
        except Exception as exc:
            for a in batch:
                a.error = exc
        finally:
            with self.lock:
                rest = self.queues[name]
                if rest:
                    rest[0].lead = True
                else:
                    del self.queues[name]
            for a in batch:
                a.lead = False
                a.done.set()
            if rest:
                rest[0].done.set()


class _Ask(Generic[K, V]):
    def __init__(self, key: K) -> None:
        self.key = key
        self.value: V | None = None
        self.error: Exception | None = None
        self.lead = False
        self.done = threading.Event()


class _Lru(Generic[K, V]):
    """What the archive said of ended runs, newest use last, within a byte budget."""

    def __init__(self, budget: int) -> None:
        self.budget, self.size = budget, 0
        self.items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self.lock = threading.Lock()

    def get(self, key: K) -> V | None:
        with self.lock:
            hit = self.items.get(key)
            if hit is None:
                return None
            self.items.move_to_end(key)
            return hit[0]

    def put(self, key: K, value: V, size: int) -> None:
        if size > self.budget // 8:
            return  # one run must not push out everything else
        with self.lock:
            old = self.items.pop(key, None)
            self.size += size - (old[1] if old else 0)
            self.items[key] = (value, size)
            while self.size > self.budget:
                _key, (_value, gone) = self.items.popitem(last=False)
                self.size -= gone


_RUN_READS: _Coalesced[str, dict[str, Any]] = _Coalesced(_fetch_runs)
_EVENT_READS: _Coalesced[tuple[str, int], list[dict[str, Any]]] = _Coalesced(_fetch_events)
_LAST_READS: _Coalesced[str, dict[str, dict[str, Any]]] = _Coalesced(_fetch_last)
_RUNS: _Lru[tuple[str, str], dict[str, Any]] = _Lru(RUN_BUDGET)
_EVENTS: _Lru[tuple[str, str], list[dict[str, Any]]] = _Lru(EVENT_BUDGET)
