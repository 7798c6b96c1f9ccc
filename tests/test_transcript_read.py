"""Reading runs (issue 12): the transcript, and the one read path over the live store and the ledger.

A real daemon (`agentctl serve`, a real spec repository, plain HTTP) and the real agentctl in a subprocess.
The transcript's agent reads a note, is refused /etc/passwd, fails on a missing file, reaches a port where
nothing listens (through the egress proxy, which answers 502), remembers, and answers: each kind of step is
there. Reads are checked not to write: with the daemon's flusher held back (an hour between flushes), every
GET and every CLI read leaves the journal and the ledger file as they were, and still finds the run (in the
live store). A run reads the same, as one JSON document, while live and once archived. Every wait is a
bounded poll.
"""

from __future__ import annotations

import json
import re
import socket
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_helpers import Served, poll, scripted, serve
from conftest import agentctl
from daemon_helpers import state_rows

from runner.ledger.runs import get_run, list_runs

STAMP = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z")
NOTE = "invoice 42 is overdue\n"
ANSWER = "The note says invoice 42 is overdue."
SAID = "Reading the note first."
PASSWD_LINE = "root:x:0:0"  # what /etc/passwd would show, had the denied call been run


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


CLOSED = closed_port()  # nothing listens there: the proxy lets the call out, and answers 502


def scribe(data: Path) -> dict[str, Any]:
    return scripted("scribe", [
        {"content": SAID, "usage": {"input_tokens": 120, "output_tokens": 30}, "tool_calls": [
            {"name": "file_reader", "args": {"path": str(data / "note.txt")}},
            {"name": "file_reader", "args": {"path": "/etc/passwd"}},
            {"name": "file_reader", "args": {"path": str(data / "missing.txt")}},
            {"name": "http_get", "args": {"url": f"http://127.0.0.1:{CLOSED}/"}}]},
        {"content": ANSWER, "usage": {"input_tokens": 200, "output_tokens": 20}},
    ], tools=[{"name": "file_reader", "paths": [str(data)]}, {"name": "http_get"}],
        constraints={"allowed_domains": ["local"]}, memory={"type": "vector_db", "recall": 3}, overlap="queue")


@pytest.fixture(scope="module")
def main(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("reads")
    data = base / "data"
    data.mkdir()
    (data / "note.txt").write_text(NOTE)
    served = serve(base, {**scribe(data), **scripted("quick", [{"content": "done"}], overlap="queue")})
    try:
        yield served
    finally:
        served.stop()


def run_now(served: Served, agent: str, text: str | None = None) -> str:
    reply = served.api("POST", f"/agents/{agent}/runs", role="operator", body={"input": text} if text else None)
    assert reply.status == 202, reply.body
    return str(reply.json["run_id"])


def show(served: Served, *args: str) -> subprocess.CompletedProcess[str]:
    done = agentctl(*args, home=served.home, env=served.env)
    assert done.returncode == 0 and "Traceback" not in done.stderr, done.stdout + done.stderr
    return done


def times_of(value: Any, key: str = "") -> list[tuple[str, Any]]:
    """Every value under a key that names a time (``*_at``, ``ts``), anywhere in ``value``."""
    if isinstance(value, dict):
        return [t for k, v in value.items() for t in times_of(v, k)]
    if isinstance(value, list):
        return [t for v in value for t in times_of(v, key)]
    return [(key, value)] if (key.endswith("_at") or key in ("ts", "next_run")) and value is not None else []


def assert_one_time_format(*documents: Any) -> None:
    found = [t for d in documents for t in times_of(d)]
    assert found, "no times found"
    bad = [(k, v) for k, v in found if not (isinstance(v, str) and STAMP.fullmatch(v))]
    assert not bad, bad


# -- the transcript -------------------------------------------------------------------------------------


def test_the_transcript_shows_every_step_in_order_and_no_denied_content(main: Served) -> None:
    run_id = run_now(main, "scribe", "what does the note say?")
    assert main.wait_run(run_id)["status"] == "succeeded"
    reply = main.api("GET", f"/runs/{run_id}/transcript", role="viewer")
    assert reply.status == 200, reply.body
    t = reply.json
    assert (t["run_id"], t["agent"], t["status"]) == (run_id, "scribe", "succeeded")
    assert t["input"] == "what does the note say?" and t["output"] == ANSWER and t["error"] is None
    steps = t["steps"]
    assert [s["seq"] for s in steps] == list(range(1, len(steps) + 1)), steps
    types = [s["type"] for s in steps]
    # In order: memory recalled before the first model call; the calls it asked for after it, the egress
    # decision inside the call that made it; the second model call; memory saved; the final status last.
    assert types.count("model_call") == 2 and types[-1] == "status", types
    first, second = (i for i, k in enumerate(types) if k == "model_call")
    calls = [s for s in steps if s["type"] == "tool_call"]
    assert [(c["tool"], c["decision"]) for c in calls] == [("file_reader", "allowed"), ("file_reader", "denied"),
                                                            ("file_reader", "allowed"), ("http_get", "allowed")]
    assert all(first < steps.index(c) < second for c in calls)
    assert types.index("memory_recall") < first < second < types.index("memory_save")

    model = steps[first]
    assert model["model"].startswith("scripted") and (model["input_tokens"], model["output_tokens"]) == (120, 30)
    assert model["tool_calls"] == ["file_reader", "file_reader", "file_reader", "http_get"]
    assert "latency_ms" in model
    assert (model["text"], model["text_chars"]) == (SAID, len(SAID))
    assert steps[second]["text"] == ANSWER and steps[second]["tool_calls"] == []

    read, refused, failed, fetched = calls
    assert read["args"] == {"path": read["args"]["path"]} and read["args"]["path"].endswith("note.txt")
    assert read["result"] == NOTE and read["result_bytes"] == len(NOTE.encode()) and read["error"] is None
    assert refused["args"] == {"path": "/etc/passwd"} and refused["reason"]
    assert set(refused) == {"seq", "ts", "type", "tool", "decision", "args", "reason", "duration_ms"}, refused
    assert failed["error"] and failed["result"] is None
    assert fetched["result"] == "HTTP 502 Bad Gateway" and fetched["error"] is None  # the proxy's answer
    (egress,) = [s for s in steps if s["type"] == "egress"]
    assert (egress["decision"], egress["host"], egress["port"], egress["method"]) == ("allowed", "127.0.0.1", CLOSED,
                                                                                     "GET")
    assert steps.index(egress) < steps.index(fetched)  # decided while the call ran

    recall = steps[types.index("memory_recall")]
    assert recall["found"] == 0 and recall["texts"] == []  # the agent's first run: nothing to remember yet
    saved = steps[types.index("memory_save")]
    assert "what does the note say?" in saved["text"] and ANSWER in saved["text"]
    assert steps[-1]["status"] == "succeeded"
    assert PASSWD_LINE not in reply.text  # nothing of a denied call's target

    s = t["summary"]
    assert (s["status"], s["tokens"], s["input_tokens"], s["output_tokens"]) == ("succeeded", 370, 320, 50)
    assert (s["model_calls"], s["tool_calls"], s["denied"], s["tool_errors"]) == (2, 4, 1, 1)
    assert s["duration_seconds"] is not None and s["duration_seconds"] >= 0
    assert s["cpu_seconds"] is not None and s["cpu_seconds"] > 0 and s["max_rss_mb"] and s["max_rss_mb"] > 0
    assert s["bytes_written"] is not None and s["attempt"] == 1 and s["retry_of"] is None
    assert t["complete"] is True and t["truncated"] is False
    assert_one_time_format(t)

    # The run row says the same counts, and the CLI prints them beside the status.
    row = main.api("GET", f"/runs/{run_id}", role="viewer").json
    assert (row["denied"], row["tool_errors"]) == (1, 1)

    # agentctl show: the same document with --output json; for people, a block per step, denials marked.
    assert json.loads(show(main, "show", run_id, "--output", "json").stdout) == t
    text = show(main, "show", run_id).stdout
    assert f"run {run_id} of scribe: succeeded (1 denied, 1 tool error)" in text
    assert SAID in text and ANSWER in text and "what does the note say?" in text
    assert text.count("DENIED") == 1 and f"egress  allowed GET 127.0.0.1:{CLOSED}" in text
    assert "/etc/passwd" in text and PASSWD_LINE not in text
    lines = text.splitlines()
    assert lines.index("input") < lines.index("answer")
    assert [line.split()[1] for line in lines if re.match(r"\s*\d+  \w", line)][-1] == "status"


def test_a_transcript_or_run_of_another_client_or_nobody_is_404(main: Served) -> None:
    for path in ("/runs/0123456789abcdef01234567/transcript", "/runs/not-a-run/transcript",
                 "/runs/0123456789abcdef01234567/events?follow=1"):
        reply = main.api("GET", path, role="viewer")
        assert reply.status == 404 and reply.error()["code"] == "not_found", (path, reply.body)
    assert main.api("GET", "/runs/0123456789abcdef01234567/transcript").status == 401
    assert main.api("GET", "/runs/0123456789abcdef01234567/transcript?x=1", role="viewer").status == 400
    done = agentctl("show", "0123456789abcdef01234567", home=main.home, env=main.env)
    assert done.returncode == 2 and "no run '0123456789abcdef01234567'" in done.stderr, done.stderr


# -- reads never write; live and archived read the same ------------------------------------------------


@pytest.fixture
def held(tmp_path: Path) -> Iterator[Served]:
    """A daemon whose flusher waits an hour: what its runs write stays in the live store."""
    served = serve(tmp_path, scripted("quick", [{"content": "done"}]), env={"AGENT_ORCH_FLUSH_INTERVAL": "3600"})
    try:
        yield served
    finally:
        served.stop()


def live_rows(home: Path) -> dict[str, int]:
    rows = state_rows(home, "SELECT tbl, count(*) AS n FROM journal WHERE tbl IN ('runs', 'run_events') GROUP BY tbl")
    return {r["tbl"]: r["n"] for r in rows}


def ledger_file(home: Path) -> tuple[int, int] | None:
    path = home / "runs.duckdb"
    return (path.stat().st_mtime_ns, path.stat().st_size) if path.exists() else None


def test_reads_never_write_and_a_run_reads_the_same_live_and_archived(held: Served) -> None:
    run_id = run_now(held, "quick", "hello")
    row = held.wait_run(run_id)  # read from the live store: nothing is archived for an hour
    assert row["status"] == "succeeded" and row["output"] == "done"
    poll(lambda: live_rows(held.home).get("runs", 0) >= 1 and any(
        r["n"] for r in state_rows(held.home, "SELECT count(*) AS n FROM journal WHERE run_id = ? AND "
                                   "json_extract(row, '$.kind') = 'status'", (run_id,))), "the run's rows, live")
    before, ledger_before = live_rows(held.home), ledger_file(held.home)

    listed = held.api("GET", "/runs?agent=quick", role="viewer").json["runs"]
    one = held.api("GET", f"/runs/{run_id}", role="viewer").json
    events = held.api("GET", f"/runs/{run_id}/events", role="viewer").json["events"]
    streamed = held.api("GET", f"/runs/{run_id}/events?follow=1", role="viewer")
    script = held.api("GET", f"/runs/{run_id}/transcript", role="viewer").json
    agents = held.api("GET", "/agents", role="viewer").json["agents"]
    agent = held.api("GET", "/agents/quick", role="viewer").json
    shown = json.loads(show(held, "show", run_id, "--output", "json").stdout)
    history = json.loads(show(held, "history", "--output", "json").stdout)
    show(held, "history", "--sql", "select count(*) from runs")  # a daemon runs: it alone moves the journal
    show(held, "status")

    assert listed == [one] and one["run_id"] == run_id and one["status"] == "succeeded"
    assert events and events[-1]["kind"] == "status" and events[-1]["name"] == "succeeded"
    assert streamed.status == 200 and streamed.headers["Content-Type"].startswith("text/event-stream")
    assert f"id: {events[-1]['seq']}\nevent: status\n" in streamed.text
    assert shown == script and script["output"] == "done"
    assert [(h["run_id"], h["status"]) for h in history] == [(run_id, "succeeded")]
    assert agent["last_run"]["run_id"] == run_id and agents[0]["last_run"] == agent["last_run"]
    assert_one_time_format(listed, events, script, agents, history)
    assert live_rows(held.home) == before, "a read moved the run's rows"
    assert ledger_file(held.home) == ledger_before, "a read wrote the ledger"

    held.stop()  # its last flush archives the run; the live store forgets it
    assert not state_rows(held.home, "SELECT run_id FROM run_progress WHERE run_id = ?", (run_id,))
    assert live_rows(held.home) == {}
    conn = sqlite3.connect(held.home / "state.sqlite")
    conn.row_factory = sqlite3.Row
    try:
        archived = get_run(conn, held.home / "runs.duckdb", "default", run_id)
        archived_list = list_runs(conn, held.home / "runs.duckdb", "default", agent="quick")
    finally:
        conn.close()
    assert archived == one and archived_list == ([one], None)
    assert json.loads(show(held, "show", run_id, "--output", "json").stdout) == script


# -- metrics: counted from what the flusher archives, carried over a restart ---------------------------


def counters(served: Served, agent: str) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    reply = served.api("GET", "/metrics", role="viewer")
    assert reply.status == 200, reply.body
    wanted = {"agent_orch_runs_total": "runs", "agent_orch_run_denied_tool_calls_total": "denied",
              "agent_orch_run_tool_errors_total": "tool_errors", "agent_orch_run_cpu_seconds_total": "cpu",
              "agent_orch_run_written_bytes_total": "written", "agent_orch_tokens_total": "tokens"}
    found = dict.fromkeys(wanted.values(), 0.0)
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            if sample.name in wanted and sample.labels.get("agent") == agent:
                found[wanted[sample.name]] += sample.value
    return found


def test_metrics_count_denials_errors_and_cost_and_survive_a_restart(tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "note.txt").write_text(NOTE)
    served = serve(tmp_path, scribe(data))
    try:
        ids = [run_now(served, "scribe", f"run {i}") for i in range(2)]
        assert [served.wait_run(i)["status"] for i in ids] == ["succeeded"] * 2
        counted = poll(lambda: (c := counters(served, "scribe"))["runs"] == 2 and c, "the two runs to be counted")
        assert (counted["denied"], counted["tool_errors"], counted["tokens"]) == (2, 2, 740)
        assert counted["cpu"] > 0 and counted["written"] >= 0
        served.stop()
        served.start()  # the counters start from the ledger's totals, not from zero
        again = counters(served, "scribe")
        assert again["cpu"] == pytest.approx(counted["cpu"])  # summed in another order
        assert {**again, "cpu": 0} == {**counted, "cpu": 0}
    finally:
        served.stop()
