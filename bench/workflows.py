"""Workflows (issue 14): the engine's own cost, beside the same runs submitted directly, in one daemon.

A workflow of 1 + 200 trivial scripted step runs: a first step answers a JSON list of 100 items, a fan-out runs
one step per item (max_parallel 100: MAX_AGENTS bounds it), then a chain of 100 steps each needing the one before
(each passes the previous one's answer on). The baseline is the same runs submitted to the same daemon over its
control socket, in the same shape: the first run, then the 100 at once (waiting until nothing is in flight), then
the 100 one after another, each submitted when the previous one's answer came back.

- total seconds each way, median of BENCH_WF_REPEAT rounds (3) that alternate which goes first, after one round
  of each to warm the daemon (not counted); MAX_AGENTS=8 (2 cores) for both.
- the engine's extra cost per step = (workflow time - direct time) / step runs. Goal (issue 14): <= 5 ms.
- from the last step's run ending (its ended_at in the ledger) to the workflow's end (its ended_at), median.
- the daemon process's own CPU per step run each way (not the runs': they are the zygote's children), which
  the machine's noise moves less than wall time.

Times: the workflow's from just before `workflow.run` is sent to its ended_at (the engine's stamp); the direct
one's from just before the first run is submitted to the last run's answer coming back. The fan-out's end is
seen by polling the daemon's `ping` every 10 ms (up to 10 ms the baseline's, once per round).

Besides, from the ledger: how soon the fan-out's runs were submitted, when its last run ended and the first link
was submitted, how long from a link's end to the next one's submission (the engine's or the client's reaction),
and a link's own time.

BENCH_WF_PROFILE=cpu runs the daemon with each part of the engine timed in its thread's CPU (a table, per event);
BENCH_WF_PROFILE=1 runs the engine's event handler under cProfile instead (thread CPU; cProfile's own overhead
inflates call-heavy parts). BENCH_WF_FAN, BENCH_WF_CHAIN, BENCH_WF_MAX_AGENTS change the shape.
"""

from __future__ import annotations

import itertools
import json
import os
import shutil
import sqlite3
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import UTC
from pathlib import Path
from typing import Any

import duckdb
import yaml

from bench import commit_all, daemon
from runner.ledger.workflows import get_workflow_run
from runner.state import connect
from runner.supervise.control import call, socket_path
from runner.times import parse

FAN = int(os.environ.get("BENCH_WF_FAN", "100"))
CHAIN = int(os.environ.get("BENCH_WF_CHAIN", "100"))
REPEAT = int(os.environ.get("BENCH_WF_REPEAT", "3"))
MAX_AGENTS = os.environ.get("BENCH_WF_MAX_AGENTS", "8")
PROFILE = os.environ.get("BENCH_WF_PROFILE", "")  # "cpu": time the engine's events; "1": cProfile too
RUNS = 1 + FAN + CHAIN  # the list step, the fan-out, the chain
ITEMS = [f"i{i:03d}" for i in range(FAN)]
WORKFLOW = "bench-flow"
POLL = 0.01  # the direct fan-out's end: ping every 10 ms
WAIT_POLL = 0.05  # the workflow's end: read its state every 50 ms (its time is its own ended_at, not this)

# BENCH_WF_PROFILE: the engine's parts timed in the daemon, in its engine thread's CPU (not GIL waits), inclusive.
ENGINE_METHODS = ("_handle", "_item_ended", "_step_done", "_advance", "_progress", "_begin", "_start_items",
                  "_submit", "_steps", "_items", "_approvals", "_failure", "_arm", "_finish", "_set_step")
ENGINE_FUNCTIONS = ("step_context", "items_of", "decide_if", "order", "step_outcome", "journal_run")


def serve_profiled() -> None:
    """The daemon, its engine timed: `python -c 'from bench.workflows import serve_profiled; serve_profiled()'
    OUT MODE --home HOME serve`. MODE "cpu": each part of the engine (ENGINE_METHODS, ENGINE_FUNCTIONS, the spec's
    parsing, the process table's submit) timed in thread CPU when the engine thread calls it; "1": cProfile around
    the event handler instead (thread CPU too). Written to OUT.json (and OUT) as the daemon exits."""
    import atexit
    import cProfile
    import functools
    import runpy
    import threading
    import types

    from runner.supervise import table, workflows

    out, mode = sys.argv.pop(1), sys.argv.pop(1)
    prof = cProfile.Profile(time.thread_time)
    spent: dict[str, list[float]] = {}

    def timed(name: str, fn: Any) -> Any:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            if not threading.current_thread().name.startswith("workflows-"):
                return fn(*args, **kwargs)
            cpu, wall = time.thread_time(), time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                row = spent.setdefault(name, [0, 0.0, 0.0])
                row[0] += 1
                row[1] += time.thread_time() - cpu
                row[2] += time.perf_counter() - wall
        return wrapper

    def handle(self: Any, event: Any) -> Any:
        prof.enable()
        try:
            return inner(self, event)
        finally:
            prof.disable()

    engine = workflows.WorkflowEngine
    if mode == "1":
        inner = engine._handle
        engine._handle = timed("events", handle)  # type: ignore[method-assign]
    else:
        for name in ENGINE_METHODS:
            if hasattr(engine, name):
                setattr(engine, name, timed(f"engine.{name}", getattr(engine, name)))
        for name in ENGINE_FUNCTIONS:
            if hasattr(workflows, name):
                setattr(workflows, name, timed(name, getattr(workflows, name)))
        spec = getattr(workflows, "WorkflowSpec")  # noqa: B009 (not a name the module exports)
        setattr(workflows, "WorkflowSpec", types.SimpleNamespace(  # noqa: B010
            model_validate_json=timed("WorkflowSpec.model_validate_json", spec.model_validate_json)))
        table.ProcessTable.submit = timed("table.submit", table.ProcessTable.submit)  # type: ignore[method-assign]

    def dump() -> None:
        Path(f"{out}.json").write_text(json.dumps(spent))
        if mode == "1":
            prof.dump_stats(out)

    atexit.register(dump)
    sys.argv = ["runner", *sys.argv[1:]]
    runpy.run_module("runner", run_name="__main__", alter_sys=True)


def make_repo(root: Path) -> Path:
    repo = root / "repo"
    scripts = repo / "specs" / "_scripts"
    scripts.mkdir(parents=True)
    (scripts / "echo.yaml").write_text(yaml.safe_dump({"turns": [{"content": "${INPUT}"}]}))
    (scripts / "lister.yaml").write_text(yaml.safe_dump({"turns": [{"content": json.dumps(ITEMS)}]}))

    def agent(name: str, script: str) -> None:
        (repo / "specs" / f"{name}.yaml").write_text(yaml.safe_dump(
            {"name": name, "description": "trivial", "model": f"scripted:_scripts/{script}.yaml", "overlap": "queue"}))

    agent("lister", "lister")
    agent("echo", "echo")
    for i in range(FAN):  # the baseline's fan-out: one run of an agent at a time holds for direct runs
        agent(f"f{i:03d}", "echo")
    steps: list[dict[str, Any]] = [
        {"id": "list", "agent": "lister", "input": "list"},
        {"id": "fan", "needs": ["list"], "agent": "echo", "for_each": "steps.list.json", "max_parallel": FAN,
         "input": "{{ item }}"},
        {"id": "c000", "needs": ["fan"], "agent": "echo", "input": "{{ steps.fan.outputs | length }}"}]
    for i in range(1, CHAIN):
        steps.append({"id": f"c{i:03d}", "needs": [f"c{i - 1:03d}"], "agent": "echo",
                      "input": f"{{{{ steps.c{i - 1:03d}.output }}}}"})
    (repo / "specs" / f"{WORKFLOW}.yaml").write_text(yaml.safe_dump(
        {"kind": "workflow", "name": WORKFLOW, "description": "the engine's own cost", "steps": steps},
        sort_keys=False))
    commit_all(repo, "bench workflows")
    return repo


def start_daemon(home: Path, repo: Path, profile: Path | None) -> subprocess.Popen[bytes]:
    if profile is None:
        return daemon.start_daemon(home, repo, MAX_AGENTS=MAX_AGENTS)
    here = str(Path(__file__).resolve().parent.parent)
    return daemon.start_daemon(home, repo, python=("-c", "from bench.workflows import serve_profiled; serve_profiled()",
                                                   str(profile), PROFILE), MAX_AGENTS=MAX_AGENTS,
                               PYTHONPATH=os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p))


def _idle(sock: Path, poll: float) -> None:
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        answer = call(sock, {"op": "ping"})
        if answer and answer["running"] + answer["queued"] == 0:
            return
        time.sleep(poll)
    raise RuntimeError("the daemon's runs did not end within 300 s")


def _cpu(pid: int) -> float:
    """The process's own CPU seconds so far (user and system, all its threads; not its children's)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def via_workflow(sock: Path, conn: sqlite3.Connection) -> dict[str, Any]:
    """One workflow run, start to end; its times, and its runs' ids (fan-out, chain) for the ledger."""
    t0 = time.time()
    answer = call(sock, {"op": "workflow.run", "workflow": WORKFLOW, "inputs": {}})
    assert answer and answer.get("ok"), answer
    wf_id = answer["workflow_run_id"]
    deadline = time.monotonic() + 300
    while True:
        run = get_workflow_run(conn, "default", wf_id)
        if run is not None and run["status"] != "running":
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"workflow run {wf_id} did not end within 300 s")
        time.sleep(WAIT_POLL)
    assert run["status"] == "succeeded", (run["status"], run["error"])
    steps = {s["step"]: s for s in run["steps"]}
    ran = [r for s in run["steps"] for r in s["runs"]]
    assert len(ran) == RUNS and all(r["status"] == "succeeded" for r in ran), "a step run did not succeed"
    assert len(steps["fan"]["runs"]) == FAN
    chain = [steps[f"c{i:03d}"]["runs"][0] for i in range(CHAIN)]
    ended = parse(run["ended_at"]).timestamp()
    return {"t0": t0, "total": ended - t0, "end": ended, "heard": parse(chain[-1]["ended_at"]).timestamp(),
            "list": steps["list"]["runs"][0]["run_id"], "fan": [r["run_id"] for r in steps["fan"]["runs"]],
            "chain": [r["run_id"] for r in chain]}


def direct(sock: Path) -> dict[str, Any]:
    """The same runs, submitted over the control socket in the same shape."""
    t0 = time.time()
    answer = call(sock, {"op": "run", "agent": "lister", "input": "list", "wait": True})
    assert answer and answer["status"] == "succeeded", answer
    first, fan, chain = answer["run_id"], [], []
    for i, item in enumerate(ITEMS):
        answer = call(sock, {"op": "run", "agent": f"f{i:03d}", "input": item, "wait": False})
        assert answer and answer.get("ok"), answer
        fan.append(answer["run_id"])
    _idle(sock, POLL)
    for _ in range(CHAIN):
        answer = call(sock, {"op": "run", "agent": "echo", "input": str(FAN), "wait": True})
        assert answer and answer["status"] == "succeeded", answer
        chain.append(answer["run_id"])
    end = time.time()
    return {"t0": t0, "total": end - t0, "end": end, "list": first, "fan": fan, "chain": chain}


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-workflows-"))
    try:
        repo = make_repo(root)
        home = root / "home"
        profile = root / "engine.prof" if PROFILE else None
        proc = start_daemon(home, repo, profile)
        sock = socket_path(home, "default")
        conn = connect(home / "state.sqlite")
        flows: list[dict[str, Any]] = []
        directs: list[dict[str, Any]] = []
        t_all = time.perf_counter()
        try:
            via_workflow(sock, conn)  # warm: imports, templates, every agent's spec read once
            direct(sock)
            for r in range(REPEAT):
                for way in (("w", "d") if r % 2 == 0 else ("d", "w")):
                    _idle(sock, 0.05)
                    cpu = _cpu(proc.pid)
                    done = via_workflow(sock, conn) if way == "w" else direct(sock)
                    done["cpu"] = _cpu(proc.pid) - cpu
                    (flows if way == "w" else directs).append(done)
        finally:
            proc.terminate()  # the daemon flushes the ledger as it stops
            proc.wait(timeout=120)
            conn.close()
        report(home, flows, directs, time.perf_counter() - t_all)
        if profile is not None:
            show_profile(profile)
    finally:
        shutil.rmtree(root, ignore_errors=True)


def _ledger(home: Path) -> tuple[dict[str, dict[str, float]], dict[str, int]]:
    """Every run's queued_at, started_at and ended_at (epoch seconds), and the runs by status."""
    con = duckdb.connect(str(home / "runs.duckdb"), read_only=True)
    try:
        rows = con.execute("SELECT run_id, queued_at, started_at, ended_at FROM runs").fetchall()
        counts = dict(con.execute("SELECT status, count(*) FROM runs GROUP BY status").fetchall())
    finally:
        con.close()
    return ({r[0]: {k: v.replace(tzinfo=UTC).timestamp() for k, v in zip(("queued", "started", "ended"), r[1:],
                                                                            strict=True)}
             for r in rows}, counts)


def _shape(x: dict[str, Any], runs: dict[str, dict[str, float]]) -> dict[str, float]:
    """From the ledger: the fan-out's first run submitted ``fan_start`` after the first step's run ended, its
    last one ``fan_submit`` after its first; when the fan-out's last run ended, the step after it was submitted
    (queued) after ``drain``; each link of the chain was submitted ``hop`` after the one before ended, started
    ``dispatch`` after it was submitted, ended ``run`` after it started (medians)."""
    fan_end = max(runs[r]["ended"] for r in x["fan"])
    queued = sorted(runs[r]["queued"] for r in x["fan"])
    chain = [runs[r] for r in x["chain"]]
    return {"fan": fan_end - x["t0"], "fan_start": queued[0] - runs[x["list"]]["ended"],
            "fan_submit": queued[-1] - queued[0], "drain": chain[0]["queued"] - fan_end,
            "hop": statistics.median(b["queued"] - a["ended"] for a, b in itertools.pairwise(chain)),
            "dispatch": statistics.median(c["started"] - c["queued"] for c in chain),
            "run": statistics.median(c["ended"] - c["started"] for c in chain),
            "tail": x["end"] - chain[-1]["ended"]}


def report(home: Path, flows: list[dict[str, Any]], directs: list[dict[str, Any]], elapsed: float) -> None:
    runs, counts = _ledger(home)
    n = len(flows)
    w, d = (statistics.median(x["total"] for x in xs) for xs in (flows, directs))
    ws, ds = ({k: statistics.median(s[k] for s in shapes) for k in shapes[0]}
              for shapes in ([_shape(x, runs) for x in flows], [_shape(x, runs) for x in directs]))
    heard = statistics.median(f["heard"] - runs[f["chain"][-1]]["ended"] for f in flows)
    print(f"workflows: {RUNS} step runs as one workflow (1, a fan-out of {FAN}, a chain of {CHAIN}), "
          f"MAX_AGENTS={MAX_AGENTS} (median of {n})  {w:7.2f} s")
    print(f"workflows: the same {RUNS} runs submitted directly to the same daemon (baseline, median of {n}) "
          f"{d:7.2f} s   ratio {w / d:.2f}x")
    print(f"workflows: the engine's extra cost per step {(w - d) / RUNS * 1000:7.2f} ms (goal <= 5 ms)")
    wc, dc = (statistics.median(x["cpu"] for x in xs) / RUNS * 1000 for xs in (flows, directs))
    print(f"workflows: the daemon's CPU per step run {wc:6.2f} ms; directly (baseline: its socket requests and "
          f"the baseline's polls included) {dc:6.2f} ms; difference {wc - dc:6.2f} ms")
    print(f"workflows: last step's run ended -> workflow ended (median of {n}) {ws['tail'] * 1000:7.1f} ms "
          f"(the engine wrote the step's end {heard * 1000:.1f} ms after the run's)")
    ms = {k: f"{ws[k] * 1000:.1f} / {ds[k] * 1000:.1f} ms" for k in ws}
    print(f"workflows: where, fan-out (workflow / direct, medians): first step's run ended -> first fan-out run "
          f"submitted {ms['fan_start']}, all {FAN} submitted within {ms['fan_submit']}; first and fan-out runs all "
          f"ended {ws['fan']:.2f} / {ds['fan']:.2f} s; the last of them ended -> first link submitted {ms['drain']}")
    print(f"workflows: where, chain (workflow / direct, medians): a link ended -> the next submitted {ms['hop']}; "
          f"submitted -> started {ms['dispatch']}; started -> ended {ms['run']}")
    rounds = {way: ", ".join(f"{x['total']:.2f}" for x in xs) for way, xs in (("w", flows), ("d", directs))}
    print(f"workflows: rounds: workflow {rounds['w']} s; direct {rounds['d']} s; ledger runs {counts} "
          f"(expected {(REPEAT + 1) * RUNS * 2} succeeded); bench {elapsed:.0f} s")


def show_profile(path: Path) -> None:
    import pstats

    spent = Path(f"{path}.json")
    if not spent.exists():
        print("workflows: no profile written (the daemon did not exit cleanly)")
        return
    parts = json.loads(spent.read_text())
    events = parts.get("engine._handle", parts.get("events", [1]))[0]
    print(f"workflows: the engine's thread CPU by part, inclusive (nested parts count in their callers too), over "
          f"{events} events (the warm-up and every round):")
    for name, (calls, cpu, wall) in sorted(parts.items(), key=lambda kv: -kv[1][1]):
        print(f"workflows:   {name:36s} {calls:6d} calls  CPU {cpu:6.2f} s = {cpu / events * 1000:6.2f} ms/event   "
              f"wall {wall:6.2f} s")
    if path.exists():
        stats = pstats.Stats(str(path))
        stats.sort_stats("cumulative").print_stats(45)
        stats.sort_stats("tottime").print_stats(25)


if __name__ == "__main__":
    main()
