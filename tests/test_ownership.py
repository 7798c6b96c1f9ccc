"""One owner per home (issue 11): a real `agentctl serve` in a subprocess is the one daemon of its home, follows
the applied state whoever applies it, catches up a missed slot whatever else happens at start, keeps queued work
across a kill -9, retries an interrupted run when the spec asks, and says which watched folder it waits for.

Every wait is a bounded poll for an event (a run on record, a log line, the daemon's armed generation); negative
checks ("this no longer fires") are made against a control trigger of the same kind that does fire.
"""

from __future__ import annotations

import fcntl
import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from conftest import ROOT, SpecRepo, agentctl
from daemon_helpers import Daemon, listed_runs, poll, state_rows, status_of
from test_daemon import FINAL, MakeDaemon, daemons, final_runs, running_run, slot_of  # noqa: F401 (the fixture)
from test_run import expect, scripted_agent, turn

from runner.reconcile.applied import load_applied
from runner.state import connect
from runner.supervise.control import call, socket_path
from runner.supervise.owning import lock_path, running_daemon
from runner.supervise.scheduling import last_fire

Cli = Any


def runs(home: Path, agent: str, **match: Any) -> list[dict[str, Any]]:
    """The agent's runs as the API and the CLI read them (queued, running or ended), oldest first."""
    return [r for r in reversed(listed_runs(home, agent)) if all(r.get(k) == v for k, v in match.items())]


def run_id_now() -> str:
    """A run id made now would sort after this (runner.agent.recording.new_run_id: milliseconds first)."""
    return f"{int(time.time() * 1000):012x}"


def armed(daemon: Daemon, home: Path) -> bool:
    """The daemon's triggers are armed from the applied state as it is now."""
    generation = state_rows(home, "SELECT generation FROM applied_changes WHERE client_id = 'default'")
    return bool(generation) and daemon.call({"op": "ping"})["armed_generation"] == generation[0]["generation"]


# -- one daemon per home --------------------------------------------------------------------------------


def test_a_second_serve_on_the_same_home_exits_2_and_leaves_the_first_alone(
        repo: SpecRepo, home: Path, daemons: MakeDaemon) -> None:  # noqa: F811
    scripted_agent(repo, "hello", [turn(content="hi")])
    repo.commit()
    first = daemons()
    found = poll(lambda: (d := running_daemon(home)) and d.get("api") and d, "the lock file to name the API")
    assert found["pid"] == first.pid and found["version"] and found["started_at"]
    socket_inode = first.socket.stat().st_ino

    # The same home on another port (AGENT_ORCH_PORT=0), and on the first daemon's own port.
    port = found["api"].rsplit(":", 1)[1]
    for env in ({}, {"AGENT_ORCH_PORT": port}):
        done = agentctl("serve", home=home, env={**first.env, **env}, timeout=90)
        assert done.returncode == 2, done.stdout + done.stderr
        assert f"a daemon already runs for this home (pid {first.pid}, API on {found['api']})" in done.stderr
        assert "Traceback" not in done.stderr
    assert first.socket.stat().st_ino == socket_inode
    assert first.run("hello")["status"] == "succeeded"
    assert first.call({"op": "ping"})["pid"] == first.pid
    assert running_daemon(home) == found

    assert first.terminate() == 0
    assert running_daemon(home) is None
    second = daemons()  # the home is free again
    assert poll(lambda: (running_daemon(home) or {}).get("pid"), "the second daemon's record") == second.pid


def test_running_daemon_tests_the_lock_not_the_pid(home: Path) -> None:
    """A lock file left with a live pid in it (ours) and nobody holding it is no daemon."""
    path = lock_path(home)
    path.parent.mkdir(parents=True)
    path.write_text(json.dumps({"pid": os.getpid(), "api": "127.0.0.1:1"}) + "\n")
    assert running_daemon(home) is None
    with open(path) as held:  # another open file description holding it: a daemon, whatever the pid says
        fcntl.flock(held, fcntl.LOCK_EX)
        assert running_daemon(home) == {"pid": os.getpid(), "api": "127.0.0.1:1"}
    assert running_daemon(home) is None


# -- triggers follow the applied state, whoever applied it ----------------------------------------------


def test_apply_while_serving_arms_new_changed_and_deleted_triggers(
        repo: SpecRepo, home: Path, daemons: MakeDaemon, cli: Cli, tmp_path: Path) -> None:  # noqa: F811
    first, second, control = tmp_path / "first", tmp_path / "second", tmp_path / "control"
    for folder in (first, second, control):
        folder.mkdir()
    # The control agent keeps firing throughout: on the same cadence and debounce as the agents under test.
    scripted_agent(repo, "keeper", [turn(content="kept")], overlap="queue",
                   triggers=[{"type": "schedule", "cron": "*/2 * * * * *"},
                             {"type": "file_change", "path": str(control), "debounce": 0.3}])
    repo.commit()
    daemon = daemons()

    # New: a cron agent and a file_change agent applied by another process.
    scripted_agent(repo, "ticker", [turn(content="tick")], overlap="queue",
                   triggers=[{"type": "schedule", "cron": "*/2 * * * * *"}])
    scripted_agent(repo, "watcher", [turn(content="seen")], overlap="queue",
                   triggers=[{"type": "file_change", "path": str(first), "debounce": 0.3}])
    repo.commit()
    expect(cli("apply"), 0)
    poll(lambda: runs(home, "ticker", trigger="schedule"), "a scheduled run of the new agent", timeout=30)
    poll(lambda: armed(daemon, home), "the daemon to re-arm", timeout=30)
    (first / "a.txt").write_text("a")
    poll(lambda: runs(home, "watcher", trigger="file_change"), "a file_change run of the new agent", timeout=30)

    # Changed: another cron, another folder.
    scripted_agent(repo, "ticker", [turn(content="tock")], overlap="queue",
                   triggers=[{"type": "schedule", "cron": "1/2 * * * * *"}])
    scripted_agent(repo, "watcher", [turn(content="seen")], overlap="queue",
                   triggers=[{"type": "file_change", "path": str(second), "debounce": 0.3}])
    repo.commit()
    expect(cli("apply"), 0)
    changed = poll(lambda: [r for r in runs(home, "ticker", trigger="schedule") if "'1/2 * * * * *'" in r["input"]],
                   "a run on the changed schedule", timeout=30)[0]
    poll(lambda: armed(daemon, home), "the daemon to re-arm", timeout=30)
    (first / "old.txt").write_text("old folder")
    (second / "b.txt").write_text("b")
    seen = poll(lambda: [r for r in runs(home, "watcher", trigger="file_change") if "b.txt" in r["input"]],
                "a run for a file in the changed folder", timeout=30)
    assert "old.txt" not in seen[0]["input"]
    assert not [r for r in runs(home, "watcher") if "old.txt" in r["input"]], "the old folder is still watched"

    # Deleted: neither fires again (nor fails with "no agent named ...") while the control agent fires.
    repo.remove("specs/ticker.yaml")
    repo.remove("specs/watcher.yaml")
    repo.commit()
    expect(cli("apply"), 0)
    poll(lambda: armed(daemon, home), "the daemon to re-arm", timeout=30)
    deleted_at = run_id_now()  # run ids begin with the time they were made
    (second / "c.txt").write_text("c")
    (control / "c.txt").write_text("c")
    poll(lambda: [r for r in runs(home, "keeper", trigger="file_change") if "c.txt" in r["input"]],
         "the control agent's file_change run", timeout=30)
    poll(lambda: len([r for r in runs(home, "keeper", trigger="schedule") if r["run_id"] > deleted_at]) >= 2,
         "two slots of the control agent's schedule", timeout=30)
    late = [r for r in runs(home, "ticker") + runs(home, "watcher") if r["run_id"] > deleted_at]
    assert late == [], [(r["agent"], r["trigger"], r["status"], r.get("input"), r.get("error")) for r in late]
    after = [r for r in runs(home, "ticker") if r["run_id"] > changed["run_id"]]
    assert all("'1/2 * * * * *'" in r["input"] for r in after), "the old schedule still fired"
    assert not [r for r in runs(home, "ticker") if r["status"] == "failed"]
    assert "triggers armed from generation" in daemon.log()


# -- catch-up together with a commit at start -----------------------------------------------------------


def test_a_missed_slot_is_caught_up_once_even_when_a_commit_is_applied_at_start(
        repo: SpecRepo, home: Path, daemons: MakeDaemon) -> None:  # noqa: F811
    cron = "*/3 * * * * *"
    scripted_agent(repo, "nightly", [turn(content="ran")], triggers=[{"type": "schedule", "cron": cron}])
    repo.commit()
    first = daemons()
    poll(lambda: state_rows(home, "SELECT last_slot FROM trigger_state WHERE agent = 'nightly'"), "a slot to fire",
         timeout=30)
    assert first.terminate() == 0
    (row,) = state_rows(home, "SELECT last_slot FROM trigger_state WHERE agent = 'nightly'")
    last = datetime.fromisoformat(row["last_slot"])

    # While the daemon is down: a commit that changes the agent (not its schedule), and a slot passes.
    scripted_agent(repo, "nightly", [turn(content="ran, changed")], description="changed while down",
                   triggers=[{"type": "schedule", "cron": cron}])
    repo.commit("change while the daemon is down")
    poll(lambda: (slot := last_fire(cron, "UTC", datetime.now(UTC))) is not None and slot > last,
         "a slot to pass while the daemon is down", timeout=30)
    missed = last_fire(cron, "UTC", datetime.now(UTC))
    assert missed is not None

    second = daemons()
    assert "update nightly" in second.log()  # the start applied the commit
    caught = poll(lambda: [r for r in runs(home, "nightly") if "missed slot" in (r.get("input") or "")],
                  "the missed slot's run", timeout=30)
    assert len(caught) == 1, caught
    assert datetime.fromisoformat(slot_of(caught[0]["input"])) >= missed
    # A normal slot after it, and still a single catch-up.
    poll(lambda: [r for r in runs(home, "nightly") if r["run_id"] > caught[0]["run_id"]], "the next slot", timeout=30)
    assert len([r for r in runs(home, "nightly") if "missed slot" in (r.get("input") or "")]) == 1


# -- a kill -9 keeps queued work ------------------------------------------------------------------------


def test_kill_9_puts_queued_runs_back_on_the_queue(repo: SpecRepo, home: Path, daemons: MakeDaemon) -> None:  # noqa: F811
    scripted_agent(repo, "long", [turn(content="late", sleep=60)], constraints={"max_runtime": 120})
    for name in ("q1", "q2", "q3"):
        scripted_agent(repo, name, [turn(content=f"{name} done")])
    repo.commit()
    first = daemons(env={"MAX_AGENTS": "1"})
    long_id = first.submit("long")
    poll(lambda: running_run(home, "long"), "the long run to be running", timeout=30)
    queued = [first.submit(name) for name in ("q1", "q2", "q3")]
    assert [status_of(home, i) for i in queued] == ["queued"] * 3
    first.kill9()

    second = daemons(env={"MAX_AGENTS": "1"})
    assert status_of(home, long_id) == "interrupted"
    assert f"put 3 run(s) back on the queue (queued, not started, when the last daemon stopped): {', '.join(queued)}" \
        in second.log()
    poll(lambda: all(status_of(home, i) in FINAL for i in queued), "the queued runs to run", timeout=60)
    assert [status_of(home, i) for i in queued] == ["succeeded"] * 3
    rows = [final_runs(home, name, 1)[0] for name in ("q1", "q2", "q3")]
    assert [r["run_id"] for r in rows] == queued  # the same runs, in their order
    assert [r["output"] for r in rows] == ["q1 done", "q2 done", "q3 done"]
    assert [r["started_at"] for r in rows] == sorted(r["started_at"] for r in rows)


# -- retry on interrupted -------------------------------------------------------------------------------


def test_an_interrupted_trigger_run_is_retried_once_when_the_spec_asks(
        repo: SpecRepo, home: Path, daemons: MakeDaemon, tmp_path: Path) -> None:  # noqa: F811
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    scripted_agent(repo, "flaky", [turn(content="made it", sleep=3)], constraints={"max_runtime": 120},
                   retry={"limit": 1, "on": ["interrupted"]},
                   triggers=[{"type": "file_change", "path": str(inbox), "debounce": 0.2}])
    repo.commit()
    first = daemons()
    (inbox / "work.txt").write_text("to do")
    run = poll(lambda: running_run(home, "flaky"), "the triggered run to be running", timeout=30)
    first.kill9()

    daemons()
    assert status_of(home, run["run_id"]) == "interrupted"
    retry = poll(lambda: runs(home, "flaky", retry_of=run["run_id"]), "the retry", timeout=30)[0]
    poll(lambda: status_of(home, retry["run_id"]) in FINAL, "the retry to end", timeout=60)
    assert status_of(home, retry["run_id"]) == "succeeded"
    rows = {r["run_id"]: r for r in final_runs(home, "flaky", 2)}
    assert rows[retry["run_id"]]["retry_of"] == run["run_id"]
    assert rows[run["run_id"]]["retry_of"] is None
    assert rows[retry["run_id"]]["trigger"] == "file_change"
    assert rows[retry["run_id"]]["input"] == rows[run["run_id"]]["input"]
    assert len(runs(home, "flaky")) == 2  # limit 1: one retry, and nothing else fired


def test_a_manual_run_is_not_retried_and_the_limit_holds(repo: SpecRepo, home: Path, daemons: MakeDaemon,  # noqa: F811
                                                         tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    scripted_agent(repo, "doomed", [turn(content="too late", sleep=30)], constraints={"max_runtime": 1},
                   retry={"limit": 2, "backoff": 0.5, "on": ["timed_out"]},
                   triggers=[{"type": "file_change", "path": str(inbox), "debounce": 0.2}])
    repo.commit()
    daemon = daemons()
    manual = daemon.run("doomed")
    assert manual["status"] == "timed_out"
    (inbox / "go.txt").write_text("go")
    chain = poll(lambda: (r := runs(home, "doomed", trigger="file_change")) and len(r) == 3
                 and all(x["status"] in FINAL for x in r) and r, "the triggered run and its two retries", timeout=90)
    assert [r["status"] for r in chain] == ["timed_out"] * 3
    assert [r["retry_of"] for r in chain] == [None, chain[0]["run_id"], chain[1]["run_id"]]
    assert not runs(home, "doomed", retry_of=manual["run_id"])
    poll(lambda: "no retry left (2 of 2 made)" in daemon.log(), "the daemon to say the last retry was the last",
         timeout=30)


# -- a watched folder that does not exist ---------------------------------------------------------------


def test_a_missing_watched_folder_is_reported_and_armed_when_it_appears(
        repo: SpecRepo, home: Path, daemons: MakeDaemon, tmp_path: Path) -> None:  # noqa: F811
    missing = tmp_path / "not-yet"
    scripted_agent(repo, "patient", [turn(content="there it is")],
                   triggers=[{"type": "file_change", "path": str(missing), "debounce": 0.2}])
    repo.commit()
    daemon = daemons()
    expected = f"waiting for {missing} to exist"
    conn = connect(home / "state.sqlite")
    try:
        poll(lambda: load_applied(conn, "default")["patient"].message == expected, "the status message", timeout=30)
        assert f"patient: the file_change trigger's folder {missing} does not exist; waiting for it to exist" \
            in daemon.log()
        done = expect(agentctl("--output", "json", "status", home=home), 0)
        assert any(a["name"] == "patient" and a["message"] == expected for a in json.loads(done.stdout)["agents"])

        missing.mkdir()
        poll(lambda: load_applied(conn, "default")["patient"].message != expected, "the message to clear", timeout=30)
        (missing / "hello.txt").write_text("hi")
        poll(lambda: runs(home, "patient", trigger="file_change"), "a run for the folder that appeared", timeout=30)
        assert f"patient: {missing} exists now; watching it" in daemon.log()
    finally:
        conn.close()


# -- the operator's view: make's status and restart use the lock, never a name ---------------------------


def test_status_and_restart_by_the_lock(repo: SpecRepo, home: Path, daemons: MakeDaemon) -> None:  # noqa: F811
    scripted_agent(repo, "hello", [turn(content="hi")])
    repo.commit()
    first = daemons()
    poll(lambda: (running_daemon(home) or {}).get("api"), "the API address in the lock file")
    owning = [sys.executable, "-m", "runner.supervise.owning"]
    status = subprocess.run([*owning, "status", str(home)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert status.returncode == 0 and f"daemon of {home}: pid {first.pid}" in status.stdout, status

    done = subprocess.run([*owning, "restart", str(home)], capture_output=True, text=True, cwd=ROOT, timeout=180)
    assert done.returncode == 0, done.stdout + done.stderr
    assert first.proc is not None and first.proc.wait(timeout=30) == 0  # stopped by SIGTERM, exit 0
    now = running_daemon(home)
    assert now is not None and now["pid"] != first.pid
    try:
        assert f"restarted the daemon of {home}: pid {first.pid} -> {now['pid']}" in done.stdout
        assert (call(socket_path(home, "default"), {"op": "ping"}, timeout=30) or {}).get("pid") == now["pid"]
        env = Path(f"/proc/{now['pid']}/environ").read_bytes().split(b"\0")
        assert f"AGENT_ORCH_SOURCE={repo.path}".encode() in env  # the same environment as before
    finally:
        os.kill(now["pid"], 15)
        poll(lambda: running_daemon(home) is None, "the restarted daemon to stop", timeout=60)
    status = subprocess.run([*owning, "status", str(home)], capture_output=True, text=True, cwd=ROOT, timeout=60)
    assert status.returncode == 1 and f"no daemon runs for {home}" in status.stdout
