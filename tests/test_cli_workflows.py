"""`agentctl workflow run|status|list|resume|cancel` and `agentctl approve`, through the real CLI.

Workflows run in the daemon only, so most tests start a real one (`agentctl serve` in a subprocess) on a real git
repository of scripted agents and `kind: workflow` specs, and drive it with the CLI as a person would; the rest
check what the CLI says without a daemon or before it asks one. Every wait is a bounded poll.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from conftest import ROOT, SpecRepo, agentctl, poll
from test_daemon import MakeDaemon, daemons  # noqa: F401 (the fixture)
from test_follow import on_a_terminal
from test_run import expect, scripted_agent, turn

Cli = Callable[..., subprocess.CompletedProcess[str]]

def workflow_spec(repo: SpecRepo, name: str, steps: list[dict[str, Any]], **fields: Any) -> None:
    """specs/NAME.yaml, a `kind: workflow` spec (not committed yet)."""
    body = {"kind": "workflow", "name": name, **fields, "steps": steps}
    repo.write(f"specs/{name}.yaml", yaml.safe_dump(body, sort_keys=False))


def pipeline(repo: SpecRepo) -> None:
    """An agent step, an approval, and an agent step that uses the first one's output."""
    scripted_agent(repo, "writer", [turn(content="draft about the topic", usage=(30, 12))])
    scripted_agent(repo, "finisher", [turn(content="final text", usage=(20, 8))])
    workflow_spec(repo, "pipeline", [
        {"id": "first", "agent": "writer", "input": "Write about {{ inputs.topic }}"},
        {"id": "gate", "needs": ["first"], "approval": {"timeout": 3600}},
        {"id": "last", "needs": ["gate"], "agent": "finisher", "input": "{{ steps.first.output }}"},
    ], inputs={"topic": {"type": "string", "default": "x"}})


def as_json(done: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(done.stdout)


def steps_of(run: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {s["step"]: s for s in run["steps"]}


# -- without a daemon -----------------------------------------------------------------------------------------


def test_without_a_daemon_each_command_says_to_start_one(cli: Cli, home: Path) -> None:
    for args in (["workflow", "run", "pipeline"], ["workflow", "resume", "abc"], ["workflow", "cancel", "abc"],
                 ["approve", "abc", "gate"], ["approve", "abc", "gate", "--reject", "--comment", "no"]):
        done = expect(cli(*args), 2)
        assert done.stderr.startswith("error: no daemon runs for this home"), done.stderr
        assert "'agentctl serve'" in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
        assert done.stdout == ""


def test_a_bad_input_is_a_usage_error_before_anything_is_asked(cli: Cli) -> None:
    for given, says in ((["--input", "topic"], "give KEY=VALUE"), (["--input", "=x"], "give KEY=VALUE"),
                        (["--input", "a=1", "--input", "a=2"], "--input a is given twice")):
        done = expect(cli("workflow", "run", "pipeline", *given), 2)
        assert done.stderr.startswith("error: ") and says in done.stderr, done.stderr


def test_global_options_may_follow_the_workflow_subcommands(cli: Cli, tmp_path: Path) -> None:
    other = tmp_path / "other-home"
    # --home after the subcommand (and between its options) names the home the error speaks of.
    done = expect(cli("workflow", "run", "pipeline", "--input", "topic=y", "--home", str(other), "--output", "json"), 2)
    assert f"({other})" in done.stderr, done.stderr
    done = expect(cli("approve", "abc", "gate", "--home", str(other)), 2)
    assert f"({other})" in done.stderr, done.stderr
    # An input whose value looks like a global option stays the input's.
    done = expect(cli("workflow", "run", "pipeline", "--input", "--output", "--home", str(other)), 2)
    assert "--input '--output': give KEY=VALUE" in done.stderr, done.stderr
    # --output after the subcommand: JSON, read from the store without a daemon.
    assert as_json(expect(cli("workflow", "list", "--output", "json"), 0)) == []
    assert as_json(expect(cli("workflow", "list", "--defined", "--client-id", "other", "--output", "json"), 0)) == []
    done = expect(cli("workflow", "status", "nosuch", "--output", "json"), 2)
    assert done.stderr == "error: no workflow run 'nosuch' for client 'default'\n"


def test_list_refuses_an_unknown_state_and_status_with_defined(cli: Cli) -> None:
    done = expect(cli("workflow", "list", "--status", "succeded"), 2)
    assert "'succeded' is not a workflow run state" in done.stderr and "succeeded" in done.stderr
    done = expect(cli("workflow", "list", "--defined", "--status", "running"), 2)
    assert done.stderr.startswith("error: --status filters runs"), done.stderr


# -- through a daemon ------------------------------------------------------------------------------------------


def test_a_workflow_waits_for_an_approval_then_ends_when_approved(
        repo: SpecRepo, cli: Cli, daemons: MakeDaemon) -> None:  # noqa: F811 (the fixture)
    pipeline(repo)
    repo.commit()
    daemons()

    started = as_json(expect(cli("workflow", "run", "pipeline", "--input", "topic=rivers", "--output", "json"), 0))
    wid = started["workflow_run_id"]
    assert started["status"] == "waiting" and started["waiting_for"] == ["gate"], started
    steps = steps_of(started)
    assert steps["first"]["status"] == "succeeded" and steps["gate"]["status"] == "waiting"
    assert steps["last"]["status"] == "pending"
    assert started["inputs"] == {"topic": "rivers"}

    shown = expect(cli("workflow", "status", wid), 0).stdout
    assert f"workflow run {wid}" in shown and "pipeline" in shown
    for step, agent in (("first", "writer"), ("gate", "approval"), ("last", "finisher")):
        assert re.search(rf"^{step}\s+{agent}\s", shown, re.M), shown
    assert steps["first"]["runs"][0]["run_id"] in shown
    assert f"agentctl approve {wid} gate" in shown
    assert "inputs: topic=rivers" in shown

    stored = as_json(expect(cli("workflow", "status", wid, "--output", "json"), 0))
    assert stored["status"] == "running" and stored["workflow_run_id"] == wid

    approved = as_json(expect(cli("approve", wid, "gate", "--comment", "looks good", "--output", "json"), 0))
    assert approved["workflow_run_id"] == wid and approved["approved"] is True
    ended = as_json(expect(cli("workflow", "status", wid, "--watch", "--output", "json"), 0))
    assert ended["status"] == "succeeded", ended
    assert [s["status"] for s in ended["steps"]] == ["succeeded", "succeeded", "succeeded"]
    assert ended["input_tokens"] == 50 and ended["output_tokens"] == 20
    assert [(a["step"], a["approved"], a["comment"]) for a in ended["approvals"]] == [("gate", True, "looks good")]

    text = expect(cli("workflow", "status", wid), 0).stdout
    assert "succeeded" in text and "70 tokens (50 in, 20 out)" in text
    assert re.search(r"step gate approved by \S+ at \S+: looks good", text), text

    listed = as_json(expect(cli("workflow", "list", "--output", "json"), 0))
    assert [r["workflow_run_id"] for r in listed] == [wid] and listed[0]["status"] == "succeeded"
    assert as_json(expect(cli("workflow", "list", "--workflow", "pipeline", "--status", "failed", "--output",
                              "json"), 0)) == []
    table = expect(cli("workflow", "list"), 0).stdout
    assert wid in table and "pipeline" in table and "succeeded" in table
    defined = as_json(expect(cli("workflow", "list", "--defined", "--output", "json"), 0))
    assert [(d["name"], d["steps"], d["last_run"]["workflow_run_id"]) for d in defined] == \
        [("pipeline", ["first", "gate", "last"], wid)]
    assert "pipeline" in expect(cli("workflow", "list", "--defined"), 0).stdout


def test_a_rejected_step_fails_the_workflow_and_run_exits_1(repo: SpecRepo, cli: Cli, daemons: MakeDaemon) -> None:  # noqa: F811
    pipeline(repo)
    repo.commit()
    daemons()
    wid = as_json(expect(cli("workflow", "run", "pipeline", "--detach", "--output", "json"), 0))["workflow_run_id"]
    poll(lambda: as_json(cli("workflow", "status", wid, "--output", "json"))["steps"][1]["status"] == "waiting",
         "the gate to wait")
    done = expect(cli("approve", wid, "gate", "--reject", "--comment", "not now"), 0)
    assert done.stdout.startswith(f"step gate of workflow run {wid} rejected"), done.stdout
    ended = expect(cli("workflow", "status", wid, "--watch"), 1)
    assert f"workflow run {wid} of pipeline failed" in ended.stdout, ended.stdout
    stored = as_json(expect(cli("workflow", "status", wid, "--output", "json"), 0))
    assert stored["status"] == "failed" and steps_of(stored)["last"]["status"] != "succeeded"
    assert [(a["approved"], a["comment"]) for a in stored["approvals"]] == [(False, "not now")]


def test_a_failed_workflow_exits_1_and_resume_runs_it_again(repo: SpecRepo, cli: Cli, daemons: MakeDaemon) -> None:  # noqa: F811
    scripted_agent(repo, "fine", [turn(content="ok")])
    scripted_agent(repo, "broken", [])  # a script without turns: its first model call fails
    workflow_spec(repo, "shaky", [{"id": "a", "agent": "fine", "input": "go"},
                                  {"id": "b", "needs": ["a"], "agent": "broken", "input": "go"}])
    repo.commit()
    daemons()

    done = expect(cli("workflow", "run", "shaky", "--output", "json"), 1)
    failed = as_json(done)
    wid = failed["workflow_run_id"]
    assert failed["status"] == "failed" and steps_of(failed)["b"]["status"] == "failed", failed
    first_a = steps_of(failed)["a"]["runs"][0]["run_id"]

    text = expect(cli("workflow", "run", "shaky"), 1)
    assert re.search(r"workflow run \S+ of shaky failed", text.stdout), text.stdout
    assert "scripted model has only 0 turn(s)" in text.stdout + text.stderr  # the step's error

    resumed = as_json(expect(cli("workflow", "resume", wid, "--output", "json"), 0))
    assert resumed["workflow_run_id"] == wid
    again = as_json(expect(cli("workflow", "status", wid, "--watch", "--output", "json"), 1))
    assert again["status"] == "failed" and again["attempt"] == 2, again
    assert steps_of(again)["a"]["runs"][0]["run_id"] == first_a  # a succeeded step is never redone

    done = expect(cli("workflow", "resume", wid, "--from", "nosuch"), 2)
    assert done.stderr.startswith("error: ") and "Traceback" not in done.stderr


def test_cancel_stops_a_detached_workflow(repo: SpecRepo, cli: Cli, daemons: MakeDaemon) -> None:  # noqa: F811
    scripted_agent(repo, "slow", [turn(content="late", sleep=60)], constraints={"max_runtime": 120})
    workflow_spec(repo, "long", [{"id": "wait", "agent": "slow", "input": "go"}])
    repo.commit()
    daemons()

    detached = expect(cli("workflow", "run", "long", "--detach"), 0).stdout
    found = re.match(r"workflow run (\S+) of long (running|waiting)", detached)
    assert found, detached
    wid = found.group(1)
    poll(lambda: as_json(cli("workflow", "status", wid, "--output", "json"))["steps"][0]["status"] == "running",
         "the step to run")
    cancelled = as_json(expect(cli("workflow", "cancel", wid, "--output", "json"), 0))
    assert cancelled["workflow_run_id"] == wid
    ended = as_json(expect(cli("workflow", "status", wid, "--watch", "--output", "json"), 1))
    assert ended["status"] == "stopped", ended


def test_the_daemon_refuses_an_unknown_workflow_or_input_in_one_line(
        repo: SpecRepo, cli: Cli, daemons: MakeDaemon) -> None:  # noqa: F811
    pipeline(repo)
    repo.commit()
    daemons()
    for args, says in ((["nosuch"], "nosuch"), (["pipeline", "--input", "colour=red"], "colour"),
                       (["writer"], "writer")):  # an agent is not a workflow
        done = expect(cli("workflow", "run", *args), 2)
        assert done.stderr.startswith("error: ") and says in done.stderr, done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    done = expect(cli("workflow", "cancel", "nosuch"), 2)
    assert done.stderr.startswith("error: ")
    done = expect(cli("approve", "nosuch", "gate"), 2)
    assert done.stderr.startswith("error: ")


def test_run_on_a_terminal_shows_the_steps_and_how_to_approve(
        repo: SpecRepo, home: Path, daemons: MakeDaemon) -> None:  # noqa: F811
    pipeline(repo)
    repo.commit()
    daemon = daemons()
    code, screen = on_a_terminal(["--home", str(home), "workflow", "run", "pipeline"],
                                 {"AGENT_ORCH_SOURCE": str(daemon.source), "COLUMNS": "160"})
    assert code == 0, screen
    assert re.search(r"first\s+writer\s+-\s+succeeded", screen), screen
    assert re.search(r"gate\s+approval\s+first\s+waiting", screen), screen
    found = re.search(r"workflow run (\S+) waits for an approval of step gate: agentctl approve (\S+) gate", screen)
    assert found and found.group(1) == found.group(2), screen


def test_following_ends_with_an_error_when_the_daemon_stops(
        repo: SpecRepo, home: Path, daemons: MakeDaemon) -> None:  # noqa: F811
    scripted_agent(repo, "slow", [turn(content="late", sleep=60)], constraints={"max_runtime": 120})
    workflow_spec(repo, "long", [{"id": "wait", "agent": "slow", "input": "go"}])
    repo.commit()
    daemon = daemons()
    follower = subprocess.Popen([sys.executable, "-m", "runner", "--home", str(home), "workflow", "run", "long"],
                                cwd=ROOT, env={**os.environ, "AGENT_ORCH_SOURCE": str(repo.path)},
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        def step_running() -> bool:
            runs = as_json(agentctl("workflow", "list", "--output", "json", home=home))
            if not runs:
                return False
            found = as_json(agentctl("workflow", "status", runs[0]["workflow_run_id"], "--output", "json", home=home))
            return bool(found["steps"][0]["status"] == "running")

        poll(step_running, "the workflow's step to run")
        daemon.terminate()
        out, err = follower.communicate(timeout=30)
    finally:
        if follower.poll() is None:
            follower.kill()
            follower.wait()
    assert follower.returncode == 2, (out, err)
    assert err.startswith("error: the daemon stopped before workflow run ") and "'agentctl serve'" in err, err
    assert "Traceback" not in err
