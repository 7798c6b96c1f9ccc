"""Triggers follow the applied state (issue 11): how soon after an apply made by another process the daemon's
schedules and watches match it, beside the same change reconciled by the daemon itself in the same run.

A daemon serves a home with AGENTS scheduled agents (default 1000, as in the idle bench; BENCH_REARM_AGENTS). Each
round commits one new agent with a schedule and a file_change trigger, then:
- apply: this process applies it (``reconcile``, as `agentctl apply` does), and the clock runs from the
  apply's commit to the daemon's ping saying its triggers are armed from that generation. Goal: < 1 s.
- baseline: the daemon is asked to reconcile (the control socket's ``reconcile``, as a push's hook asks),
  and the clock runs from the request to the same ping: the path that re-armed before this issue, which
  also pays for the reconcile itself.
Both are timed from the same kind of commit, in alternation, against the same daemon.
"""

from __future__ import annotations

import os
import shutil
import sqlite3
import statistics
import tempfile
import time
from pathlib import Path

from bench import git
from bench.daemon import make_repo, start_daemon, stop
from runner.ledger.ingesting import flush
from runner.reconcile.applied import now
from runner.reconcile.applying import apply_plan
from runner.reconcile.reconciling import open_source, plan
from runner.settings import Settings
from runner.state import connect
from runner.supervise.control import call, socket_path

AGENTS = int(os.environ.get("BENCH_REARM_AGENTS", "1000"))
ROUNDS = int(os.environ.get("BENCH_REARM_ROUNDS", "10"))


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-rearm-"))
    try:
        run(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def run(root: Path) -> None:
    repo = make_repo(root, AGENTS, schedule=True)
    home = root / "home"
    watched = root / "watched"
    watched.mkdir()
    proc = start_daemon(home, repo)
    sock = socket_path(home, "default")
    settings = Settings.load(home, "default", source=str(repo))
    conn = connect(settings.state_path)
    source = open_source(settings)
    applied: list[float] = []
    apply_cost: list[float] = []
    requested: list[float] = []
    try:
        for i in range(ROUNDS):
            _commit_agent(repo, f"apply{i:03d}", watched)
            began = time.perf_counter()
            # What `agentctl apply` does (reconciling.reconcile), timed from the commit of its transaction.
            outcome = apply_plan(conn, plan(settings, conn, source), initiator="bench:apply", started_at=now())
            committed = time.perf_counter()
            assert outcome.created == 1, outcome
            _wait_armed(sock, conn)
            applied.append(time.perf_counter() - committed)
            apply_cost.append(committed - began)
            flush(conn, settings.ledger_path)

            _commit_agent(repo, f"request{i:03d}", watched)
            generation = _generation(conn)
            began = time.perf_counter()
            call(sock, {"op": "reconcile"}, timeout=30)
            _wait_armed(sock, conn, after=generation)
            requested.append(time.perf_counter() - began)
    finally:
        stop(proc)
        conn.close()
    print(f"rearm: {AGENTS} scheduled agents, {ROUNDS} rounds each")
    print(f"rearm: apply by another process, its commit to triggers armed (median)  {_ms(applied)}   "
          f"max {max(applied) * 1000:7.1f} ms (goal < 1000 ms)")
    print(f"rearm: the apply itself in that process (median, for scale)             {_ms(apply_cost)}")
    print(f"rearm: baseline, the daemon's own reconcile on request to armed (median) {_ms(requested)}   "
          f"max {max(requested) * 1000:7.1f} ms")


def _commit_agent(repo: Path, name: str, watched: Path) -> None:
    (repo / "specs" / f"{name}.yaml").write_text(
        f"name: {name}\ndescription: new\nmodel: scripted:_scripts/done.yaml\n"
        f"triggers:\n  - type: schedule\n    cron: \"0 3 * * *\"\n"
        f"  - type: file_change\n    path: {watched}\n")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", name)


def _generation(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT generation FROM applied_changes WHERE client_id = 'default'").fetchone()
    return int(row[0]) if row else 0


def _wait_armed(sock: Path, conn: sqlite3.Connection, after: int | None = None, timeout: float = 60) -> None:
    """Until the daemon's triggers are armed from the state's current generation (past ``after``)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        generation = _generation(conn)
        if after is None or generation > after:
            answer = call(sock, {"op": "ping"}, timeout=10) or {}
            if answer.get("armed_generation") == generation:
                return
        time.sleep(0.005)
    raise TimeoutError("the daemon did not re-arm")


def _ms(values: list[float]) -> str:
    return f"{statistics.median(values) * 1000:7.1f} ms"


if __name__ == "__main__":
    main()
