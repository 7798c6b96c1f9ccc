"""The soak: an operator's daily load on a real daemon for N minutes, and whether anything was lost or grew.

    python -m bench soak --minutes 12

The load (times scale with --minutes; the default is 12):

- five agents on a six-field cron, every 2 s (`*/2 * * * * *`), scripted model making two tool calls,
  so every run has several events; `overlap: queue`, so a slow run delays the next instead of skipping it;
- one agent with a `file_change` trigger on a folder the soak writes a file into every 5 s;
- API bursts every 30 s: 200 GETs over 20 keep-alive client threads with a viewer token, across
  `/agents/v1/runs`, `/runs/{id}`, `/runs/{id}/events`, `/agents` and the token's client status (the API
  has no `/agents/v1/status`: `GET /healthz` with a token is the client's status); every status code and
  latency is kept;
- a reader: a separate process that opens `runs.duckdb` read-only, runs `BEGIN` and a query, and holds
  it for 60 s (less when --minutes < 3), once in the middle;
- every 10 s: the disk use of the live state (`state.sqlite` and its `-wal`/`-shm`), of the runs' scratch
  folders (`HOME/scratch/CLIENT/RUN_ID`) and the number of entries in them; the ledger's size beside them.

The daemon is observed from the outside only: its HTTP API, `agentctl`, its log files, file sizes, and
`runs.duckdb` read-only (while it runs, only in short connections that retry on DuckDB's lock).

At the end the daemon is stopped with SIGTERM and the soak checks, each against its goal:

- every run the daemon ended (its log's `run ID of AGENT ended: STATUS` lines, the lines of runs it ended
  without starting, and the agents' logs) is in the ledger with a terminal status, the one the log says;
- every ledger run has all its events: `run_events` seq 1..N contiguous and a last event of kind 'status'
  (runs that never started have none and are counted apart);
- nothing set aside (`journal_rejected` in state.sqlite, log lines saying 'rejected' or 'set aside'),
  or, if something was, the daemon's log says so;
- no 5xx (and every request answered), and no 4xx either: the soak reads only runs the API has just
  listed, with a valid token; API read p99 under 500 ms, overall and in every burst; every
  request in the ledger's `audit` table (its `detail.ms` also says how long the daemon itself took);
- ingestion resumes within 2 s of the reader leaving (the ledger file written again, and its count of
  runs grown);
- flat disk: live state and scratch at the end no more than 2x their size after the first minute;
- the daemon stops cleanly on SIGTERM (exit 0).

It prints `soak: PASS` or `soak: FAIL (reasons)` last, and exits 0 either way.
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import re
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import duckdb

from bench import commit_all, daemon
from bench.api import free_port, wait_http

TICKERS = 5  # agents scheduled every 2 s
FILE_EVERY = 5.0  # seconds between files written into the watched folder
BURST_EVERY, BURST_FIRST = 30.0, 15.0  # API bursts: every 30 s, the first 15 s in
BURST_REQUESTS, BURST_THREADS = 200, 20
SAMPLE_EVERY = 10.0  # disk samples
READER_HOLD = 60.0  # seconds the reader holds the ledger (scaled down under 3 minutes)
RESUME_WAIT = 30.0  # seconds to wait for ingestion to resume before calling it stuck
TOKEN_NAME = "soak"  # the API token's name: the actor of the soak's requests in the audit table

# Goals
P99_GOAL = 0.5  # seconds
RESUME_GOAL = 2.0  # seconds
GROWTH_GOAL = 2.0  # end / after the first minute
SCRATCH_SLACK_BYTES, SCRATCH_SLACK_ENTRIES = 1 << 20, 40  # runs in flight own a folder each; allow for them

TERMINAL = ("succeeded", "failed", "timed_out", "budget_exceeded", "stopped", "interrupted", "skipped")
# The daemon's log (runner/supervise/table.py): a started run's end, and a run it ended without starting.
ENDED = re.compile(r"\brun ([0-9a-f]+) of (\S+) ended: (\w+)")
RECORDED = re.compile(r"\brun ([0-9a-f]+) of (\S+) (skipped|stopped|failed): ")
# An agent's log (runner/agent/recording.AgentLog): `TS run=ID LEVEL message`; the run's last line says its end.
AGENT_ENDED = re.compile(r"^\S+ run=([0-9a-f]+) \w+ (" + "|".join(TERMINAL) + r"):")

# The reader: opens the ledger read-only (retrying while a flush holds it), BEGIN, a query, holds it.
# Times are CLOCK_MONOTONIC, which every process of the machine shares.
READER = r"""
import duckdb, json, sys, time
path, hold = sys.argv[1], float(sys.argv[2])
deadline = time.monotonic() + 30
while True:
    try:
        con = duckdb.connect(path, read_only=True)
        break
    except duckdb.IOException as exc:
        if "lock" not in str(exc).lower() or time.monotonic() > deadline:
            raise
        time.sleep(0.01)
con.execute("BEGIN")
runs = con.execute("SELECT count(*) FROM runs").fetchone()[0]
print(json.dumps({"opened": time.monotonic(), "runs": runs}), flush=True)
time.sleep(hold)
con.execute("COMMIT")
con.close()
print(json.dumps({"left": time.monotonic()}), flush=True)
"""


# -- the spec repository and the daemon ------------------------------------------------------------

def make_repo(root: Path) -> tuple[Path, Path]:
    """Five agents every 2 s and one watcher, all scripted with two file reads. Returns (repo, inbox)."""
    data, inbox = root / "data", root / "inbox"
    data.mkdir()
    inbox.mkdir()
    for i in range(2):
        (data / f"f{i}.txt").write_text(f"figures {i}\n" * 50)
    repo = root / "repo"
    (repo / "specs" / "_scripts").mkdir(parents=True)
    (repo / "specs" / "_scripts" / "work.yaml").write_text(
        "turns:\n"
        f"  - tool_calls: [{{name: file_reader, args: {{path: '{data}/f0.txt'}}}}]\n"
        f"  - tool_calls: [{{name: file_reader, args: {{path: '{data}/f1.txt'}}}}]\n"
        "  - content: done\n")
    tools = f"tools:\n  - name: file_reader\n    paths: ['{data}']\n"
    for i in range(TICKERS):
        (repo / "specs" / f"tick{i}.yaml").write_text(
            f"name: tick{i}\ndescription: soak load, every 2 s\nmodel: scripted:_scripts/work.yaml\n"
            f"overlap: queue\n{tools}triggers:\n  - type: schedule\n    cron: '*/2 * * * * *'\n")
    (repo / "specs" / "watcher.yaml").write_text(
        "name: watcher\ndescription: soak load, a run per file\nmodel: scripted:_scripts/work.yaml\n"
        f"overlap: queue\n{tools}triggers:\n  - type: file_change\n    path: '{inbox}'\n    debounce: 1\n")
    commit_all(repo, "soak agents")
    return repo, inbox


def start_daemon(home: Path, repo: Path, port: int, out: Path) -> subprocess.Popen[bytes]:
    """`agentctl serve` on ``home`` with its API on ``port``; its stdout and stderr go to ``out``."""
    proc = daemon.start_daemon(home, repo, serve=("--port", str(port)), out=out)
    wait_http(port, "/healthz")
    return proc


def stop_daemon(proc: subprocess.Popen[bytes]) -> tuple[int | None, float]:
    """SIGTERM and wait (runs in flight get their grace). Returns (exit code or None if it hung, seconds)."""
    t = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    try:
        code: int | None = proc.wait(timeout=180)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        code = None
    return code, time.monotonic() - t


def create_token(home: Path) -> str:
    out = subprocess.run([sys.executable, "-m", "runner", "--home", str(home), "token", "create", "--role", "viewer",
                          "--name", TOKEN_NAME], check=True, capture_output=True, text=True)
    return out.stdout.strip()


# -- the API bursts --------------------------------------------------------------------------------

@dataclass
class Hit:
    route: str
    status: int  # 0: no answer (connection error or timeout)
    latency: float


@dataclass
class Burst:
    at: float  # seconds into the soak
    hits: list[Hit]


def get(conn: http.client.HTTPConnection, path: str, token: str) -> tuple[int, bytes]:
    conn.request("GET", path, headers={"Authorization": f"Bearer {token}"})
    resp = conn.getresponse()
    return resp.status, resp.read()


def burst(port: int, token: str) -> list[Hit]:
    """BURST_REQUESTS GETs over BURST_THREADS keep-alive clients. The first lists runs (and gives the ids
    the others ask for); the rest go round the five routes."""
    hits: list[Hit] = []
    lock = threading.Lock()
    ids: list[str] = []

    def timed(conn: http.client.HTTPConnection, route: str, path: str) -> tuple[http.client.HTTPConnection, bytes]:
        t = time.perf_counter()
        try:
            status, body = get(conn, path, token)
        except (OSError, http.client.HTTPException):
            status, body = 0, b""
            conn.close()
            conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        with lock:
            hits.append(Hit(route, status, time.perf_counter() - t))
        return conn, body

    first = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    _, body = timed(first, "GET /runs", "/agents/v1/runs?limit=50")
    first.close()
    try:
        ids = [r["run_id"] for r in json.loads(body)["runs"]]
    except (ValueError, KeyError, TypeError):
        ids = []
    routes: list[tuple[str, Callable[[int], str]]] = [
        ("GET /runs", lambda i: "/agents/v1/runs?limit=50"),
        ("GET /runs/{id}", lambda i: f"/agents/v1/runs/{ids[i % len(ids)]}"),
        ("GET /runs/{id}/events", lambda i: f"/agents/v1/runs/{ids[i % len(ids)]}/events"),
        ("GET /agents", lambda i: "/agents/v1/agents"),
        ("GET /healthz (status)", lambda i: "/healthz")]
    if not ids:  # nothing to ask about yet: the routes that need no run id
        routes = [routes[0], routes[3], routes[4]]
    plan = [(routes[i % len(routes)][0], routes[i % len(routes)][1](i)) for i in range(1, BURST_REQUESTS)]

    def client(share: list[tuple[str, str]]) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        for route, path in share:
            conn, _ = timed(conn, route, path)
        conn.close()

    threads = [threading.Thread(target=client, args=(plan[k::BURST_THREADS],)) for k in range(BURST_THREADS)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return hits


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


# -- disk ------------------------------------------------------------------------------------------

@dataclass
class Sample:
    at: float  # seconds into the soak
    state: int  # bytes of state.sqlite, -wal, -shm
    scratch: int  # bytes of the files under HOME/scratch
    entries: int  # files and folders under HOME/scratch
    ledger: int  # bytes of runs.duckdb and its .wal (it grows with the runs; not a goal)


def size(path: Path) -> int:
    try:
        return path.stat().st_size
    except FileNotFoundError:
        return 0


def sample(home: Path, at: float) -> Sample:
    state = sum(size(home / f"state.sqlite{suffix}") for suffix in ("", "-wal", "-shm"))
    scratch = entries = 0
    for folder, dirs, files in os.walk(home / "scratch"):
        entries += len(dirs) + len(files)
        scratch += sum(size(Path(folder) / f) for f in files)
    ledger = size(home / "runs.duckdb") + size(home / "runs.duckdb.wal")
    return Sample(at, state, scratch, entries, ledger)


# -- the reader, and ingestion after it ------------------------------------------------------------

@dataclass
class ReaderResult:
    opened_at: float | None = None  # seconds into the soak
    left_at: float | None = None
    runs_held: int = 0  # runs in the ledger when it opened
    written_after: float | None = None  # seconds from its leaving to the ledger file changing
    grown_after: float | None = None  # seconds from its leaving to a count of runs above runs_held
    runs_then: int = 0
    changed_while_held: bool = False
    error: str = ""
    notes: list[str] = field(default_factory=list)


def ledger_stamp(ledger: Path) -> tuple[int, int, int, int]:
    """What changes when the daemon commits to the ledger: the file's and its WAL's size and mtime."""
    stamp = []
    for path in (ledger, ledger.with_name(ledger.name + ".wal")):
        try:
            st = path.stat()
            stamp += [st.st_size, st.st_mtime_ns]
        except FileNotFoundError:
            stamp += [-1, -1]
    return (stamp[0], stamp[1], stamp[2], stamp[3])


def count_runs(ledger: Path, deadline: float) -> int | None:
    """Runs in the ledger, in one short read-only connection, retried while a flush holds the file."""
    while time.monotonic() < deadline:
        try:
            con = duckdb.connect(str(ledger), read_only=True)
        except duckdb.IOException as exc:
            if "lock" not in str(exc).lower():
                raise
            time.sleep(0.02)
            continue
        try:
            row = con.execute("SELECT count(*) FROM runs").fetchone()
            return int(row[0]) if row else 0
        finally:
            con.close()
    return None


def run_reader(ledger: Path, hold: float, t0: float, result: ReaderResult) -> None:
    """The reader process, then how long ingestion takes to resume. The file's stamp is watched first
    (stat takes no lock, so watching cannot delay the daemon's writer); the count of runs is read only
    once the stamp moved, in short connections."""
    proc = subprocess.Popen([sys.executable, "-c", READER, str(ledger), str(hold)], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    assert proc.stdout is not None
    opened = json.loads(proc.stdout.readline() or "null")
    if not opened:
        proc.wait()
        result.error = f"the reader could not open the ledger: {proc.stderr.read()[-500:] if proc.stderr else ''}"
        return
    result.opened_at, result.runs_held = opened["opened"] - t0, int(opened["runs"])
    before = ledger_stamp(ledger)
    print(f"soak: reader holds runs.duckdb from {result.opened_at:.0f}s for {hold:.0f}s "
          f"({result.runs_held} runs in it)", flush=True)
    left = json.loads(proc.stdout.readline() or "null")
    proc.wait()
    if not left:
        result.error = "the reader did not finish"
        return
    result.left_at = left["left"] - t0
    result.changed_while_held = ledger_stamp(ledger) != before
    deadline = left["left"] + RESUME_WAIT
    while time.monotonic() < deadline:
        now = time.monotonic()
        if ledger_stamp(ledger) != before:
            if result.written_after is None:
                result.written_after = now - left["left"]
            count = count_runs(ledger, deadline)
            if count is not None and count > result.runs_held:
                result.grown_after, result.runs_then = time.monotonic() - left["left"], count
                return
            before = ledger_stamp(ledger)  # written without new runs: wait for the next write
        time.sleep(0.01)
    result.notes.append(f"the ledger's runs did not grow within {RESUME_WAIT:.0f}s of the reader leaving")


# -- after the stop: what the daemon says it ended, and what the ledger holds ----------------------

def daemon_log_lines(home: Path) -> list[str]:
    """The daemon's log, oldest rotated file first."""
    logs = home / "logs"
    files = sorted(logs.glob("agent_orchestrator.log.*"), key=lambda p: -int(p.suffix[1:]) if p.suffix[1:].isdigit()
                   else 0)
    lines: list[str] = []
    for path in [*files, logs / "agent_orchestrator.log"]:
        if path.exists():
            lines += path.read_text(errors="replace").splitlines()
    return lines


def ended_in_logs(home: Path, lines: list[str]) -> tuple[dict[str, str], set[str]]:
    """Runs the daemon's log says ended ({run id: status}), and runs the agents' logs say ended."""
    ended: dict[str, str] = {}
    for line in lines:
        m = ENDED.search(line) or RECORDED.search(line)
        if m and (m.re is ENDED or m.group(1) not in ended):  # a retry's line does not undo an 'ended'
            ended[m.group(1)] = m.group(3)
    agents: set[str] = set()
    for path in (home / "logs" / "agents").glob("*.log*"):
        for line in path.read_text(errors="replace").splitlines():
            if m := AGENT_ENDED.match(line):
                agents.add(m.group(1))
    return ended, agents


@dataclass
class Ledger:
    status: dict[str, str]  # run id: status
    started: set[str]  # runs with a start time
    incomplete: dict[str, str]  # run id: what is wrong with its events
    events: int
    audited: int  # audit rows of the soak's token (one per API request)
    slowest: tuple[float, str] | None  # the slowest audited request as the daemon timed it (ms, route)


def read_ledger(path: Path) -> Ledger:
    con = duckdb.connect(str(path), read_only=True)
    try:
        runs = con.execute("SELECT run_id, status, started_at IS NOT NULL FROM runs").fetchall()
        per_run = con.execute("SELECT run_id, count(*), count(DISTINCT seq), min(seq), max(seq), arg_max(kind, seq) "
                              "FROM run_events GROUP BY run_id").fetchall()
        events_row = con.execute("SELECT count(*) FROM run_events").fetchone()
        audited = con.execute("SELECT count(*) FROM audit WHERE actor = ?", [TOKEN_NAME]).fetchone()
        slowest = con.execute("SELECT TRY_CAST(json_extract(detail, '$.ms') AS DOUBLE) ms, action FROM audit "
                              "WHERE actor = ? ORDER BY ms DESC NULLS LAST LIMIT 1", [TOKEN_NAME]).fetchone()
    finally:
        con.close()
    status = {r[0]: r[1] for r in runs}
    started = {r[0] for r in runs if r[2]}
    seen = {r[0]: r for r in per_run}
    incomplete: dict[str, str] = {}
    for run_id in status:
        row = seen.get(run_id)
        if row is None:
            if run_id in started:
                incomplete[run_id] = "no events"
            continue  # never started: no events to expect
        _, n, distinct, low, high, last = row
        if not (n == distinct == high and low == 1):
            incomplete[run_id] = f"seq {low}..{high} for {n} events ({distinct} distinct)"
        elif last != "status":
            incomplete[run_id] = f"last event is {last!r}, not 'status'"
    for run_id in seen.keys() - status.keys():
        incomplete[run_id] = "events without a run row"
    return Ledger(status, started, incomplete, int(events_row[0]) if events_row else 0,
                  int(audited[0]) if audited else 0,
                  (float(slowest[0]), str(slowest[1])) if slowest and slowest[0] is not None else None)


def set_aside_rows(home: Path) -> Counter[str] | None:
    """Rows in journal_rejected by ledger table (None: no such table), read-only. Only the table's
    existence and count are relied on; the breakdown by its `tbl` column is given when it has one."""
    con = sqlite3.connect(f"file:{home / 'state.sqlite'}?mode=ro", uri=True)
    try:
        if not con.execute("SELECT 1 FROM sqlite_master WHERE name = 'journal_rejected'").fetchone():
            return None
        cols = {r[1] for r in con.execute("PRAGMA table_info(journal_rejected)")}
        if "tbl" in cols:
            return Counter({str(t): int(n) for t, n in con.execute("SELECT tbl, count(*) FROM journal_rejected "
                                                                    "GROUP BY tbl")})
        return Counter({"rows": int(con.execute("SELECT count(*) FROM journal_rejected").fetchone()[0])})
    finally:
        con.close()


# -- the checks: each prints its figures and adds the goals it missed to ``reasons`` ------------------

def human(n: float) -> str:
    for unit in ("B", "KiB", "MiB"):
        if abs(n) < 1024:
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n:.1f} GiB"


def check_runs(home: Path, lines: list[str], ledger: Ledger, reasons: list[str]) -> None:
    """Every run a log says ended is in the ledger, terminal, with the same status and all its events."""
    ended, agent_ended = ended_in_logs(home, lines)
    terminal = {r for r, s in ledger.status.items() if s in TERMINAL}
    everything_ended = ended.keys() | agent_ended
    missing = sorted(everything_ended - terminal)
    unfinished = sorted(r for r, s in ledger.status.items() if s not in TERMINAL)
    statuses = ", ".join(f"{s} {n}" for s, n in Counter(ended.values()).most_common())
    print(f"soak: runs ended per the daemon's log: {len(ended)} ({statuses}); per the agents' logs: {len(agent_ended)}")
    print(f"soak: runs in the ledger with a terminal status: {len(terminal)} (of {len(ledger.status)} rows; "
          f"{len(unfinished)} not terminal); ended but missing from the ledger: {len(missing)}"
          + (f": {', '.join(missing[:10])}" if missing else ""))
    if not ended:
        reasons.append("no run ended")
    if missing:
        reasons.append(f"{len(missing)} ended run(s) missing from the ledger")
    if unfinished:
        print(f"soak: ledger runs left queued or running after the stop: {len(unfinished)}: "
              f"{', '.join(unfinished[:10])}")
        reasons.append(f"{len(unfinished)} ledger run(s) not terminal after the stop")
    differ = sorted(r for r, st in ended.items() if r in terminal and ledger.status[r] != st)
    if differ:
        print(f"soak: runs whose ledger status is not the one the log ended them with: {len(differ)}: "
              + ", ".join(f"{r} (log {ended[r]}, ledger {ledger.status[r]})" for r in differ[:10]))
        reasons.append(f"{len(differ)} run(s) with another status in the ledger than in the log")
    extra = sorted(terminal - everything_ended)
    if extra:
        print(f"soak: ledger runs no log says ended: {len(extra)}: {', '.join(extra[:10])}")

    never_started = len(ledger.status.keys() - ledger.started)
    print(f"soak: ledger events: {ledger.events} for {len(ledger.started)} started runs ({never_started} never "
          f"started, no events expected); runs with incomplete events: {len(ledger.incomplete)}"
          + "".join(f"\n       {r}: {why}" for r, why in list(ledger.incomplete.items())[:10]))
    if ledger.incomplete:
        reasons.append(f"{len(ledger.incomplete)} run(s) with incomplete events")


def check_set_aside(home: Path, lines: list[str], reasons: list[str]) -> None:
    """Rows set aside are a goal missed only when the daemon kept quiet about them; errors are shown."""
    rejected = set_aside_rows(home)
    aside = sum(rejected.values()) if rejected else 0
    said = [line for line in lines if "rejected" in line.lower() or "set aside" in line.lower()]
    table = "absent" if rejected is None else f"{aside}" + (
        f" ({', '.join(f'{t} {n}' for t, n in rejected.most_common())})" if rejected and aside else "")
    print(f"soak: rows set aside: journal_rejected {table}; daemon log lines saying rejected/set aside: {len(said)}"
          + "".join(f"\n       {line[:200]}" for line in said[:5]))
    if aside and not said:
        reasons.append(f"{aside} row(s) set aside without a word in the log")
    errors = [line for line in lines if " ERROR " in line or "Traceback" in line]
    if errors:
        print(f"soak: daemon log ERROR lines: {len(errors)}" + "".join(f"\n       {e[:200]}" for e in errors[:5]))


def check_api(bursts: list[Burst], ledger: Ledger, reasons: list[str]) -> None:
    """Status codes, latency overall, per burst and per route, and the audit table's count of requests."""
    hits = [h for b in bursts for h in b.hits]
    if not hits:
        reasons.append("no API burst ran")
        return
    codes = Counter(h.status for h in hits)
    five = sum(n for c, n in codes.items() if c >= 500)
    lost = codes.get(0, 0)
    refused = sum(n for c, n in codes.items() if 300 <= c < 500)  # the soak asks only for what exists
    lat = [h.latency for h in hits]
    listed = ", ".join(f"{c if c else 'no answer'}: {n}" for c, n in sorted(codes.items()))
    print(f"soak: API: {len(hits)} GETs in {len(bursts)} bursts; status codes {listed}; 5xx: {five}")
    p99s = [(pct([h.latency for h in b.hits], .99), b) for b in bursts]
    worst_p99, worst = max(p99s, key=lambda pair: pair[0])
    print(f"soak: API read latency overall: p50 {pct(lat, .5) * 1000:.1f} ms, p99 {pct(lat, .99) * 1000:.1f} ms; "
          f"worst burst (at {worst.at:.0f}s) p99 {worst_p99 * 1000:.1f} ms (goal < {P99_GOAL * 1000:.0f} ms)")
    print("soak: API p50/p99 per burst: " + ", ".join(
        f"{b.at:.0f}s {pct([h.latency for h in b.hits], .5) * 1000:.0f}/{p99 * 1000:.0f} ms" for p99, b in p99s))
    for route in sorted({h.route for h in hits}):
        mine = [h.latency for h in hits if h.route == route]
        odd = Counter(h.status for h in hits if h.route == route and h.status != 200)
        print(f"       {route:24s} {len(mine):5d}  p50 {pct(mine, .5) * 1000:7.1f} ms  "
              f"p99 {pct(mine, .99) * 1000:7.1f} ms"
              + (f"  not 200: {', '.join(f'{c}: {n}' for c, n in sorted(odd.items()))}" if odd else ""))
    answered = len(hits) - lost
    print(f"soak: API requests in the ledger's audit table: {ledger.audited} of {answered} answered"
          + (f"; slowest as the daemon timed it: {ledger.slowest[0]:.0f} ms ({ledger.slowest[1]})"
             if ledger.slowest else ""))
    if pct(lat, .99) >= P99_GOAL:
        reasons.append(f"API p99 {pct(lat, .99) * 1000:.0f} ms")
    elif worst_p99 >= P99_GOAL:
        reasons.append(f"API p99 {worst_p99 * 1000:.0f} ms in the burst at {worst.at:.0f}s")
    if five:
        reasons.append(f"{five} 5xx")
    if refused:
        reasons.append(f"{refused} 4xx (reads of what the API had just listed)")
    if lost:
        reasons.append(f"{lost} request(s) unanswered")
    if ledger.audited < answered:
        reasons.append(f"{answered - ledger.audited} API request(s) missing from the audit table")


def check_reader(reader: ReaderResult, reasons: list[str]) -> None:
    if reader.error:
        print(f"soak: reader: {reader.error}")
        reasons.append("the reader failed")
        return
    if reader.left_at is None:
        reasons.append("the reader did not run")
        return
    wrote = f"{reader.written_after:.2f} s" if reader.written_after is not None else "never"
    grew = f"{reader.grown_after:.2f} s" if reader.grown_after is not None else "never"
    print(f"soak: reader held the ledger {reader.opened_at:.0f}s..{reader.left_at:.0f}s; after it left the ledger "
          f"file was written in {wrote}, its runs grew ({reader.runs_held} -> {reader.runs_then}) in {grew} "
          f"(goal < {RESUME_GOAL:.0f} s)"
          + ("; the file changed while it was held" if reader.changed_while_held else "")
          + "".join(f"; {n}" for n in reader.notes))
    if reader.grown_after is None or reader.grown_after >= RESUME_GOAL:
        reasons.append(f"ingestion resumed {grew} after the reader left")


def check_disk(samples: list[Sample], after_stop: Sample, left: int, duration: float, reasons: list[str]) -> None:
    """A small table (start, after the first minute, middle, end, after the stop) and the flatness goals.
    ``left``: run folders still in scratch after the stop."""
    def at_or_after(at: float) -> Sample:
        return next((s for s in samples if s.at >= at), samples[-1])

    base, end = at_or_after(min(60.0, duration / 2)), samples[-1]  # "after the first minute" (or the middle)
    rows = [("start", samples[0]), ("base", base), ("middle", at_or_after(duration / 2)), ("end", end),
            ("after stop", after_stop)]
    print(f"soak: disk, sampled every {SAMPLE_EVERY:.0f} s (base: after the first minute)")
    print(f"       {'':10s} {'at':>6s} {'state.sqlite*':>14s} {'scratch':>10s} {'entries':>8s} {'ledger':>10s}")
    for label, s in rows:
        print(f"       {label:10s} {s.at:5.0f}s {human(s.state):>14s} {human(s.scratch):>10s} {s.entries:8d} "
              f"{human(s.ledger):>10s}")
    print(f"soak: disk end/base: state {end.state / max(base.state, 1):.2f}x, scratch {human(end.scratch)} vs "
          f"{human(base.scratch)}, scratch entries {end.entries} vs {base.entries} (peak "
          f"{max(s.entries for s in samples)}); run folders left in scratch after the stop: {left} "
          f"(goal: end <= {GROWTH_GOAL:.0f}x base)")
    if end.state > GROWTH_GOAL * base.state:
        reasons.append(f"live state grew {end.state / max(base.state, 1):.1f}x")
    if end.scratch > max(GROWTH_GOAL * base.scratch, base.scratch + SCRATCH_SLACK_BYTES):
        reasons.append(f"scratch grew to {human(end.scratch)}")
    if end.entries > max(GROWTH_GOAL * base.entries, base.entries + SCRATCH_SLACK_ENTRIES):
        reasons.append(f"scratch entries grew to {end.entries}")
    if left:
        reasons.append(f"{left} run folder(s) left in scratch after the stop")


def scratch_left(home: Path) -> int:
    """Run folders (HOME/scratch/CLIENT/RUN_ID) still there."""
    scratch = home / "scratch"
    return sum(len(list(c.iterdir())) for c in scratch.iterdir() if c.is_dir()) if scratch.is_dir() else 0


# -- the soak --------------------------------------------------------------------------------------

def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench soak",
                                     description="An operator's daily load on a real daemon; was anything lost?")
    parser.add_argument("--minutes", type=float, default=12.0, help="how long the load runs (default 12)")
    parser.add_argument("--keep", action="store_true", help="keep the soak's folder (home, logs) at the end")
    args = parser.parse_args(sys.argv[1:])
    duration = args.minutes * 60
    hold = READER_HOLD * min(1.0, args.minutes / 3)
    reader_start = max(0.0, duration / 2 - hold / 2)  # the hold is centred on the middle

    root = Path(tempfile.mkdtemp(prefix="bench-soak-"))
    home = root / "home"
    wall = time.monotonic()
    reasons: list[str] = []
    proc: subprocess.Popen[bytes] | None = None
    try:
        repo, inbox = make_repo(root)
        port = free_port()
        proc = start_daemon(home, repo, port, root / "serve.out")
        token = create_token(home)
        print(f"soak: {args.minutes:g} min against a daemon (home {home}, API :{port}); {TICKERS} agents every 2 s, "
              f"a watcher fed every {FILE_EVERY:.0f} s, {BURST_REQUESTS} GETs every {BURST_EVERY:.0f} s, "
              f"a reader holding the ledger {hold:.0f} s from {reader_start:.0f} s", flush=True)

        t0 = time.monotonic()
        done = threading.Event()
        samples: list[Sample] = []
        bursts: list[Burst] = []
        reader = ReaderResult()

        def every(period: float, first: float, fn: Callable[[float], None]) -> threading.Thread:
            """Call fn(seconds into the soak) at first, first + period, ... until the soak's end."""
            def loop() -> None:
                k = 0
                while not done.is_set():
                    at = first + k * period
                    if at > duration or done.wait(max(0.0, t0 + at - time.monotonic())):
                        return
                    fn(time.monotonic() - t0)
                    k += 1
            thread = threading.Thread(target=loop, daemon=True)
            thread.start()
            return thread

        def write_file(at: float) -> None:
            (inbox / f"note-{at:07.1f}.txt").write_text(f"written at {at:.1f}s\n")

        def do_burst(at: float) -> None:
            hits = burst(port, token)
            bursts.append(Burst(at, hits))
            lat = [h.latency for h in hits]
            bad = sum(1 for h in hits if h.status >= 500 or h.status == 0)
            print(f"soak: burst {len(bursts)} at {at:5.0f}s: {len(hits)} GETs, p50 {pct(lat, .5) * 1000:6.1f} ms, "
                  f"p99 {pct(lat, .99) * 1000:6.1f} ms, 5xx or no answer {bad}", flush=True)

        loops = [every(SAMPLE_EVERY, 0.0, lambda at: samples.append(sample(home, at))),
                 every(FILE_EVERY, 1.0, write_file),
                 every(BURST_EVERY, BURST_FIRST, do_burst)]
        time.sleep(max(0.0, t0 + reader_start - time.monotonic()))
        reading = threading.Thread(target=run_reader, args=(home / "runs.duckdb", hold, t0, reader), daemon=True)
        reading.start()
        time.sleep(max(0.0, t0 + duration - time.monotonic()))
        done.set()
        for thread in loops:
            thread.join()
        reading.join(timeout=RESUME_WAIT + hold + 5)
        samples.append(sample(home, time.monotonic() - t0))  # the end, under load

        code, stop_seconds = stop_daemon(proc)
        after_stop = sample(home, time.monotonic() - t0)
        print(f"soak: daemon stopped by SIGTERM in {stop_seconds:.1f} s, exit code {code}", flush=True)
        if code != 0:
            reasons.append(f"daemon exit {code} on SIGTERM" if code is not None else "daemon hung on SIGTERM")

        lines = daemon_log_lines(home)
        ledger = read_ledger(home / "runs.duckdb")
        check_runs(home, lines, ledger, reasons)
        check_set_aside(home, lines, reasons)
        check_api(bursts, ledger, reasons)
        check_reader(reader, reasons)
        check_disk(samples, after_stop, scratch_left(home), duration, reasons)
    except Exception as exc:  # a benchmark reports; it does not die with a traceback and no verdict
        import traceback

        traceback.print_exc()
        reasons.append(f"the soak itself failed: {type(exc).__name__}: {exc}")
    finally:
        if proc is not None and proc.poll() is None:  # the soak failed with the daemon still up
            stop_daemon(proc)
        if args.keep:
            print(f"soak: kept {root}")
        else:
            shutil.rmtree(root, ignore_errors=True)
    print(f"soak: {time.monotonic() - wall:.0f} s in all")
    print("soak: PASS" if not reasons else f"soak: FAIL ({'; '.join(reasons)})", flush=True)


if __name__ == "__main__":
    main()
