"""The daemon, end to end: a real `agentctl serve` in a subprocess, driven through its triggers, its control
socket, git pushes, the CLI and signals, and read back through the ledger, the state database and /proc.

Each test starts its own daemon on its own home and repository (sync interval 300 s, so only requests
reconcile); a fixture stops it (SIGTERM, then SIGKILL) and checks no process it started is left. Agents use
the scripted model; a turn's `sleep` makes a run last. Every wait is a bounded poll, and timing asserts are
loose bounds.
"""

from __future__ import annotations

import itertools
import json
import os
import re
import shutil
import signal
import subprocess
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import pytest
from conftest import SpecRepo, agentctl, git
from daemon_helpers import (
    Daemon,
    children_of,
    journal_pending,
    ledger_rows,
    listed_runs,
    live_in_group,
    poll,
    process_alive,
    progress_of,
    run_duckdb_cli,
    runs_of,
    state_rows,
    status_of,
    wait_ledger,
)
from test_run import expect, scripted_agent, turn

from runner.agent.recording import TERMINAL

Cli = Callable[..., subprocess.CompletedProcess[str]]
MakeDaemon = Callable[..., Daemon]
FINAL = TERMINAL  # a run's final states


@pytest.fixture
def daemons(tmp_path: Path, home: Path, repo: SpecRepo) -> Iterator[MakeDaemon]:
    """Start daemons on this test's home; all are stopped at the end and must leave no process behind."""
    made: list[Daemon] = []

    def make(env: dict[str, str] | None = None, source: Path | None = None, start: bool = True) -> Daemon:
        daemon = Daemon(home, source or repo.path, tmp_path / f"daemon-{len(made)}.log", env)
        made.append(daemon)
        return daemon.start() if start else daemon

    yield make
    problems = []
    for daemon in made:
        if daemon.proc is None or daemon.proc.poll() is not None:
            continue
        try:
            daemon.terminate(timeout=30)
        except AssertionError as exc:
            problems.append(str(exc))
    for daemon in made:
        try:
            poll(lambda: not daemon.processes(), "the daemon's processes to end", timeout=10)  # noqa: B023
        except AssertionError:
            left = daemon.processes()
            for pid in left:
                os.kill(pid, 9)
            problems.append(f"processes left behind by the daemon: {left}")
    assert not problems, "\n".join(problems)


def final_runs(home: Path, agent: str, count: int, timeout: float = 20.0, **match: Any) -> list[dict[str, Any]]:
    """Poll the ledger until ``agent`` has ``count`` finished runs matching ``match``; those runs."""
    def check() -> list[dict[str, Any]] | None:
        rows = runs_of(home, agent)
        if rows is None:
            return None
        done = [r for r in rows if r["status"] in FINAL and all(r[k] == v for k, v in match.items())]
        return done if len(done) >= count else None

    rows: list[dict[str, Any]] = poll(check, f"{count} finished run(s) of {agent} {match or ''}", timeout, 0.1)
    return rows


def running_run(home: Path, agent: str) -> dict[str, Any] | None:
    """The run of ``agent`` in flight (running, with its run process started), if any."""
    rows = [r for r in listed_runs(home, agent, "running") if r["pid"] is not None]
    if not rows:
        return None
    # Who supervises the run is the live store's own business, not part of the run's row: read it there.
    supervisor = state_rows(home, "SELECT launcher_pid FROM run_progress WHERE run_id = ?", (rows[0]["run_id"],))
    return {**rows[0], "launcher_pid": supervisor[0]["launcher_pid"] if supervisor else None}


def slot_of(schedule_input: str) -> str:
    """The slot a scheduled run names in its input ("Scheduled run (slot 2026-...+00:00, cron ...")."""
    found = re.search(r"slot (\S+),", schedule_input)
    assert found, schedule_input
    return found.group(1)


def normalized(text: str) -> str:
    """Output with run ids and timestamps replaced, to compare two runs' output."""
    text = re.sub(r"\b[0-9a-f]{24}\b", "RUN_ID", text)
    return re.sub(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d+)?", "TIME", text)


# -- 1. schedules with a seconds field ------------------------------------------------------------------


def test_a_seconds_schedule_fires_on_time(repo: SpecRepo, home: Path, daemons: MakeDaemon) -> None:
    scripted_agent(repo, "ticker", [turn(content="tick")], triggers=[{"type": "schedule", "cron": "*/2 * * * * *"}])
    scripted_agent(repo, "idle", [turn(content="-")])
    repo.commit()
    daemon = daemons()
    ready = datetime.now(UTC).replace(tzinfo=None)  # the ledger's timestamps are naive UTC

    # Meanwhile, `stop idle` over and over: each one rebuilds the schedule, which must neither drop a slot
    # that is due nor bring back one just fired.
    quiet = threading.Event()

    def refresh() -> None:
        while not quiet.is_set():
            daemon.call({"op": "stop", "agent": "idle"})

    with ThreadPoolExecutor(2) as pool:
        refreshers = [pool.submit(refresh) for _ in range(2)]
        try:
            rows = final_runs(home, "ticker", 3, timeout=15, trigger="schedule")
        finally:
            quiet.set()
        for f in refreshers:
            f.result()
    ran = [r for r in rows if r["status"] == "succeeded"]
    assert len(ran) >= 2, rows
    first = (ran[0]["started_at"] - ready).total_seconds()
    assert first < 5, f"the first scheduled run started {first:.1f}s after the daemon was ready"
    gaps = [(b["started_at"] - a["started_at"]).total_seconds() for a, b in itertools.pairwise(ran)]
    assert all(1 <= g <= 4 for g in gaps), gaps
    # Each run names its slot: whole seconds, two apart, each slot once, none left out.
    slots = sorted(datetime.fromisoformat(slot_of(r["input"])) for r in rows)
    assert all(s.second % 2 == 0 for s in slots), slots
    assert [(b - a).total_seconds() for a, b in itertools.pairwise(slots)] == [2.0] * (len(slots) - 1), slots


# -- 2. file changes: a burst is one run; a folder deleted and made again is still watched --------------


def test_a_burst_of_files_makes_one_run(repo: SpecRepo, home: Path, daemons: MakeDaemon, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    scripted_agent(repo, "batcher", [turn(content="seen")],
                   triggers=[{"type": "file_change", "path": str(inbox), "patterns": ["*.csv"], "debounce": 1}])
    repo.commit()
    daemons()
    watched = Path(os.path.realpath(inbox))

    for i in range(1000):
        (inbox / f"part-{i:04d}.csv").write_text(f"{i},x\n")
        if i % 10 == 0:
            (inbox / f"note-{i:04d}.txt").write_text("not a csv\n")
    burst = final_runs(home, "batcher", 1, trigger="file_change")[0]
    assert burst["status"] == "succeeded"
    lines = burst["input"].splitlines()
    assert lines[0] == "1000 file(s) changed:"
    listed = [line[2:] for line in lines[1:] if line.startswith("- ")]
    assert listed == [str(watched / f"part-{i:04d}.csv") for i in range(200)]
    assert lines[-1] == "... and 800 more"

    # A barrier: a file written after the burst's run ended is a run of its own, with only that file. A
    # straggler from the burst would show up in it or as one more run.
    (inbox / "after-burst.csv").write_text("1\n")
    runs = final_runs(home, "batcher", 2, trigger="file_change")
    assert len(runs) == 2, [r["input"][:80] for r in runs]
    assert runs[1]["input"] == f"1 file(s) changed:\n- {watched / 'after-burst.csv'}"

    shutil.rmtree(inbox)
    inbox.mkdir()
    (inbox / "reborn.csv").write_text("2\n")
    runs = final_runs(home, "batcher", 3, trigger="file_change")
    assert runs[2]["input"] == f"1 file(s) changed:\n- {watched / 'reborn.csv'}", runs[2]["input"]


# -- 3. a push reconciles at once -----------------------------------------------------------------------


def test_a_push_reconciles_in_about_a_second(tmp_path: Path, home: Path, daemons: MakeDaemon) -> None:
    bare, work = tmp_path / "central.git", tmp_path / "work"
    git(tmp_path, "init", "-q", "--bare", "-b", "main", str(bare))
    expect(agentctl("hook", "install", str(bare), home=home), 0)
    git(tmp_path, "clone", "-q", str(bare), str(work))

    def push(name: str) -> None:
        target = work / "specs" / f"{name}.yaml"
        target.parent.mkdir(exist_ok=True)
        target.write_text(f"name: {name}\nmodel: llama2\ndescription: pushed agent {name}\n")
        git(work, "add", "-A")
        git(work, "commit", "-q", "-m", f"add {name}")
        git(work, "push", "-q", "origin", "main")

    def applied() -> set[str]:
        return {r["name"] for r in state_rows(home, "SELECT name FROM agents WHERE spec IS NOT NULL")}

    push("first")
    daemons(source=bare)
    assert applied() == {"first"}

    began = time.monotonic()
    push("second")
    pushed = time.monotonic()
    poll(lambda: "second" in applied(), "the pushed agent to be applied", timeout=15, every=0.05)
    print(f"pushed agent applied {time.monotonic() - pushed:.2f}s after the push returned "
          f"({pushed - began:.2f}s in git push with the hooks)")
    done = expect(agentctl("--output", "json", "status", home=home), 0)
    assert {a["name"]: a["state"] for a in json.loads(done.stdout)["agents"]} == {"first": "Ready", "second": "Ready"}
    # the reconcile's row reaches the ledger with the next flush, not with the apply
    wait_ledger(home, "SELECT initiator FROM reconciles", until=lambda rows: any(
        r["initiator"] == "daemon:request" for r in rows), what="the push's reconcile in the ledger")


# -- 4. the ledger is readable while the daemon runs ----------------------------------------------------


def test_the_duckdb_cli_reads_the_ledger_mid_run(repo: SpecRepo, home: Path, daemons: MakeDaemon) -> None:
    scripted_agent(repo, "quick", [turn(content="done")])
    scripted_agent(repo, "long", [turn(content="late", sleep=30)], constraints={"max_runtime": 60})
    repo.commit()
    daemon = daemons()

    finished = daemon.run("quick")
    assert finished["status"] == "succeeded"
    long_id = daemon.submit("long")
    poll(lambda: running_run(home, "long"), "the long run to be running")
    poll(lambda: journal_pending(home) == 0, "the daemon to flush the journal")

    done = run_duckdb_cli(home, "select count(*) as n from runs")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout)[0]["n"] == 2
    done = run_duckdb_cli(home, "select run_id, status from runs order by run_id")
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == [{"run_id": finished["run_id"], "status": "succeeded"},
                                       {"run_id": long_id, "status": "running"}]

    # A reader holding the file delays ingestion; the runs finish all the same and no row is lost.
    reader = duckdb.connect(str(home / "runs.duckdb"), read_only=True)
    try:
        held = [daemon.run("quick") for _ in range(3)]
        assert [r["status"] for r in held] == ["succeeded"] * 3
        assert journal_pending(home) > 0, "the daemon wrote into a ledger a reader held open"
        assert reader.execute("select count(*) from runs").fetchone() == (2,)
    finally:
        reader.close()
    ids = [r["run_id"] for r in held]
    rows = wait_ledger(home, "SELECT run_id, status FROM runs WHERE run_id IN (?, ?, ?)", ids,
                       until=lambda rows: len(rows) == 3, what="the held-back runs in the ledger")
    assert {r["status"] for r in rows} == {"succeeded"}
    statuses = wait_ledger(home, "SELECT DISTINCT run_id FROM run_events WHERE kind = 'status' AND run_id IN (?, ?, ?)",
                           ids, until=lambda rows: len(rows) == 3, what="the held-back runs' events")
    assert len(statuses) == 3
    assert status_of(home, long_id) == "running"
    assert "ledger flush failed" not in daemon.log()


# -- 5. kill -9 of the daemon ---------------------------------------------------------------------------


def test_kill_9_takes_the_run_along_and_the_next_start_marks_it_interrupted(
        repo: SpecRepo, home: Path, daemons: MakeDaemon) -> None:
    scripted_agent(repo, "nightly", [turn(content="late", sleep=30)], constraints={"max_runtime": 60},
                   triggers=[{"type": "schedule", "cron": "*/2 * * * * *"}])
    repo.commit()
    first = daemons()

    run = poll(lambda: running_run(home, "nightly"), "a scheduled run in flight", timeout=10)
    pid, launcher = int(run["pid"]), int(run["launcher_pid"])
    assert process_alive(pid) and process_alive(launcher)
    fired = state_rows(home, "SELECT trigger_key, last_slot FROM trigger_state WHERE agent = 'nightly'")
    assert len(fired) == 1
    first.kill9()
    poll(lambda: not process_alive(pid) and not process_alive(launcher) and not live_in_group(pid)
         and not first.processes(), "the run's processes to die with the daemon", timeout=10)
    assert status_of(home, run["run_id"]) == "running"  # nobody was left to say otherwise

    second = daemons()
    assert status_of(home, run["run_id"]) == "interrupted"
    assert f"marked 1 run(s) interrupted (in flight when the last daemon stopped): {run['run_id']}" in second.log()
    # The slot fired before the kill is not fired again; a slot missed while down is caught up at most once.
    poll(lambda: state_rows(home, "SELECT last_slot FROM trigger_state WHERE agent = 'nightly'")[0]["last_slot"]
         > fired[0]["last_slot"], "a slot after the restart", timeout=10)
    assert second.terminate() == 0

    rows = final_runs(home, "nightly", 2)
    by_id = {r["run_id"]: r for r in rows}
    assert by_id[run["run_id"]]["status"] == "interrupted"
    assert by_id[run["run_id"]]["trigger"] == "schedule"
    slots = Counter(slot_of(r["input"]) for r in rows)
    assert slots[slot_of(by_id[run["run_id"]]["input"])] == 1, slots  # the killed run's slot
    assert slots[datetime.fromisoformat(fired[0]["last_slot"]).isoformat(timespec="seconds")] <= 1, slots
    assert max(slots.values()) == 1, slots
    assert sum(1 for r in rows if "missed slot" in r["input"]) <= 1
    assert journal_pending(home) == 0


# -- 6. deadlines ---------------------------------------------------------------------------------------


def test_a_run_past_its_deadline_is_timed_out_and_leaves_no_process(
        repo: SpecRepo, home: Path, daemons: MakeDaemon) -> None:
    scripted_agent(repo, "overdue", [turn(content="too late", sleep=30)], constraints={"max_runtime": 2})
    repo.commit()
    daemon = daemons()
    zygote = daemon.zygote()

    began = time.monotonic()
    result = daemon.run("overdue")
    assert result["status"] == "timed_out"
    assert "max_runtime of 2s" in result["error"]
    assert time.monotonic() - began < 15
    row = final_runs(home, "overdue", 1)[0]
    assert row["status"] == "timed_out" and row["pid"]
    poll(lambda: not live_in_group(row["pid"]), "the run's process group to be gone", timeout=5)
    poll(lambda: not children_of(zygote), "the run's process to be gone", timeout=5)
    assert process_alive(zygote)


# -- 7. MAX_AGENTS --------------------------------------------------------------------------------------


def test_max_agents_is_never_exceeded(repo: SpecRepo, home: Path, daemons: MakeDaemon) -> None:
    names = ["w1", "w2", "w3", "w4"]
    for name in names:
        scripted_agent(repo, name, [turn(content="ok", sleep=1)], overlap="queue")
    repo.commit()
    daemon = daemons(env={"MAX_AGENTS": "2"})

    # All at once, with pings in between: more callers than the socket's listen backlog used to take.
    with ThreadPoolExecutor(32) as pool:
        submitted = [pool.submit(daemon.submit, name) for name in names * 2]
        pings = [pool.submit(daemon.call, {"op": "ping"}, 10) for _ in range(24)]
        ids = [f.result() for f in submitted]
        assert all(f.result()["running"] <= 2 for f in pings)
    seen = []

    def all_ended() -> bool:
        ping = daemon.call({"op": "ping"})
        seen.append(ping["running"])
        return ping["running"] == 0 and ping["queued"] == 0 and all(status_of(home, i) in FINAL for i in ids)

    poll(all_ended, "all eight runs to end", timeout=30, every=0.1)
    assert max(seen) <= 2, seen
    rows = wait_ledger(home, f"SELECT * FROM runs WHERE run_id IN ({', '.join('?' * len(ids))})", ids,
                       until=lambda rows: len(rows) == 8 and all(r["status"] in FINAL for r in rows),
                       what="the eight runs in the ledger")
    assert [r["status"] for r in rows] == ["succeeded"] * 8
    # At no moment more than two runs: sweep the intervals (an end sorts before a start at the same instant).
    edges = sorted([(r["started_at"], 1) for r in rows] + [(r["ended_at"], -1) for r in rows],
                   key=lambda e: (e[0], e[1]))
    level, peak = 0, 0
    for _, step in edges:
        level += step
        peak = max(peak, level)
    assert peak == 2, edges


# -- 8. overlap policies --------------------------------------------------------------------------------


def test_overlap_forbid_skips_and_replace_stops_the_old_run(
        repo: SpecRepo, home: Path, daemons: MakeDaemon, tmp_path: Path) -> None:
    guarded, replaced = tmp_path / "guarded", tmp_path / "replaced"
    guarded.mkdir()
    replaced.mkdir()
    scripted_agent(repo, "guarded", [turn(content="done", sleep=30)], constraints={"max_runtime": 60},
                   overlap="forbid", triggers=[{"type": "file_change", "path": str(guarded), "debounce": 0.2}])
    scripted_agent(repo, "replacer", [turn(content="done", sleep=3)], constraints={"max_runtime": 60},
                   overlap="replace", triggers=[{"type": "file_change", "path": str(replaced), "debounce": 0.2}])
    repo.commit()
    daemon = daemons()

    (guarded / "one.txt").write_text("1")
    (replaced / "one.txt").write_text("1")
    first = poll(lambda: running_run(home, "guarded"), "the guarded agent's run")
    old = poll(lambda: running_run(home, "replacer"), "the replacer's first run")

    (guarded / "two.txt").write_text("2")
    (replaced / "two.txt").write_text("2")
    skipped = final_runs(home, "guarded", 1, status="skipped")[0]
    assert f"overlap policy forbid: run {first['run_id']} in flight" in skipped["error"]
    assert skipped["trigger"] == "file_change" and "two.txt" in skipped["input"]
    assert status_of(home, first["run_id"]) == "running"

    runs = final_runs(home, "replacer", 2, timeout=20)
    by_id = {r["run_id"]: r for r in runs}
    assert by_id.pop(old["run_id"])["status"] == "stopped"
    (new,) = by_id.values()
    assert new["status"] == "succeeded" and "two.txt" in new["input"] and new["trigger"] == "file_change"
    assert daemon.call({"op": "stop", "agent": "guarded"})["stopping_runs"] == 1
    ended = {r["run_id"]: r["status"] for r in final_runs(home, "guarded", 2)}
    assert ended == {first["run_id"]: "stopped", skipped["run_id"]: "skipped"}


# -- 9. SIGTERM -----------------------------------------------------------------------------------------


def test_sigterm_stops_runs_in_flight_and_flushes_the_ledger(repo: SpecRepo, home: Path, daemons: MakeDaemon) -> None:
    scripted_agent(repo, "quick", [turn(content="done")])
    scripted_agent(repo, "long", [turn(content="late", sleep=30)], constraints={"max_runtime": 60})
    repo.commit()
    # No periodic flush to speak of: whatever the ledger has at the end, the shutdown put there.
    daemon = daemons(env={"MAX_AGENTS": "1", "AGENT_ORCH_SHUTDOWN_GRACE": "0", "AGENT_ORCH_FLUSH_INTERVAL": "600"})

    done = [daemon.run("quick")["run_id"] for _ in range(2)]
    long_id = daemon.submit("long")
    poll(lambda: running_run(home, "long"), "the long run to be running")
    waiting = daemon.submit("quick")  # queued behind the long run (MAX_AGENTS=1)
    assert status_of(home, waiting) == "queued"
    pid = int(progress_of(home, long_id)["pid"])

    began = time.monotonic()
    assert daemon.terminate(timeout=20) == 0
    assert time.monotonic() - began < 15
    poll(lambda: not live_in_group(pid), "the stopped run's process group to be gone", timeout=5)
    assert journal_pending(home) == 0
    rows = {r["run_id"]: r for r in ledger_rows(home, "SELECT * FROM runs") or []}
    assert set(rows) == {*done, long_id, waiting}
    assert [rows[i]["status"] for i in done] == ["succeeded", "succeeded"]
    assert rows[long_id]["status"] == "stopped" and rows[long_id]["ended_at"] is not None
    assert rows[waiting]["status"] == "stopped"
    assert "before the run started" in rows[waiting]["error"]
    events = ledger_rows(home, "SELECT name FROM run_events WHERE run_id = ? AND kind = 'status'", [long_id])
    assert events == [{"name": "stopped"}]


def test_sigterm_gives_runs_in_flight_their_grace(repo: SpecRepo, home: Path, daemons: MakeDaemon) -> None:
    scripted_agent(repo, "brief", [turn(content="made it", sleep=2)], constraints={"max_runtime": 60})
    repo.commit()
    daemon = daemons(env={"AGENT_ORCH_SHUTDOWN_GRACE": "20"})

    run_id = daemon.submit("brief")
    poll(lambda: running_run(home, "brief"), "the run to be running")
    began = time.monotonic()
    assert daemon.terminate(timeout=25) == 0
    assert time.monotonic() - began < 15, "the daemon waited out the whole grace for a run that had ended"
    row = (ledger_rows(home, "SELECT status, output FROM runs WHERE run_id = ?", [run_id]) or [{}])[0]
    assert row == {"status": "succeeded", "output": "made it"}


# -- 10. the CLI through the daemon ---------------------------------------------------------------------


def test_run_stop_start_through_the_daemon_print_as_without_it(
        repo: SpecRepo, home: Path, cli: Cli, daemons: MakeDaemon) -> None:
    scripted_agent(repo, "hello", [turn(content="hello there")])
    repo.commit()
    expect(cli("apply"), 0)

    def session(*extra: tuple[str, ...]) -> dict[str, subprocess.CompletedProcess[str]]:
        calls = [("run", "hello"), ("run", "nosuch"), *extra]
        with ThreadPoolExecutor(len(calls)) as pool:
            out = dict(zip(["run", "missing", "run-json"], pool.map(lambda args: cli(*args), calls), strict=False))
        out["stop"] = cli("stop", "hello")
        out["run-suspended"] = cli("run", "hello")
        out["start"] = cli("start", "hello")
        return out

    alone = session()
    assert not (home / "run" / "default.sock").exists()
    daemon = daemons()
    served = session(("--output", "json", "run", "hello"))

    for key in alone:
        a, b = alone[key], served[key]
        assert b.returncode == a.returncode, (key, a, b)
        assert "Traceback" not in b.stderr
        if key == "start":
            continue  # compared below
        assert normalized(b.stdout) == normalized(a.stdout), key
        assert normalized(b.stderr) == normalized(a.stderr), key
    assert [alone[k].returncode for k in ("run", "missing", "stop", "run-suspended")] == [0, 2, 0, 2]
    assert "error: agent 'hello' is suspended" in served["run-suspended"].stderr
    run_json = json.loads(served["run-json"].stdout)
    assert run_json["status"] == "succeeded" and run_json["output"] == "hello there"
    assert run_json["input_tokens"] > 0 and run_json["started_at"] and run_json["ended_at"]
    assert f"run {run_json['run_id']} of hello ended: succeeded" in daemon.log()

    # start: the same words up to the run's status. Without a daemon agentctl is the run's launcher and waits
    # for it ("... succeeded"); through the daemon it returns once the run is queued ("... queued").
    assert normalized(alone["start"].stdout) == "hello resumed; run RUN_ID succeeded\n"
    assert re.fullmatch(r"hello resumed; run [0-9a-f]{24} (queued|running|succeeded)\n", served["start"].stdout)
    run_id = served["start"].stdout.split()[3]
    rows = final_runs(home, "hello", 2, requested_by="cli:start")  # one alone, one served
    assert any(r["run_id"] == run_id and r["status"] == "succeeded" for r in rows), rows


def test_a_killed_run_process_ends_its_run_as_failed_at_once(repo: SpecRepo, home: Path, daemons: MakeDaemon) -> None:
    """When the run process dies without a result (kill -9, a crash), the daemon writes its final row."""
    scripted_agent(repo, "long", [turn(content="late", sleep=30)], constraints={"max_runtime": 60})
    repo.commit()
    daemon = daemons()
    run_id = daemon.submit("long")
    row = poll(lambda: running_run(home, "long"), "the long run to be running")
    os.kill(int(row["pid"]), signal.SIGKILL)
    ended = poll(lambda: progress_of(home, run_id).get("status") == "failed" and progress_of(home, run_id),
                 "the run to be failed", timeout=15)
    assert ended["error"] == "run process died without a result (killed by SIGKILL)"
    again = daemon.submit("long")  # the agent is not stuck behind a run that is over
    poll(lambda: (running_run(home, "long") or {}).get("run_id") == again, "the next run to be running")
