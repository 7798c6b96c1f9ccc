"""Faults of a run on Ray (docs/scale-out.md, "States and faults"): a node that dies under its run, a daemon
killed with runs in flight on the cluster, and both.

Each test that kills a node adds a node of its own first (zone=doomed...), so the session's nodes stay
for the other tests. No fixed sleeps: each step waits for what it needs with a bounded poll.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from conftest import SpecRepo, poll
from daemon_helpers import ledger_rows, listed_runs, process_alive, state_rows, status_of
from test_ray_executor import (
    archived,
    cluster_of,
    final_status,
    ledger_events,
    live_pid,
    long_agent,
    ran_on,
    running_on,
    zone_of_pid,
)
from test_run import call, scripted_agent, turn


def _once_in_ledger(home: Path, run_id: str) -> None:
    """The run has one row in the ledger and its events' seq are unique and contiguous from 1."""
    rows = ledger_rows(home, "SELECT count(*) AS n FROM runs WHERE run_id = ?", [run_id])
    assert rows == [{"n": 1}], rows
    seqs = [r["seq"] for r in ledger_rows(home, "SELECT seq FROM run_events WHERE run_id = ? ORDER BY seq",
                                          [run_id]) or []]
    assert seqs == list(range(1, len(seqs) + 1)), seqs


def test_a_run_whose_node_dies_is_interrupted_and_retried(repo: SpecRepo, home: Path, ray_cluster: Any,
                                                          ray_daemons: Any) -> None:
    ray_cluster.add_node("doomed")
    long_agent(repo, "fragile", placement={"labels": {"zone": "doomed"}},
               retry={"limit": 1, "backoff": 0, "on": ["interrupted"]},
               triggers=[{"type": "schedule", "cron": "*/2 * * * * *", "persistent": False}])
    repo.commit()
    daemon = ray_daemons()

    def started() -> dict[str, Any] | None:
        rows = [r for r in listed_runs(home, "fragile", "running") if r["pid"] is not None]
        return rows[0] if rows else None

    first = poll(started, "a scheduled run in flight", 30, every=0.1)
    run_id = first["run_id"]
    assert first["trigger"].startswith("schedule"), first
    poll(lambda: running_on(daemon, "doomed"), "the run on the doomed node", 20, every=0.1)
    assert zone_of_pid(ray_cluster, int(first["pid"])) == "doomed"

    ray_cluster.remove_node("doomed")
    assert final_status(home, run_id, timeout=60) == "interrupted"
    row = archived(home, run_id)
    assert row["status"] == "interrupted" and ran_on(ray_cluster, row, "removed"), row
    assert "lost" in row["error"], row
    nodes = {n["labels"].get("zone"): n for n in cluster_of(daemon)["nodes"]}
    assert nodes["doomed"]["alive"] is False and nodes["doomed"]["runs"] == 0

    # Its retry is queued (a trigger started it), and waits for a node with zone=doomed.
    retry = poll(lambda: [r for r in listed_runs(home, "fragile") if r["retry_of"] == run_id],
                 "the retry of the interrupted run", 20, every=0.1)
    assert len(retry) == 1 and retry[0]["attempt"] == 2, retry
    poll(lambda: "zone=doomed" in cluster_of(daemon)["waiting"].get("fragile", ""), "the retry to wait for a node",
         20, every=0.1)

    _once_in_ledger(home, run_id)
    kinds = [e["kind"] for e in ledger_events(home, run_id)]
    assert kinds[0] == "log" and kinds[-1] == "status" and kinds.count("status") == 1, kinds

    # A node with the label joins: the retry starts there.
    ray_cluster.add_node("doomed")
    poll(lambda: running_on(daemon, "doomed"), "the retry on the new zone=doomed node", 60, every=0.2)
    pid = poll(lambda: live_pid(home, retry[0]["run_id"]), "the retry's process", 20, every=0.1)
    assert zone_of_pid(ray_cluster, pid) == "doomed"


def test_a_killed_daemons_run_on_ray_is_collected_by_the_next(repo: SpecRepo, home: Path, tmp_path: Path,
                                                              ray_cluster: Any, ray_daemons: Any) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "note.txt").write_text("a note\n")
    scripted_agent(repo, "survivor", [turn(call("file_reader", path=str(inbox / "note.txt")), sleep=8, usage=(7, 3)),
                                      turn(content="done", usage=(5, 1))],
                   tools=[{"name": "file_reader", "paths": [str(inbox)]}], placement={"labels": {"zone": "a"}})
    repo.commit()
    daemon = ray_daemons()
    run_id = daemon.submit("survivor")
    pid = poll(lambda: live_pid(home, run_id), "the run to be placed", 30, every=0.1)
    assert zone_of_pid(ray_cluster, pid) == "a"
    poll(lambda: state_rows(home, "SELECT seq FROM run_progress WHERE run_id = ?", (run_id,))[0]["seq"] >= 1,
         "the run's first event on record", 20, every=0.1)

    daemon.kill9()
    assert process_alive(pid), "the run died with its daemon"
    again = ray_daemons()
    assert final_status(home, run_id, timeout=60) == "succeeded"
    row = archived(home, run_id)
    assert row["status"] == "succeeded" and row["output"] == "done" and ran_on(ray_cluster, row, "a"), row
    assert row["pid"] == pid, "the run was started again"
    assert (row["model_calls"], row["tool_calls"], row["input_tokens"], row["output_tokens"]) == (2, 1, 12, 4)
    _once_in_ledger(home, run_id)
    events = ledger_events(home, run_id)
    assert [(e["kind"], e["name"]) for e in events] == [
        ("log", "sandbox"), ("llm_call", "scripted:_scripts/survivor.yaml"), ("tool_call", "file_reader"),
        ("llm_call", "scripted:_scripts/survivor.yaml"), ("log", "final_answer"), ("status", "succeeded"),
    ]
    assert cluster_of(again)["pending"] == 0
    assert f"run {run_id} of survivor: followed again on its node" in again.log()


def test_a_killed_daemons_run_whose_node_died_too_is_interrupted(repo: SpecRepo, home: Path, ray_cluster: Any,
                                                                 ray_daemons: Any) -> None:
    ray_cluster.add_node("doomed2")
    long_agent(repo, "orphaned", placement={"labels": {"zone": "doomed2"}})
    repo.commit()
    daemon = ray_daemons()
    run_id = daemon.submit("orphaned")
    poll(lambda: running_on(daemon, "doomed2"), "the run on the doomed node", 30, every=0.1)
    pid = poll(lambda: live_pid(home, run_id), "the run's pid", 20, every=0.1)
    assert zone_of_pid(ray_cluster, pid) == "doomed2"

    daemon.kill9()
    ray_cluster.remove_node("doomed2")
    ray_daemons()
    assert final_status(home, run_id, timeout=60) == "interrupted"
    row = archived(home, run_id)
    assert row["status"] == "interrupted" and "no node has it" in row["error"], row
    _once_in_ledger(home, run_id)
    assert not process_alive(pid)


def test_a_run_waiting_for_a_node_still_waits_after_a_daemon_crash(repo: SpecRepo, home: Path,
                                                                    ray_daemons: Any) -> None:
    scripted_agent(repo, "patient", [turn(content="-")], placement={"labels": {"zone": "later"}})
    repo.commit()
    daemon = ray_daemons()
    run_id = daemon.submit("patient")
    poll(lambda: "patient" in cluster_of(daemon)["waiting"], "the run to wait for a node", 20, every=0.1)
    daemon.kill9()
    again = ray_daemons()
    poll(lambda: status_of(home, run_id) == "interrupted" or "patient" in cluster_of(again)["waiting"],
         "the next daemon to decide about the waiting run", 30, every=0.1)
    assert status_of(home, run_id) != "interrupted", archived(home, run_id)["error"]
    assert "zone=later" in cluster_of(again)["waiting"]["patient"]
