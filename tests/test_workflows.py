"""The workflow engine's semantics against a real daemon (`python -m runner serve` in a subprocess).

Each test writes scripted agents and a `kind: workflow` spec into a real git repository, commits, starts a daemon
on a fresh home and drives it through the control socket (the op the CLI and the API use): fan-out and joins,
data between steps, `if`, retries, failures, budgets, deadlines, approvals, kill -9 of the daemon, resume, cancel.
What happened is read from the live store (the reads `agentctl workflow status` uses) and from the ledger.
Every wait is a bounded poll of a condition; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import yaml
from conftest import SpecRepo, git, poll
from daemon_helpers import Daemon, progress_of, state_rows, wait_ledger
from test_daemon import MakeDaemon, daemons  # noqa: F401 (the fixture)
from test_run import call, scripted_agent, turn

from runner.ledger.workflows import get_workflow_run
from runner.supervise.control import call as socket_call

Turns = list[dict[str, Any]]
ECHO: Turns = [turn(content="${INPUT}")]  # answers the run's input
BROKEN: Turns = []  # no turns: the first model call fails ("the scripted model has only 0 turn(s)")
ENDED = ("succeeded", "failed", "timed_out", "budget_exceeded", "stopped", "interrupted")


# -- helpers -------------------------------------------------------------------------------------------------


def workflow_spec(repo: SpecRepo, name: str, steps: list[dict[str, Any]], **fields: Any) -> None:
    body = {"kind": "workflow", "name": name, **fields, "steps": steps}
    repo.write(f"specs/{name}.yaml", yaml.safe_dump(body, sort_keys=False))


def setup(repo: SpecRepo, daemons: MakeDaemon, agents: dict[str, Turns | tuple[Turns, dict[str, Any]]],  # noqa: F811
          steps: list[dict[str, Any]], *, name: str = "flow", **fields: Any) -> Daemon:
    """Scripted agents (turns, or (turns, extra spec fields)) and the workflow NAME, committed; a daemon started."""
    for agent, script in agents.items():
        turns, extra = script if isinstance(script, tuple) else (script, {})
        scripted_agent(repo, agent, turns, **extra)
    workflow_spec(repo, name, steps, **fields)
    repo.commit(f"workflow {name}")
    return daemons()


def run_flow(daemon: Daemon, name: str = "flow", inputs: dict[str, Any] | None = None) -> str:
    answer = daemon.call({"op": "workflow.run", "workflow": name, "inputs": inputs or {}, "requested_by": "test"})
    assert answer["status"] == "running", answer
    return str(answer["workflow_run_id"])


def wf(home: Path, wid: str) -> dict[str, Any]:
    """The workflow run as `agentctl workflow status` reads it (the live store), with steps keyed by id."""
    conn = sqlite3.connect(home / "state.sqlite", timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        run = get_workflow_run(conn, "default", wid)
    finally:
        conn.close()
    assert run is not None, wid
    run["by_step"] = {s["step"]: s for s in run["steps"]}
    return run


def wait_wf(home: Path, wid: str, what: str = "the workflow run to end", timeout: float = 30.0,
            until: Callable[[dict[str, Any]], bool] | None = None) -> dict[str, Any]:
    """Poll the workflow run until ``until(run)`` (default: it has ended); the run."""
    def check() -> dict[str, Any] | None:
        run = wf(home, wid)
        return run if (until(run) if until else run["status"] != "running") else None

    found: dict[str, Any] = poll(check, what, timeout, every=0.1)
    return found


def step_status(run: dict[str, Any]) -> dict[str, str]:
    return {s["step"]: s["status"] for s in run["steps"]}


def step_runs(home: Path, wid: str, *, settled: int, timeout: float = 20.0) -> list[dict[str, Any]]:
    """The ledger's runs rows of the workflow run, oldest first, once there are ``settled`` of them, all ended."""
    sql = "SELECT * FROM runs WHERE workflow_run_id = ? ORDER BY coalesce(started_at, queued_at), run_id"
    return wait_ledger(home, sql, [wid], what=f"{settled} ended runs of workflow run {wid} in the ledger",
                       until=lambda rows: len(rows) == settled and all(r["status"] in ENDED for r in rows),
                       timeout=timeout)


def per_step(rows: list[dict[str, Any]]) -> dict[str, int]:
    out: dict[str, int] = {}
    for r in rows:
        out[r["step"]] = out.get(r["step"], 0) + 1
    return out


def running_run(home: Path, wid: str, step: str) -> dict[str, Any]:
    """Wait for the step's run to be running with a pid; its run_progress row."""
    def found() -> dict[str, Any] | None:
        rows = state_rows(home, "SELECT p.* FROM wf_items i JOIN run_progress p USING (run_id) WHERE "
                          "i.workflow_run_id = ? AND i.step = ? AND i.status = 'running' AND p.status = 'running' "
                          "AND p.pid IS NOT NULL", (wid, step))
        return rows[0] if rows else None

    row: dict[str, Any] = poll(found, f"step {step}'s run to be running", 30)
    return row


def peak(rows: list[dict[str, Any]]) -> int:
    """The most runs in flight at once, from their started_at / ended_at (an end before a start at a tie)."""
    moments = sorted([(r["started_at"], 1) for r in rows] + [(r["ended_at"], -1) for r in rows])
    now = most = 0
    for _at, change in moments:
        now += change
        most = max(most, now)
    return most


def workflow_ledger(home: Path, wid: str, until: Callable[[dict[str, Any]], bool], what: str) -> dict[str, Any]:
    """The ledger's workflow_runs row of the run, once ``until(row)``."""
    rows = wait_ledger(home, "SELECT * FROM workflow_runs WHERE workflow_run_id = ?", [wid],
                       until=lambda rows: bool(rows) and until(rows[0]), what=what)
    return rows[0]


# -- the DAG: fan-out, joins, data between steps, if ---------------------------------------------------------


def test_a_fan_out_keeps_item_order_within_max_parallel_and_a_join_sees_all(
        repo: SpecRepo, home: Path, daemons: MakeDaemon) -> None:  # noqa: F811
    # Each item sleeps as long as it says, so the items end in another order than they were given.
    sleeper = [{"sleep": "${INPUT}", "content": "slept ${INPUT}", "usage": {"input_tokens": 1, "output_tokens": 1}}]
    daemon = setup(repo, daemons, {"lister": [turn(content="[1.2, 0.1, 0.6, 0.2, 0.1]")], "sleeper": sleeper,
                                   "echo": ECHO}, [
        {"id": "list", "agent": "lister", "input": "list"},
        {"id": "fan", "needs": ["list"], "agent": "sleeper", "for_each": "steps.list.json", "input": "{{ item }}",
         "max_parallel": 2},
        {"id": "join", "needs": ["fan"], "agent": "echo", "input": "{{ steps.fan.outputs | join(',') }}"},
    ])
    wid = run_flow(daemon)
    ended = wait_wf(home, wid)
    assert ended["status"] == "succeeded", ended
    fan = ended["by_step"]["fan"]["runs"]
    assert [r["item"] for r in fan] == [1.2, 0.1, 0.6, 0.2, 0.1]
    assert all(r["status"] == "succeeded" for r in fan)

    rows = step_runs(home, wid, settled=7)
    fanned = [r for r in rows if r["step"] == "fan"]
    assert len(fanned) == 5 and peak(fanned) <= 2, [(r["started_at"], r["ended_at"]) for r in fanned]
    (join,) = [r for r in rows if r["step"] == "join"]
    assert join["output"] == "slept 1.2,slept 0.1,slept 0.6,slept 0.2,slept 0.1"  # item order, not end order
    assert join["trigger"] == "workflow" and join["agent"] == "echo"


def test_outputs_and_json_pass_between_steps(repo: SpecRepo, home: Path, daemons: MakeDaemon) -> None:  # noqa: F811
    answer = '```json\n{"name": "ada", "tags": ["x", "y", "z"]}\n```'  # JSON inside a fence counts as JSON
    daemon = setup(repo, daemons, {"data": [turn(content=answer)], "echo": ECHO}, [
        {"id": "data", "agent": "data", "input": "for {{ inputs.who }}"},
        {"id": "named", "needs": ["data"], "agent": "echo",
         "input": "{{ inputs.who }}: {{ steps.data.json.name }} has {{ steps.data.json.tags | length }} tags"},
        {"id": "fan", "needs": ["data"], "agent": "echo", "for_each": "steps.data.json.tags",
         "input": "tag {{ item }}"},
        {"id": "all", "needs": ["named", "fan"], "agent": "echo",
         "input": "{{ steps.fan.outputs | join('+') }} / {{ steps.named.output }} / {{ steps.fan.status }}"},
    ], inputs={"who": {"type": "string"}})
    wid = run_flow(daemon, inputs={"who": "bob"})
    assert wait_wf(home, wid)["status"] == "succeeded"
    rows = {(r["step"], r["input"]): r for r in step_runs(home, wid, settled=6)}
    assert rows[("data", "for bob")]["output"] == answer
    assert rows[("named", "bob: ada has 3 tags")]["output"] == "bob: ada has 3 tags"
    assert {k for k in rows if k[0] == "fan"} == {("fan", "tag x"), ("fan", "tag y"), ("fan", "tag z")}
    (final,) = [r for k, r in rows.items() if k[0] == "all"]
    assert final["output"] == "tag x+tag y+tag z / bob: ada has 3 tags / succeeded"


def test_a_false_if_skips_the_step_and_a_step_needing_it_still_runs(
        repo: SpecRepo, home: Path, daemons: MakeDaemon) -> None:  # noqa: F811
    daemon = setup(repo, daemons, {"echo": ECHO}, [
        {"id": "first", "agent": "echo", "input": "go"},
        {"id": "maybe", "needs": ["first"], "agent": "echo", "if": "steps.first.output != 'go'", "input": "no"},
        {"id": "surely", "needs": ["first"], "agent": "echo", "if": "steps.first.output == 'go'", "input": "yes"},
        {"id": "after", "needs": ["maybe"], "agent": "echo", "input": "maybe was {{ steps.maybe.status }}"},
    ])
    wid = run_flow(daemon)
    ended = wait_wf(home, wid)
    assert ended["status"] == "succeeded", ended
    assert step_status(ended) == {"first": "succeeded", "maybe": "skipped", "surely": "succeeded",
                                  "after": "succeeded"}
    assert ended["by_step"]["maybe"]["runs"] == []
    rows = step_runs(home, wid, settled=3)
    assert per_step(rows) == {"first": 1, "surely": 1, "after": 1}
    assert [r["output"] for r in rows if r["step"] == "after"] == ["maybe was skipped"]


# -- failures and retries ------------------------------------------------------------------------------------


def test_a_killed_run_is_retried_and_the_retry_succeeds(repo: SpecRepo, home: Path, daemons: MakeDaemon) -> None:  # noqa: F811
    daemon = setup(repo, daemons, {"flaky": [turn(content="made it", sleep=3)]}, [
        {"id": "work", "agent": "flaky", "input": "go", "retry": {"limit": 2, "backoff": 0, "on": ["failed"]}},
    ])
    wid = run_flow(daemon)
    first = running_run(home, wid, "work")
    os.kill(int(first["pid"]), signal.SIGKILL)

    ended = wait_wf(home, wid)
    assert ended["status"] == "succeeded", ended
    (item,) = ended["by_step"]["work"]["runs"]
    assert item["attempt"] == 2 and item["run_id"] != first["run_id"]
    rows = step_runs(home, wid, settled=2)
    assert [(r["run_id"], r["status"], r["attempt"], r["retry_of"]) for r in rows] == [
        (first["run_id"], "failed", 1, None), (item["run_id"], "succeeded", 2, first["run_id"])]
    assert rows[1]["output"] == "made it"


def test_a_failing_step_fails_the_workflow_and_lets_a_running_branch_finish(
        repo: SpecRepo, home: Path, daemons: MakeDaemon) -> None:  # noqa: F811
    daemon = setup(repo, daemons, {"slow": [turn(content="slow done", sleep=4)], "broken": BROKEN, "echo": ECHO}, [
        {"id": "slow", "agent": "slow", "input": "go"},
        {"id": "bad", "agent": "broken", "input": "go"},
        {"id": "after_slow", "needs": ["slow"], "agent": "echo", "input": "x"},
        {"id": "after_bad", "needs": ["bad"], "agent": "echo", "input": "y"},
    ])
    wid = run_flow(daemon)
    ended = wait_wf(home, wid)
    assert ended["status"] == "failed", ended
    assert "step 'bad'" in ended["error"] and "scripted model has only 0 turn(s)" in ended["error"], ended["error"]
    steps = step_status(ended)
    assert steps["slow"] == "succeeded" and steps["bad"] == "failed"
    assert steps["after_slow"] in ("pending", "skipped") and steps["after_bad"] in ("pending", "skipped"), steps
    rows = {r["step"]: r for r in step_runs(home, wid, settled=2)}
    assert {k: r["status"] for k, r in rows.items()} == {"slow": "succeeded", "bad": "failed"}
    assert rows["slow"]["started_at"] < rows["bad"]["ended_at"]  # it was running when bad failed, and finished


def test_continue_on_error_lets_the_workflow_succeed(repo: SpecRepo, home: Path, daemons: MakeDaemon) -> None:  # noqa: F811
    daemon = setup(repo, daemons, {"broken": BROKEN, "echo": ECHO}, [
        {"id": "bad", "agent": "broken", "input": "go", "continue_on_error": True},
        {"id": "other", "agent": "echo", "input": "fine"},
        {"id": "last", "needs": ["other"], "agent": "echo", "input": "after {{ steps.other.output }}"},
        {"id": "after_bad", "needs": ["bad"], "agent": "echo", "input": "{{ steps.bad.output }}"},
    ])
    wid = run_flow(daemon)
    ended = wait_wf(home, wid)
    assert ended["status"] == "succeeded", ended
    # A step that needs the failed one still waits for its success: it is skipped, and the workflow goes on.
    assert step_status(ended) == {"bad": "failed", "other": "succeeded", "last": "succeeded", "after_bad": "skipped"}
    assert "0 turn(s)" in ended["by_step"]["bad"]["error"]
    rows = step_runs(home, wid, settled=3)
    assert {r["step"]: r["status"] for r in rows} == {"bad": "failed", "other": "succeeded", "last": "succeeded"}
    assert [r["output"] for r in rows if r["step"] == "last"] == ["after fine"]


def test_an_answer_over_16000_characters_fails_its_step(repo: SpecRepo, home: Path, daemons: MakeDaemon) -> None:  # noqa: F811
    daemon = setup(repo, daemons, {"verbose": [turn(content="x" * 20_000)], "echo": ECHO}, [
        {"id": "big", "agent": "verbose", "input": "go"},
        {"id": "next", "needs": ["big"], "agent": "echo", "input": "{{ steps.big.output }}"},
    ])
    wid = run_flow(daemon)
    ended = wait_wf(home, wid)
    assert ended["status"] == "failed", ended
    big = ended["by_step"]["big"]
    assert big["status"] == "failed"
    assert "20000 characters" in big["error"] and "write the data to a file" in big["error"], big["error"]
    assert "step 'big'" in ended["error"]
    assert ended["by_step"]["next"]["runs"] == []


# -- budgets and time ----------------------------------------------------------------------------------------


def test_the_workflow_token_budget_stops_a_step_mid_run(
        repo: SpecRepo, home: Path, daemons: MakeDaemon, tmp_path: Path) -> None:  # noqa: F811
    data = tmp_path / "data"
    data.mkdir()
    reader = [{"name": "file_reader", "paths": [str(data)]}]
    spender = [turn(call("file_reader", path=str(data)), usage=(20, 10)) for _ in range(4)] + [turn(content="done")]
    daemon = setup(repo, daemons, {
        "cheap": [turn(content="cheap", usage=(30, 10))],
        "spender": (spender, {"tools": reader, "constraints": {"max_tokens": 10_000}}),
        "echo": ECHO}, [
        {"id": "first", "agent": "cheap", "input": "go"},
        {"id": "spend", "needs": ["first"], "agent": "spender", "input": "go"},
        {"id": "never", "needs": ["spend"], "agent": "echo", "input": "z"},
    ], constraints={"max_tokens": 100})
    wid = run_flow(daemon)
    ended = wait_wf(home, wid)
    assert ended["status"] == "budget_exceeded", ended
    spend = ended["by_step"]["spend"]
    assert spend["status"] == "budget_exceeded"
    assert "token budget of 60" in spend["error"], spend["error"]  # 100 less the first step's 40
    assert ended["by_step"]["never"]["runs"] == []
    assert ended["input_tokens"] + ended["output_tokens"] <= 100, ended
    rows = step_runs(home, wid, settled=2)
    assert sum(r["input_tokens"] + r["output_tokens"] for r in rows) <= 100
    assert [r["model_calls"] for r in rows if r["step"] == "spend"] == [2]  # stopped mid-step
    stored = workflow_ledger(home, wid, lambda r: r["status"] == "budget_exceeded", "the ledger's workflow row")
    assert stored["input_tokens"] + stored["output_tokens"] <= 100


def test_the_workflow_deadline_stops_a_step_in_flight(repo: SpecRepo, home: Path, daemons: MakeDaemon) -> None:  # noqa: F811
    daemon = setup(repo, daemons, {"sleepy": ([turn(content="too late", sleep=60)], {"constraints": {
        "max_runtime": 120}})}, [{"id": "nap", "agent": "sleepy", "input": "go"}], constraints={"max_runtime": 3})
    begun = time.monotonic()
    wid = run_flow(daemon)
    ended = wait_wf(home, wid, timeout=45)
    assert time.monotonic() - begun < 45  # stopped mid-step, well before the turn's 60 s
    assert ended["status"] == "timed_out", ended
    assert "max_runtime of 3s" in (ended["error"] or ""), ended
    (row,) = step_runs(home, wid, settled=1)
    assert row["output"] is None and row["status"] != "succeeded"
    # The run the deadline stops ends timed_out, saying why, as its step does (not "stopped on request").
    assert row["status"] == "timed_out", (row["status"], row["error"])
    assert "max_runtime of 3s" in (row["error"] or ""), row
    assert ended["by_step"]["nap"]["status"] == "timed_out", ended["by_step"]["nap"]


# -- approvals -----------------------------------------------------------------------------------------------


def test_approvals_through_the_control_socket_are_in_the_ledger(
        repo: SpecRepo, home: Path, daemons: MakeDaemon) -> None:  # noqa: F811
    daemon = setup(repo, daemons, {"echo": ECHO}, [
        {"id": "draft", "agent": "echo", "input": "draft"},
        {"id": "gate", "needs": ["draft"], "approval": {"timeout": 3600, "message": "ok {{ steps.draft.output }}?"}},
        {"id": "publish", "needs": ["gate"], "agent": "echo",
         "input": "{{ steps.gate.by }} said {{ steps.gate.comment }}"},
    ])
    yes, no = run_flow(daemon), run_flow(daemon)
    for wid in (yes, no):
        wait_wf(home, wid, "the gate to wait", until=lambda r: r["by_step"]["gate"]["status"] == "waiting")

    answer = daemon.call({"op": "approve", "id": yes, "step": "gate", "approve": True, "comment": "ship it",
                          "requested_by": "alice"})
    assert answer["approved"] is True and answer["workflow_run_id"] == yes
    daemon.call({"op": "approve", "id": no, "step": "gate", "approve": False, "comment": "not yet",
                 "requested_by": "bob"})
    approved, rejected = wait_wf(home, yes), wait_wf(home, no)

    assert approved["status"] == "succeeded", approved
    assert [(a["step"], a["approved"], a["by"], a["comment"]) for a in approved["approvals"]] == \
        [("gate", True, "alice", "ship it")]
    assert [r["output"] for r in step_runs(home, yes, settled=2) if r["step"] == "publish"] == ["alice said ship it"]

    assert rejected["status"] == "failed" and "step 'gate'" in rejected["error"], rejected
    assert rejected["by_step"]["gate"]["status"] == "failed" and rejected["by_step"]["publish"]["runs"] == []
    assert "rejected by bob: not yet" in rejected["by_step"]["gate"]["error"]

    rows = wait_ledger(home, 'SELECT workflow_run_id, step, approved, "by", "at", comment FROM approvals', [],
                       until=lambda rows: len(rows) == 2, what="both approvals in the ledger")
    got = {r["workflow_run_id"]: (r["step"], r["approved"], r["by"], r["comment"]) for r in rows}
    assert got == {yes: ("gate", True, "alice", "ship it"), no: ("gate", False, "bob", "not yet")}
    assert all(isinstance(r["at"], datetime) for r in rows)
    # A decided gate waits no more.
    again = socket_call(daemon.socket, {"op": "approve", "id": yes, "step": "gate", "approve": True}, timeout=30)
    assert again is not None and again["ok"] is False and again["code"] == "conflict", again


# -- the daemon dies; resume; cancel -------------------------------------------------------------------------


def test_kill_9_of_the_daemon_mid_workflow_resumes_at_the_next_start(
        repo: SpecRepo, home: Path, daemons: MakeDaemon) -> None:  # noqa: F811
    daemon = setup(repo, daemons, {"echo": ECHO, "slow": [turn(content="slow done", sleep=4)]}, [
        {"id": "a", "agent": "echo", "input": "a"},
        {"id": "b", "needs": ["a"], "agent": "slow", "input": "b",
         "retry": {"limit": 1, "backoff": 0, "on": ["interrupted"]}},
        {"id": "c", "needs": ["b"], "agent": "echo", "input": "{{ steps.a.output }}{{ steps.b.output }}"},
    ])
    wid = run_flow(daemon)
    interrupted = running_run(home, wid, "b")
    daemon.kill9()

    daemons()
    ended = wait_wf(home, wid, timeout=45)
    assert ended["status"] == "succeeded", ended
    rows = step_runs(home, wid, settled=4)
    assert per_step(rows) == {"a": 1, "b": 2, "c": 1}  # the succeeded step is not run again
    b = [r for r in rows if r["step"] == "b"]
    assert (b[0]["run_id"], b[0]["status"]) == (interrupted["run_id"], "interrupted")
    assert b[1]["status"] == "succeeded" and b[1]["retry_of"] == interrupted["run_id"] and b[1]["attempt"] == 2
    assert [r["output"] for r in rows if r["step"] == "c"] == ["aslow done"]


def test_resume_reruns_what_failed_or_from_a_step_and_at_head(
        repo: SpecRepo, home: Path, daemons: MakeDaemon) -> None:  # noqa: F811
    steps: list[dict[str, Any]] = [
        {"id": "a", "agent": "echo", "input": "a"},
        {"id": "side", "agent": "echo", "input": "side"},
        {"id": "b", "needs": ["a"], "agent": "broken", "input": "b"},
        {"id": "c", "needs": ["b"], "agent": "echo", "input": "c"},
    ]
    daemon = setup(repo, daemons, {"echo": ECHO, "broken": BROKEN}, steps, name="chain")
    first_revision = git(repo.path, "rev-parse", "HEAD")
    wid = run_flow(daemon, "chain")
    assert wait_wf(home, wid)["status"] == "failed"
    assert per_step(step_runs(home, wid, settled=3)) == {"a": 1, "side": 1, "b": 1}

    # A commit changes the workflow (b uses a working agent); the run keeps its revision unless at_head.
    workflow_spec(repo, "chain", [*steps[:2], {**steps[2], "agent": "echo"}, steps[3]])
    head = repo.commit("b fixed")
    daemon.call({"op": "reconcile"})
    poll(lambda: state_rows(home, "SELECT 1 FROM agents WHERE name = 'chain' AND applied_revision = ?", (head,)),
         "the new revision of the workflow to be applied")

    answer = daemon.call({"op": "workflow.resume", "id": wid, "from": None, "at_head": False})
    assert answer["attempt"] == 2 and answer["spec_revision"] == first_revision, answer
    again = wait_wf(home, wid)
    assert again["status"] == "failed" and again["attempt"] == 2, again  # b failed again: the old revision
    assert per_step(step_runs(home, wid, settled=4)) == {"a": 1, "side": 1, "b": 2}  # only what failed ran
    workflow_ledger(home, wid, lambda r: r["attempt"] == 2 and r["status"] == "failed"
                    and r["spec_revision"] == first_revision, "attempt 2 in the ledger")

    answer = daemon.call({"op": "workflow.resume", "id": wid, "from": "a", "at_head": True})
    assert answer["attempt"] == 3 and answer["spec_revision"] == head, answer
    done = wait_wf(home, wid)
    assert done["status"] == "succeeded" and done["spec_revision"] == head, done
    rows = step_runs(home, wid, settled=7)
    assert per_step(rows) == {"a": 2, "side": 1, "b": 3, "c": 1}  # a and what follows it; side is not redone
    assert [r["agent"] for r in rows if r["step"] == "b"] == ["broken", "broken", "echo"]
    workflow_ledger(home, wid, lambda r: r["attempt"] == 3 and r["status"] == "succeeded"
                    and r["spec_revision"] == head, "attempt 3 in the ledger")


def test_cancel_stops_the_runs_in_flight(repo: SpecRepo, home: Path, daemons: MakeDaemon) -> None:  # noqa: F811
    daemon = setup(repo, daemons, {"napper": ([turn(content="late", sleep=60)], {"constraints": {
        "max_runtime": 120}}), "echo": ECHO}, [
        {"id": "naps", "agent": "napper", "for_each": "[1, 2]", "input": "{{ item }}"},
        {"id": "after", "needs": ["naps"], "agent": "echo", "input": "never"},
    ])
    begun = time.monotonic()
    wid = run_flow(daemon)
    poll(lambda: len(state_rows(home, "SELECT 1 FROM wf_items i JOIN run_progress p USING (run_id) WHERE "
                                "i.workflow_run_id = ? AND p.status = 'running' AND p.pid IS NOT NULL", (wid,))) == 2,
         "both runs of the fan-out to run")
    answer = daemon.call({"op": "workflow.cancel", "id": wid, "requested_by": "test"})
    assert answer["stopping_runs"] == 2, answer
    ended = wait_wf(home, wid)
    assert time.monotonic() - begun < 45
    assert ended["status"] == "stopped", ended
    assert ended["by_step"]["after"]["runs"] == []
    rows = step_runs(home, wid, settled=2)
    assert [r["status"] for r in rows] == ["stopped", "stopped"], rows


def test_a_fan_out_runs_one_agent_several_times_at_once_but_manual_runs_keep_its_overlap_rule(
        repo: SpecRepo, home: Path, daemons: MakeDaemon) -> None:  # noqa: F811
    daemon = setup(repo, daemons, {"napper": [turn(content="rested", sleep=4)]}, [
        {"id": "naps", "agent": "napper", "for_each": "[1, 2, 3]", "input": "{{ item }}"},
    ])
    wid = run_flow(daemon)
    poll(lambda: len(state_rows(home, "SELECT 1 FROM run_progress WHERE agent = 'napper' AND status = 'running' "
                                "AND pid IS NOT NULL")) == 3, "three runs of napper at once")
    first, second = daemon.submit("napper", "m1"), daemon.submit("napper", "m2")
    assert wait_wf(home, wid)["status"] == "succeeded"
    poll(lambda: progress_of(home, second).get("status") == "succeeded", "the second manual run to end")
    rows = step_runs(home, wid, settled=3)
    assert peak(rows) == 3
    manual = {r["run_id"]: r for r in wait_ledger(
        home, "SELECT * FROM runs WHERE trigger = 'manual'", [], until=lambda rows: len(rows) == 2 and all(
            r["status"] == "succeeded" for r in rows), what="the manual runs in the ledger")}
    # The manual runs queue behind each other (one run of an agent at a time), not behind the workflow's.
    assert manual[second]["started_at"] >= manual[first]["ended_at"], manual


# -- triggers -----------------------------------------------------------------------------------------------


def test_a_schedule_trigger_starts_the_workflow(repo: SpecRepo, home: Path, daemons: MakeDaemon) -> None:  # noqa: F811
    """A workflow's triggers are the agents': a six-field cron fires it every second; its runs say so."""
    setup(repo, daemons, {"echo": ECHO}, [{"id": "only", "agent": "echo", "input": "tick"}],
          triggers=[{"type": "schedule", "cron": "* * * * * *"}])
    first = poll(lambda: state_rows(home, "SELECT * FROM wf_runs WHERE trigger = 'schedule' AND status = 'succeeded'"),
                 "a scheduled workflow run to succeed", 30)[0]
    assert first["workflow"] == "flow" and first["requested_by"] == "schedule", first
    (row,) = step_runs(home, first["workflow_run_id"], settled=1)
    assert row["trigger"] == "workflow" and row["step"] == "only" and row["output"] == "tick", row


def test_what_an_expression_costs_is_its_steps_never_the_daemons(repo: SpecRepo, home: Path,
                                                                 daemons: MakeDaemon) -> None:  # noqa: F811
    """An `if` that would take gigabytes fails its step in the expressions' own process; an answer shaped to
    make a regular expression backtrack (a prompt injection) passes on as data, at once; the daemon answers
    throughout."""
    fence = "```\n" + "\n" * 3000 + "x"
    daemon = setup(repo, daemons, {"echo": ECHO}, [
        {"id": "a", "agent": "echo", "input": "{{ inputs.text }}"},
        {"id": "b", "needs": ["a"], "agent": "echo", "input": "got {{ steps.a.output | length }}"},
        {"id": "bomb", "needs": ["b"], "agent": "echo", "if": "('%1500000000d' % 1) | length > 0", "input": "-"},
    ], inputs={"text": {"type": "string", "default": ""}})
    wid = run_flow(daemon, inputs={"text": fence})
    ended = wait_wf(home, wid, timeout=60)
    assert ended["status"] == "failed", ended
    assert ended["by_step"]["b"]["status"] == "succeeded", ended["by_step"]["b"]
    assert ended["by_step"]["bomb"]["status"] == "failed"
    assert "if: the expression used more than" in ended["by_step"]["bomb"]["error"] \
        or "if: it used more memory" in ended["by_step"]["bomb"]["error"], ended["by_step"]["bomb"]
    assert daemon.call({"op": "ping"})["ok"]


def test_metrics_count_workflow_runs_by_status_and_time_their_steps(repo: SpecRepo, home: Path,
                                                                    daemons: MakeDaemon) -> None:  # noqa: F811
    import urllib.request

    daemon = setup(repo, daemons, {"echo": ECHO}, [{"id": "one", "agent": "echo", "input": "x"},
                                                   {"id": "two", "needs": ["one"], "agent": "echo", "input": "y"}])
    wait_wf(home, run_flow(daemon))
    api = daemon.call({"op": "ping"})["api"]
    with urllib.request.urlopen(f"http://{api}/metrics", timeout=10) as resp:  # the open view: totals
        text = resp.read().decode()
    assert 'agent_orch_workflow_runs{status="succeeded"} 1.0' in text, text[-3000:]
    count = [line for line in text.splitlines() if line.startswith("agent_orch_workflow_step_duration_seconds_count")]
    assert count and float(count[0].split()[-1]) == 2.0, count


def test_cancel_gets_in_while_the_engine_waits_for_an_expression(repo: SpecRepo, home: Path,
                                                                 daemons: MakeDaemon) -> None:  # noqa: F811
    """Users' requests never wait for the engine's thread: a cancel while it evaluates a slow `if` is taken at
    once, and the run ends stopped without the other slow steps being evaluated."""
    slow = "range(10000) | map('string') | map('center', 262144) | map('wordcount') | sum > 0"
    daemon = setup(repo, daemons, {"echo": ECHO}, [{"id": f"s{i}", "agent": "echo", "if": slow, "input": "-"}
                                                   for i in range(4)])
    wid = run_flow(daemon)
    answer = daemon.call({"op": "workflow.cancel", "id": wid, "requested_by": "test"})
    assert answer["workflow_run_id"] == wid
    ended = wait_wf(home, wid, timeout=60)
    assert ended["status"] == "stopped" and ended["error"] == "cancelled by test", ended
    evaluated = [s for s in ended["steps"] if s["status"] != "pending"]
    assert len(evaluated) <= 1, evaluated
