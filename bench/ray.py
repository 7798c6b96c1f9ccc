"""Runs on Ray (docs/scale-out.md): what the Ray executor costs beside the local one, how much one control
plane can record, and how fast a dead node's runs end. Each figure beside a baseline of the same run.

- dispatch: submit to the run's first line of agent code (as bench/daemon.py's dispatch() measures it), median
  and p95, for a daemon on a one-node local Ray cluster beside one on the local executor. Goal: <= 3x local.
- throughput: N trivial scripted runs (--runs, default 1000) through a daemon on Ray beside one on the local
  executor, both MAX_AGENTS=10 (as bench/daemon.py). Goal: >= 0.5x local on one node.
- ledger: the ceiling of the daemon's one writer, without Ray: a LiveWriter fed by RunRecords (the real path
  of a run's messages) until the final rows are durable, then the ledger flush into DuckDB, each timed;
  beside a plain SQLite insert loop of the same rows in one transaction. Then how many nodes one control
  plane can feed, at figure 2's Ray runs/s per node.
- node death: a long run on a second node, which is then killed (no graceful shutdown), until the run is
  `interrupted` in the daemon; beside a local run whose process gets SIGKILL, until it is `failed`. Goal: < 10 s.

Ray sends traffic to the machine's own address whatever it is told, so this benchmark runs only in a private
network namespace with loopback alone: run anywhere else, it runs itself again under `unshare -n`, and is
skipped (saying why) where that is not allowed.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import socket
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb
import yaml

from bench import commit_all
from bench.daemon import _one, make_repo, start_daemon, stop
from bench.processes import descendants, has_marker, kill_all, with_marker
from runner.supervise.control import call, socket_path

ROOT = Path(__file__).resolve().parents[1]
INSIDE = "BENCH_RAY_NETNS"  # set in the copy of this benchmark running in its own network namespace
MARKER = "BENCH_RAY_MARKER"  # in the environment of every process of the cluster: what is left is found by it
MAX_AGENTS = "10"  # as bench/daemon.py's throughput
DISPATCH_RUNS = 30
EVENTS_PER_RUN = 20  # a typical run: a few model calls, a dozen tool calls, logs
LEDGER_RUNS = 2000
HEALTH = {"health_check_period_ms": 500, "health_check_failure_threshold": 3, "health_check_timeout_ms": 1000}


# -- the cluster -----------------------------------------------------------------------------------------


class Cluster:
    """A local Ray cluster on loopback with token authentication, its own temp dir, a home per node."""

    def __init__(self, root: Path) -> None:
        self.root, self.token, self.marker = root, secrets.token_hex(32), uuid.uuid4().hex
        os.environ.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN=self.token)
        os.environ[MARKER] = self.marker
        os.environ.pop("RAY_ADDRESS", None)
        from ray.cluster_utils import Cluster as RayCluster

        self.ray_cluster = RayCluster(initialize_head=True, head_node_args=dict(
            node_ip_address="127.0.0.1", temp_dir=str(root / "cluster"), num_cpus=2, include_dashboard=False,
            env_vars=self._node_env("head"), _system_config=HEALTH))
        self.address = str(self.ray_cluster.address)
        self.seen: set[int] = set()

    def _node_env(self, name: str) -> dict[str, str]:
        home = self.root / "nodes" / name
        home.mkdir(parents=True)
        return {"AGENT_ORCH_HOME": str(home), MARKER: self.marker, "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN": self.token}

    def add_node(self, name: str, labels: dict[str, str]) -> Any:
        node = self.ray_cluster.add_node(node_ip_address="127.0.0.1", num_cpus=1, labels=labels,
                                         env_vars=self._node_env(name))
        self.ray_cluster.wait_for_nodes()
        return node

    def daemon_env(self, **more: str) -> dict[str, str]:
        return {"AGENT_ORCH_EXECUTOR": "ray", "RAY_ADDRESS": self.address, "RAY_AUTH_MODE": "token",
                "RAY_AUTH_TOKEN": self.token, **more}

    def note(self) -> None:
        """Remember the processes the cluster has now (a killed node's orphans are not our children)."""
        self.seen |= descendants(os.getpid()) | with_marker(MARKER, self.marker)

    def shutdown(self) -> None:
        self.note()
        try:
            self.ray_cluster.shutdown()
        finally:  # what the cluster left: detached actors' workers, their zygotes and runs
            kill_all(descendants(os.getpid()) | with_marker(MARKER, self.marker) |
                     {p for p in self.seen if has_marker(p, MARKER, self.marker)})


# -- figure 1: dispatch ----------------------------------------------------------------------------------


def dispatch_latencies(root: Path, env: dict[str, str]) -> list[float]:
    """Seconds from submitting a run to its first log line (its first line of agent code), as bench/daemon.py's
    dispatch() measures it; one run first to warm up, not counted."""
    repo = make_repo(root, 1)
    home = root / "home"
    proc = start_daemon(home, repo, **env)
    sock = socket_path(home, "default")
    try:
        latencies = []
        for i in range(DISPATCH_RUNS + 1):
            before = time.time()
            answer = call(sock, {"op": "run", "agent": "a0000", "wait": True})
            assert answer and answer["status"] == "succeeded", answer
            log = (home / "logs" / "agents" / "a0000.log").read_text().splitlines()
            first = next(line for line in log if f"run={answer['run_id']}" in line)
            started = datetime.fromisoformat(first.split()[0].replace("Z", "+00:00")).timestamp()
            if i:
                latencies.append(started - before)
    finally:
        stop(proc)
    return latencies


def dispatch(root: Path, cluster: Cluster) -> None:
    local = dispatch_latencies(root / "d-local", {})
    on_ray = dispatch_latencies(root / "d-ray", cluster.daemon_env())
    lm, lp = statistics.median(local), _p95(local)
    rm, rp = statistics.median(on_ray), _p95(on_ray)
    print(f"ray: dispatch, submit to first line of agent code ({DISPATCH_RUNS} runs, one node): "
          f"Ray median {rm * 1000:7.1f} ms, p95 {rp * 1000:7.1f} ms")
    print(f"ray: dispatch, the local executor (baseline):                          "
          f"median {lm * 1000:7.1f} ms, p95 {lp * 1000:7.1f} ms   ratio median {rm / max(lm, 1e-4):.1f}x, "
          f"p95 {rp / max(lp, 1e-4):.1f}x local (goal <= 3x)")


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))]


# -- figure 2: throughput --------------------------------------------------------------------------------


def throughput_of(root: Path, runs: int, env: dict[str, str]) -> tuple[float, int, int, int, int]:
    """N runs through a daemon, as bench/daemon.py's throughput(): seconds, then from the ledger the rows that
    succeeded, those that did not, the events, and the rows that name their node."""
    repo = make_repo(root, 10)
    home = root / "home"
    proc = start_daemon(home, repo, MAX_AGENTS=MAX_AGENTS, **env)
    sock = socket_path(home, "default")
    try:
        t = time.perf_counter()
        for i in range(runs):
            answer = call(sock, {"op": "run", "agent": f"a{i % 10:04d}", "wait": False})
            assert answer and answer.get("ok"), answer
        while True:
            answer = call(sock, {"op": "ping"})
            if answer and answer["running"] + answer["queued"] == 0:
                break
            time.sleep(0.05)
        elapsed = time.perf_counter() - t
    finally:
        stop(proc)
    con = duckdb.connect(str(home / "runs.duckdb"), read_only=True)
    try:
        counts = (_one(con, "SELECT count(*) FROM runs WHERE status = 'succeeded'"),
                  _one(con, "SELECT count(*) FROM runs WHERE status != 'succeeded'"),
                  _one(con, "SELECT count(*) FROM run_events"),
                  _one(con, "SELECT count(*) FROM runs WHERE node IS NOT NULL"))
    finally:
        con.close()
    return (elapsed, *counts)


def throughput(root: Path, cluster: Cluster, runs: int) -> float:
    """Prints figure 2; returns the Ray runs/s of one node."""
    local = throughput_of(root / "t-local", runs, {})
    on_ray = throughput_of(root / "t-ray", runs, cluster.daemon_env())
    lr, rr = runs / local[0], runs / on_ray[0]
    print(f"ray: {runs} trivial runs on Ray, one node, MAX_AGENTS={MAX_AGENTS}: {on_ray[0]:6.1f} s = {rr:6.1f} runs/s; "
          f"ledger: {on_ray[1]} succeeded, {on_ray[2]} not, {on_ray[3]} events, {on_ray[4]} rows with their node")
    print(f"ray: the same on the local executor (baseline):        {local[0]:6.1f} s = {lr:6.1f} runs/s; "
          f"ledger: {local[1]} succeeded, {local[2]} not, {local[3]} events   "
          f"ratio {rr / lr:.2f}x local (goal >= 0.5x)")
    return rr


# -- figure 3: the ledger writer's ceiling ---------------------------------------------------------------


def _messages(i: int) -> list[dict[str, Any]]:
    """A typical run's channel messages: EVENTS_PER_RUN events (model calls with their usage, tool calls,
    log events), and the agent log lines that go with them."""
    out: list[dict[str, Any]] = []
    for k in range(EVENTS_PER_RUN):
        ts = f"2026-11-28T18:00:{k:02d}.{i % 1000:03d}Z"
        if k % 4 == 0:
            out.append({"t": "usage", "input": 120, "output": 30})
            out.append({"t": "event", "ts": ts, "kind": "llm_call", "name": "scripted:_scripts/typical.yaml",
                        "decision": None, "detail": {"input_tokens": 120, "output_tokens": 30, "ms": 840}})
        elif k % 4 == 3:
            out.append({"t": "log", "level": "INFO", "message": f"step {k}: read 3 files, wrote a summary"})
            out.append({"t": "event", "ts": ts, "kind": "log", "name": "progress", "decision": None,
                        "detail": {"message": f"step {k}: read 3 files, wrote a summary"}})
        else:
            out.append({"t": "tool"})
            out.append({"t": "event", "ts": ts, "kind": "tool_call", "name": "file_reader", "decision": "allowed",
                        "detail": {"args": {"path": f"/srv/data/inbox/{i}/{k}.txt"}, "result_bytes": 2048,
                                   "ms": 3}})
    return out


def ledger(root: Path, ray_rate: float) -> None:
    from runner.agent.executor import Outcome
    from runner.agent.recording import LiveWriter, RunRecord, RunRow, new_run_id
    from runner.ledger.ingesting import flush
    from runner.state import connect

    home = root / "l" / "home"
    state, ledger_path, logs = home / "state.sqlite", home / "runs.duckdb", home / "logs"
    conn = connect(state)
    writer = LiveWriter(state)
    messages = [_messages(i) for i in range(LEDGER_RUNS)]
    ended = threading.Semaphore(0)
    rows: list[RunRow] = []
    try:
        t = time.perf_counter()
        for i in range(LEDGER_RUNS):
            row = RunRow(new_run_id(), "default", f"a{i % 10:04d}", "0" * 40, "manual", "queued",
                         queued_at="2026-11-28T18:00:00.000Z", requested_by="bench")
            record = RunRecord(writer, row, logs, on_end=lambda final: ended.release())
            record.begin(conn)  # the running row, durably, as launching.start does before submitting
            record.message({"t": "placed", "pid": 1000 + i, "node": "node-1", "executor": "ray"})
            for message in messages[i]:
                record.message(message)
            record.ended(Outcome("succeeded", output="done: 3 files summarized", cpu_seconds=0.4,
                                 max_rss_mb=80.0, bytes_written=2048))
            rows.append(record.row)
        for _ in range(LEDGER_RUNS):  # each run's final row is durable once its on_end ran
            ended.acquire()
        live = time.perf_counter() - t
        journal = _one(conn, "SELECT count(*) FROM journal")
        t = time.perf_counter()
        moved = flush(conn, ledger_path, wait=True)
        archive = time.perf_counter() - t
    finally:
        writer.close()
        conn.close()
    con = duckdb.connect(str(ledger_path), read_only=True)
    try:
        runs_in, events_in = _one(con, "SELECT count(*) FROM runs"), _one(con, "SELECT count(*) FROM run_events")
    finally:
        con.close()
    assert runs_in == LEDGER_RUNS and events_in == LEDGER_RUNS * (EVENTS_PER_RUN + 1), (runs_in, events_in)
    events = LEDGER_RUNS * (EVENTS_PER_RUN + 1)  # and the status event each run ends with
    base = _sqlite_baseline(root / "l" / "plain.sqlite", rows, messages)
    per_run = EVENTS_PER_RUN + 1
    both = live + archive
    print(f"ray: ledger, live writing (RunRecord + LiveWriter, {LEDGER_RUNS} runs of {per_run} events, until every "
          f"final row is durable): {live:5.2f} s = {events / live:8.0f} events/s, {LEDGER_RUNS / live:6.0f} runs/s")
    print(f"ray: ledger, archiving (flush of {moved} journal rows into DuckDB):             "
          f"{archive:5.2f} s = {events / archive:8.0f} events/s, {LEDGER_RUNS / archive:6.0f} runs/s")
    print(f"ray: ledger, baseline: plain SQLite insert loop of the same {journal} rows, one transaction: "
          f"{base:5.2f} s = {events / base:8.0f} events/s   ratio: live writing {base / live:.2f}x, "
          f"archiving {base / archive:.2f}x, both {base / both:.2f}x the plain loop's rate")
    ceiling = events / both
    need = ray_rate * per_run
    print(f"ray: one control plane records both in turn: {ceiling:8.0f} events/s = {LEDGER_RUNS / both:6.0f} runs/s. "
          f"Assuming a node runs R = {ray_rate:.1f} runs/s (figure 2, Ray, one node) of S = {per_run} events: "
          f"nodes = ceiling / (R*S) = {ceiling:.0f} / ({ray_rate:.1f}*{per_run}) = {ceiling / need:.1f} nodes "
          f"(at 1 run/s a node: {ceiling / per_run:.0f} nodes)")


def _sqlite_baseline(path: Path, rows: list[Any], messages: list[list[dict[str, Any]]]) -> float:
    """The same rows (each run's row twice: running, then ended; its events and the status event) as plain
    inserts of JSON into one SQLite table, one transaction, the settings of the state database."""
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=NORMAL")
    conn.execute("CREATE TABLE rows (id INTEGER PRIMARY KEY AUTOINCREMENT, tbl TEXT, row TEXT, run_id TEXT)")
    t = time.perf_counter()
    conn.execute("BEGIN")
    for row, said in zip(rows, messages, strict=True):
        ledger_row = row.as_ledger()
        conn.execute("INSERT INTO rows (tbl, row, run_id) VALUES (?, ?, ?)",
                     ("runs", json.dumps({**ledger_row, "status": "running"}), row.run_id))
        seq = 0
        for message in said:
            if message["t"] == "event":
                seq += 1
                event = {"run_id": row.run_id, "seq": seq, **{k: message[k] for k in
                                                              ("ts", "kind", "name", "decision", "detail")}}
                conn.execute("INSERT INTO rows (tbl, row, run_id) VALUES (?, ?, ?)",
                             ("run_events", json.dumps(event), row.run_id))
        conn.execute("INSERT INTO rows (tbl, row, run_id) VALUES (?, ?, ?)",
                     ("run_events", json.dumps({"run_id": row.run_id, "seq": seq + 1, "ts": row.ended_at,
                                                "kind": "status", "name": row.status}), row.run_id))
        conn.execute("INSERT INTO rows (tbl, row, run_id) VALUES (?, ?, ?)",
                     ("runs", json.dumps(ledger_row), row.run_id))
    conn.execute("COMMIT")
    elapsed = time.perf_counter() - t
    conn.close()
    return elapsed


# -- figure 4: node death --------------------------------------------------------------------------------


def long_repo(root: Path, placement: dict[str, Any] | None) -> Path:
    repo = root / "repo"
    (repo / "specs" / "_scripts").mkdir(parents=True)
    (repo / "specs" / "_scripts" / "long.yaml").write_text(yaml.safe_dump({"turns": [
        {"content": "waited", "sleep": 60, "usage": {"input_tokens": 10, "output_tokens": 5}}]}))
    spec: dict[str, Any] = {"name": "long", "description": "waits a minute", "model": "scripted:_scripts/long.yaml"}
    if placement:
        spec["placement"] = placement
    (repo / "specs" / "long.yaml").write_text(yaml.safe_dump(spec, sort_keys=False))
    commit_all(repo, "long")
    return repo


def time_to_end(root: Path, env: dict[str, str], kill: Any) -> tuple[float, str, str | None]:
    """Start the long run, wait until its agent code runs, ``kill(run_id, pid)``, and time until the daemon has
    ended it: seconds, the status, the error."""
    repo = long_repo(root, {"labels": {"zone": "doomed"}} if env else None)
    home = root / "home"
    # No ledger flush meanwhile: the run's live row (status) stays where the loop below reads it.
    proc = start_daemon(home, repo, AGENT_ORCH_FLUSH_INTERVAL="3600", **env)
    sock = socket_path(home, "default")
    try:
        answer = call(sock, {"op": "run", "agent": "long", "wait": False})
        assert answer and answer.get("ok"), answer
        run_id = answer["run_id"]
        log = home / "logs" / "agents" / "long.log"
        deadline = time.monotonic() + 120
        while not (log.exists() and f"run={run_id}" in log.read_text()):  # its agent code runs
            assert time.monotonic() < deadline, "the long run did not start"
            time.sleep(0.02)
        conn = sqlite3.connect(home / "state.sqlite", timeout=30)
        pid = conn.execute("SELECT pid FROM run_progress WHERE run_id = ?", (run_id,)).fetchone()[0]
        time.sleep(0.5)  # in flight, asleep in its model call
        t = time.monotonic()
        kill(run_id, pid)
        while True:
            row = conn.execute("SELECT status, row FROM run_progress WHERE run_id = ?", (run_id,)).fetchone()
            if row[0] not in ("queued", "running"):
                elapsed = time.monotonic() - t
                break
            assert time.monotonic() - t < 120, f"run still {row[0]} 120 s after its node died"
            time.sleep(0.02)
        conn.close()
    finally:
        stop(proc)
    return elapsed, row[0], json.loads(row[1]).get("error")


def node_death(root: Path, cluster: Cluster) -> None:
    doomed = cluster.add_node("doomed", {"zone": "doomed"})

    def remove(_run_id: str, _pid: int | None) -> None:
        cluster.note()
        cluster.ray_cluster.remove_node(doomed, allow_graceful=False)

    def sigkill(_run_id: str, pid: int | None) -> None:
        assert pid, "the local run has no pid"
        os.kill(pid, signal.SIGKILL)

    on_ray = time_to_end(root / "n-ray", cluster.daemon_env(), remove)
    local = time_to_end(root / "n-local", {}, sigkill)
    print(f"ray: node death, a run in flight on a node killed (no graceful shutdown; health check every 0.5 s, "
          f"3 misses) until the daemon has it {on_ray[1]}: {on_ray[0]:5.2f} s (goal < 10 s)  [{on_ray[2]}]")
    print(f"ray: baseline, a local run's process killed with SIGKILL until the daemon has it {local[1]}: "
          f"{local[0]:5.2f} s   ratio {on_ray[0] / max(local[0], 1e-3):.0f}x  [{local[2]}]")


# -- the benchmark ---------------------------------------------------------------------------------------


def inside(runs: int) -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-ray-"))
    ray_tmp = root / "tmp"
    (ray_tmp / "ray").mkdir(parents=True)
    os.environ["RAY_TMPDIR"] = str(ray_tmp)  # before Ray is imported: Cluster writes ray_current_cluster here
    cluster = None
    try:
        t = time.perf_counter()
        cluster = Cluster(root)
        print(f"ray: a one-node cluster on loopback, token authentication, up in {time.perf_counter() - t:.1f} s")
        dispatch(root, cluster)
        rate = throughput(root, cluster, runs)
        ledger(root, rate)
        node_death(root, cluster)
    finally:
        if cluster is not None:
            cluster.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench ray", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=1000, help="runs of the throughput figure (default 1000)")
    args = parser.parse_args()
    others = [name for _index, name in socket.if_nameindex() if name != "lo"]
    if not others:
        inside(args.runs)
        return
    if os.environ.get(INSIDE):
        print(f"ray: the Ray benchmark is skipped: its network namespace still has {', '.join(others)}")
        return
    netns = ["unshare", "-n", "sh", "-c", 'ip link set lo up && exec "$0" "$@"']
    try:
        probe = subprocess.run([*netns, "true"], capture_output=True, text=True, timeout=30, check=False)
        why = None if probe.returncode == 0 else (probe.stderr.strip() or f"exit {probe.returncode}")
    except (OSError, subprocess.TimeoutExpired) as exc:
        why = str(exc)
    if why is not None:
        print(f"ray: the Ray benchmark is skipped: it runs only in a private network namespace (Ray sends traffic "
              f"to the machine's own address; this one has {', '.join(others)}), and unshare -n failed: {why}")
        return
    done = subprocess.run([*netns, sys.executable, "-m", "bench", "ray", "--runs", str(args.runs)], cwd=ROOT,
                          env={**os.environ, INSIDE: "1"}, check=False)
    if done.returncode != 0:
        raise SystemExit(f"ray: the benchmark failed in its network namespace (exit {done.returncode})")


if __name__ == "__main__":
    main()
