"""Events (issue 15): webhooks into runs, beside the bare API in the same daemon and the same run.

- accepted: BENCH_EVENTS (500) signed webhook POSTs from 8 concurrent keep-alive senders, each with its own
  dedupe key: the time from sending a POST to its 202 (the delivery durable, its run queued), p50 and p99, and
  events accepted per second; beside the same number of authenticated GET /agents/v1/agents from the same
  senders (the bare API: token lookup, audit, the page cache).
- webhook to run start: 30 events one at a time, each from sending its POST to its run's started_at (the
  supervisor's stamp once the run is handed to its sandbox), median and p99; beside `agentctl run` of the same
  agent started over the control socket (submit to started_at), which is the run path without the webhook.

The runs queue behind one another (overlap: queue) and are trivial scripted ones; every delivery is checked in
the ledger (one started delivery and one run per event, none lost).

- an agent asked as a tool: BENCH_TOOL_ROUNDS (20) rounds, each of three runs one after another over the control
  socket (each waited for): the callee alone; a caller that answers at once (two model turns, no tool); a caller
  that asks the callee once, then answers. The call's cost is (caller asking - caller alone), beside the callee's
  own run: the overhead is what the call adds over a direct run of the callee. Medians.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from datetime import datetime
from pathlib import Path

from bench import ENV, commit_all
from bench.api import free_port, wait_http
from bench.daemon import start_daemon, stop
from runner.supervise.control import call, socket_path

EVENTS = int(os.environ.get("BENCH_EVENTS", "500"))
SENDERS = 8
STARTS = 30
SECRET = "bench-secret"
TOOL_ROUNDS = int(os.environ.get("BENCH_TOOL_ROUNDS", "20"))


def make_repo(root: Path) -> Path:
    repo = root / "repo"
    (repo / "specs" / "_scripts").mkdir(parents=True)
    (repo / "specs" / "_scripts" / "done.yaml").write_text("turns:\n  - content: done\n")
    (repo / "specs" / "_scripts" / "alone.yaml").write_text(
        "turns:\n  - content: thinking\n  - content: done\n")
    (repo / "specs" / "_scripts" / "asking.yaml").write_text(
        "turns:\n  - tool_calls: [{name: ask_callee, args: {question: hi}}]\n  - content: done\n")
    (repo / "specs" / "callee.yaml").write_text(
        "name: callee\ndescription: trivial\nmodel: scripted:_scripts/done.yaml\noverlap: queue\n")
    (repo / "specs" / "alone.yaml").write_text(
        "name: alone\ndescription: trivial\nmodel: scripted:_scripts/alone.yaml\noverlap: queue\n")
    (repo / "specs" / "asking.yaml").write_text(
        "name: asking\ndescription: asks\nmodel: scripted:_scripts/asking.yaml\noverlap: queue\n"
        "tools:\n  - name: ask_callee\n    agent: callee\n")
    (repo / "specs" / "hooked.yaml").write_text(
        "name: hooked\ndescription: trivial\nmodel: scripted:_scripts/done.yaml\noverlap: queue\n"
        "triggers:\n  - type: webhook\n    secret_env: BENCH_HOOK_SECRET\n"
        "    dedupe: \"{{ headers['X-Delivery'] }}\"\n")
    commit_all(repo, "agents")
    return repo


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(len(ordered) * q))]


def _load(port: int, requests: list[tuple[str, str, bytes | None, dict[str, str]]]) -> tuple[list[float], float, int]:
    """Send ``requests`` from SENDERS keep-alive connections; (latencies, seconds, errors)."""
    lat: list[float] = []
    errors = [0]
    lock = threading.Lock()
    todo = list(enumerate(requests))

    def worker() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        mine = []
        while True:
            with lock:
                if not todo:
                    break
                _, (method, path, body, headers) = todo.pop()
            t = time.perf_counter()
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            resp.read()
            mine.append(time.perf_counter() - t)
            if resp.status not in (200, 202):
                with lock:
                    errors[0] += 1
        with lock:
            lat.extend(mine)

    started = time.perf_counter()
    threads = [threading.Thread(target=worker) for _ in range(SENDERS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return lat, time.perf_counter() - started, errors[0]


def _hook(i: int) -> tuple[str, str, bytes, dict[str, str]]:
    body = json.dumps({"event": i}).encode()
    sig = "sha256=" + hmac.new(SECRET.encode(), body, hashlib.sha256).hexdigest()
    return ("POST", "/agents/v1/hooks/events/default/hooked", body,
            {"X-Hub-Signature-256": sig, "X-Delivery": f"e{i}", "Content-Type": "application/json"})


def _started_at(home: Path, run_id: str) -> float | None:
    from runner.ledger.runs import get_run
    from runner.state import connect

    conn = connect(home / "state.sqlite")
    try:
        run = get_run(conn, home / "runs.duckdb", "default", run_id)
    finally:
        conn.close()
    stamp = run.get("started_at") if run else None
    return datetime.fromisoformat(str(stamp).replace("Z", "+00:00")).timestamp() if stamp else None


def _wait_started(home: Path, run_id: str) -> float:
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        at = _started_at(home, run_id)
        if at is not None:
            return at
        time.sleep(0.005)
    raise RuntimeError(f"run {run_id} never started")


def _idle(home: Path) -> None:
    sock = socket_path(home, "default")
    deadline = time.monotonic() + 600
    while time.monotonic() < deadline:
        about = call(sock, {"op": "ping"}) or {}
        if not about.get("running") and not about.get("queued"):
            return
        time.sleep(0.05)
    raise RuntimeError("the runs never ended")


def _timed_run(home: Path, agent: str) -> float:
    """Seconds from submitting a run over the control socket to its answer (it waits for the end)."""
    t = time.perf_counter()
    reply = call(socket_path(home, "default"), {"op": "run", "agent": agent, "requested_by": "bench"}, timeout=120)
    if not reply or reply.get("status") != "succeeded":
        raise RuntimeError(f"run of {agent}: {reply}")
    return time.perf_counter() - t


def _tool_rounds(home: Path) -> dict[str, float]:
    for agent in ("callee", "alone", "asking"):  # warm each path once
        _timed_run(home, agent)
    times: dict[str, list[float]] = {"callee": [], "alone": [], "asking": []}
    for _ in range(TOOL_ROUNDS):
        for agent in times:
            times[agent].append(_timed_run(home, agent))
    return {agent: statistics.median(values) for agent, values in times.items()}


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-events-"))
    proc = None
    try:
        repo = make_repo(root)
        home = root / "home"
        port = free_port()
        proc = start_daemon(home, repo, serve=("--port", str(port)), out=root / "daemon.log",
                            BENCH_HOOK_SECRET=SECRET, AGENT_ORCH_MAX_AGENTS="8", **ENV)
        wait_http(port, "/healthz")
        token = subprocess.run([sys.executable, "-m", "runner", "--home", str(home), "token", "create", "--role",
                                "viewer", "--name", "bench"], capture_output=True, text=True, check=True,
                               env={**os.environ, "AGENT_ORCH_SOURCE": str(repo)}).stdout.strip()
        gets = [("GET", "/agents/v1/agents", None, {"Authorization": f"Bearer {token}"})] * EVENTS
        _load(port, gets[:50])  # warm both paths (connections, caches, the page)
        _load(port, [_hook(-i - 1) for i in range(20)])
        _idle(home)
        base_lat, base_s, base_err = _load(port, gets)
        hook_lat, hook_s, hook_err = _load(port, [_hook(i) for i in range(EVENTS)])
        _idle(home)
        # webhook to run start, one at a time; then the same agent started over the control socket
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
        to_start, direct = [], []
        for i in range(STARTS):
            method, path, body, headers = _hook(EVENTS + i)
            sent = time.time()
            conn.request(method, path, body=body, headers=headers)
            resp = conn.getresponse()
            answer = json.loads(resp.read())
            to_start.append(_wait_started(home, answer["run_id"]) - sent)
            _idle(home)
            sent = time.time()
            reply = call(socket_path(home, "default"), {"op": "run", "agent": "hooked", "wait": False,
                                                         "requested_by": "bench"}) or {}
            direct.append(_wait_started(home, str(reply["run_id"])) - sent)
            _idle(home)
        tool = _tool_rounds(home)
        from runner.ledger.deliveries import list_deliveries
        from runner.state import connect

        c = connect(home / "state.sqlite")
        rows = list_deliveries(c, "default", trigger="hooked", limit=100_000)
        c.close()
        started = sum(1 for d in rows if d.decision == "started")
    finally:
        if proc is not None:
            stop(proc)
        shutil.rmtree(root, ignore_errors=True)
    ms = 1000
    hook_rate, base_rate = EVENTS / hook_s, EVENTS / base_s
    print(f"events: {EVENTS} signed webhooks from {SENDERS} senders: accepted in p50 "
          f"{statistics.median(hook_lat) * ms:.1f} ms, p99 {_percentile(hook_lat, 0.99) * ms:.1f} ms, "
          f"{hook_rate:.0f} events/s ({hook_err} errors) | baseline GET /agents: p50 "
          f"{statistics.median(base_lat) * ms:.1f} ms, p99 {_percentile(base_lat, 0.99) * ms:.1f} ms, "
          f"{base_rate:.0f} req/s ({base_err} errors) | ratio {hook_rate / base_rate:.2f}x the bare API's")
    hook_start, run_start = statistics.median(to_start), statistics.median(direct)
    print(f"events: webhook to run start, {STARTS} one at a time: median {hook_start * ms:.1f} ms, p99 "
          f"{_percentile(to_start, 0.99) * ms:.1f} ms | baseline `run` over the control socket: median "
          f"{run_start * ms:.1f} ms | extra {(hook_start - run_start) * ms:.1f} ms | deliveries started: {started} of "
          f"{EVENTS + STARTS + 20}")
    call_cost = tool["asking"] - tool["alone"]
    print(f"events: an agent asked as a tool, {TOOL_ROUNDS} rounds: the call {call_cost * ms:.1f} ms (caller asking "
          f"{tool['asking'] * ms:.1f} ms - caller alone {tool['alone'] * ms:.1f} ms) | baseline: the callee alone "
          f"{tool['callee'] * ms:.1f} ms | overhead {(call_cost - tool['callee']) * ms:.1f} ms, "
          f"{call_cost / tool['callee']:.2f}x the direct run")

if __name__ == "__main__":
    main()
