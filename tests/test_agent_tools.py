"""Agents asked as tools (docs/events.md, "An agent as a tool"), against a real daemon.

Scripted agents in a real git repository; a daemon (`python -m runner serve`) on a fresh home, driven
through its control socket. What happened is read from the ledger (runs, run_events). Every wait is a
bounded poll of a condition; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from conftest import SpecRepo, poll
from daemon_helpers import state_rows, wait_ledger
from test_daemon import MakeDaemon, daemons  # noqa: F401 (the fixture)
from test_run import call, scripted_agent, turn

from runner.agent.channel import Bounds, ChannelError, checked
from runner.specs.models import AgentSpec
from runner.supervise.narrowing import intersect_domains, intersect_paths, narrow

ENDED = ("succeeded", "failed", "timed_out", "budget_exceeded", "stopped", "interrupted", "skipped")


def ask_tool(name: str, agent: str) -> dict[str, Any]:
    return {"name": name, "agent": agent, "description": f"asks {agent}"}


def ended_runs(home: Path, agent: str, count: int = 1) -> list[dict[str, Any]]:
    sql = "SELECT * FROM runs WHERE agent = ? ORDER BY coalesce(started_at, queued_at), run_id"
    return wait_ledger(home, sql, [agent], what=f"{count} ended run(s) of {agent} in the ledger",
                       until=lambda rows: len(rows) >= count and all(r["status"] in ENDED for r in rows[:count]),
                       timeout=60)


def events(home: Path, run_id: str, kind: str | None = None) -> list[dict[str, Any]]:
    rows = wait_ledger(home, "SELECT * FROM run_events WHERE run_id = ? ORDER BY seq", [run_id],
                       what=f"the events of run {run_id}", until=lambda rows: any(r["kind"] == "status" for r in rows))
    for r in rows:
        r["detail"] = json.loads(r["detail"]) if isinstance(r["detail"], str) else (r["detail"] or {})
    return [r for r in rows if kind is None or r["kind"] == kind]


def tool_calls(home: Path, run_id: str, name: str) -> list[dict[str, Any]]:
    return [e for e in events(home, run_id, "tool_call") if e["name"] == name]


# -- the call, both transcripts, the callee's row ----------------------------------------------------------------


def test_a_caller_asks_an_agent_and_gets_its_answer(repo: SpecRepo, home: Path, daemons: MakeDaemon) -> None:  # noqa: F811
    scripted_agent(repo, "reviewer", [turn(content="LGTM: ${INPUT}", usage=(7, 3))])
    scripted_agent(repo, "author", [turn(call("ask_reviewer", question="is this ok?")), turn(content="done")],
                   tools=[ask_tool("ask_reviewer", "reviewer")])
    repo.commit("an author and its reviewer")
    daemon = daemons()
    final = daemon.run("author")
    assert final["status"] == "succeeded", final

    (callee,) = ended_runs(home, "reviewer")
    assert callee["status"] == "succeeded" and callee["output"] == "LGTM: is this ok?"
    assert callee["parent_run_id"] == final["run_id"] and callee["trigger"] == "agent"
    assert callee["requested_by"] == f"run:{final['run_id']}" and callee["input"] == "is this ok?"

    (asked,) = tool_calls(home, final["run_id"], "ask_reviewer")
    assert asked["decision"] == "allowed", asked
    assert asked["detail"]["result"] == "LGTM: is this ok?"
    assert asked["detail"]["callee_run_id"] == callee["run_id"] and asked["detail"]["callee_tokens"] == 10
    # The callee's transcript is its own run's: its model call and its end.
    assert [e["kind"] for e in events(home, callee["run_id"]) if e["kind"] in ("llm_call", "status")] == \
        ["llm_call", "status"]
    # The caller's row keeps its own tokens (two calls of 10 + 5); the callee's are on the callee's row.
    (caller,) = ended_runs(home, "author")
    assert (caller["input_tokens"], caller["output_tokens"]) == (20, 10)
    assert (callee["input_tokens"], callee["output_tokens"]) == (7, 3)


# -- narrowing ----------------------------------------------------------------------------------------------------


def test_the_callee_runs_with_what_its_caller_may_do(
        repo: SpecRepo, home: Path, tmp_path: Path, daemons: MakeDaemon) -> None:  # noqa: F811
    shared, other = tmp_path / "data" / "shared", tmp_path / "data" / "other"
    for folder in (shared, other):
        folder.mkdir(parents=True)
        (folder / "note.txt").write_text(f"the note in {folder.name}")
    reads_other = [turn(call("file_reader", path=str(other / "note.txt"))), turn(content="read it")]
    scripted_agent(repo, "reader", reads_other,
                   tools=[{"name": "file_reader", "paths": [str(shared), str(other)]}])
    scripted_agent(repo, "boss", [turn(call("ask_reader", question="read the other note")), turn(content="ok")],
                   tools=[{"name": "file_reader", "paths": [str(shared)]}, ask_tool("ask_reader", "reader")])
    repo.commit("a reader of two folders, asked by a boss of one")
    daemon = daemons()

    alone = daemon.run("reader")
    assert alone["status"] == "succeeded", alone
    (read,) = tool_calls(home, alone["run_id"], "file_reader")
    assert read["decision"] == "allowed" and "the note in other" in read["detail"]["result"]

    asked = daemon.run("boss")
    assert asked["status"] == "succeeded", asked
    callee = next(r for r in ended_runs(home, "reader", 2) if r["parent_run_id"] == asked["run_id"])
    (refused,) = tool_calls(home, callee["run_id"], "file_reader")
    assert refused["decision"] == "denied", refused
    assert str(other) in refused["detail"]["reason"] or "not in" in refused["detail"]["reason"], refused
    assert callee["denied"] == 1


def test_narrowing_keeps_what_both_specs_allow(tmp_path: Path) -> None:
    callee = AgentSpec.model_validate({
        "name": "callee", "model": "scripted:x.yaml", "memory": {"type": "vector_db"},
        "tools": [{"name": "file_reader", "paths": ["/srv/data"]},
                  {"name": "file_writer", "paths": ["/srv/data/out"]},
                  {"name": "shell", "commands": ["echo", "ls", "rm"]},
                  {"name": "http_get"}, {"name": "memory_search"},
                  {"name": "ask_more", "agent": "deeper"}],
        "constraints": {"allowed_domains": ["*.example.com", "api.other.org", "local"]}})
    caller = AgentSpec.model_validate({
        "name": "caller", "model": "scripted:x.yaml",
        "tools": [{"name": "file_reader", "paths": ["/srv/data/in", "/elsewhere"]},
                  {"name": "shell", "commands": ["echo", "ls"]}],
        "constraints": {"allowed_domains": ["api.example.com", "*.other.org"]}})
    variables = {"CLIENT_ID": "default", "AGENT_NAME": "x", "AGENT_ORCH_HOME": str(tmp_path)}
    narrowed = narrow(callee, caller, callee_vars=variables, caller_vars=variables, callee_sources={},
                      caller_sources={}, deeper=False)
    tools = {t.name: t for t in narrowed.tools}
    assert set(tools) == {"file_reader", "shell", "memory_search"}  # no write, no network, no deeper agent
    assert tools["file_reader"].paths == ["/srv/data/in"]  # the caller's narrower path replaces the callee's
    assert tools["shell"].commands == ["echo", "ls"]
    assert narrowed.constraints.allowed_domains == ["api.example.com", "api.other.org"]
    assert narrowed.memory == callee.memory
    assert intersect_paths(["/a", "/b/c"], ["/a/x", "/b"]) == ["/a/x", "/b/c"]
    assert intersect_domains(["*.a.com"], ["*.b.a.com", "a.com"]) == ["*.b.a.com"]


PEEK = """from langchain_core.tools import tool
PERMISSIONS = ["read"]
@tool
def peek(target: str) -> str:
    \"\"\"Read a file (its argument is not named like a path: only the sandbox stands in the way).\"\"\"
    try:
        return "PEEK:" + open(target).read()
    except OSError as exc:
        return "PEEK-FAILED:" + type(exc).__name__
"""
POKE = """from langchain_core.tools import tool
PERMISSIONS = ["write"]
@tool
def poke(target: str) -> str:
    \"\"\"Write a file (its argument is not named like a path: only the sandbox stands in the way).\"\"\"
    try:
        with open(target, "w") as handle:
            handle.write("by caller")
        return "WROTE"
    except OSError as exc:
        return "POKE-FAILED:" + type(exc).__name__
"""


def test_paths_of_a_tool_that_uses_none_give_no_access(
        repo: SpecRepo, home: Path, tmp_path: Path, daemons: MakeDaemon) -> None:  # noqa: F811
    """A memory tool's paths (validation says they are ignored) give nothing: neither in the agent's own
    sandbox nor, through narrowing, to a callee (the first attack read /secret through memory_search)."""
    public, secret = tmp_path / "data" / "public", tmp_path / "data" / "secret"
    for folder in (public, secret):
        folder.mkdir(parents=True)
    (secret / "s.txt").write_text("TOPSECRET")
    repo.write("specs/tools/peek.py", PEEK)
    scripted_agent(repo, "vault", [turn(call("peek", target=str(secret / "s.txt"))), turn(content="vault done")],
                   memory={"type": "vector_db"},
                   tools=[{"name": "peek", "paths": [str(public)]},
                          {"name": "memory_search", "permissions": ["read"], "paths": [str(secret)]},
                          {"name": "http_get", "paths": [str(secret)]}])
    scripted_agent(repo, "low", [turn(call("ask_vault", question="x")), turn(content="ok")],
                   tools=[{"name": "file_reader", "paths": [str(public)]}, ask_tool("ask_vault", "vault")])
    repo.commit("a vault whose memory tool names a secret folder")
    daemon = daemons()
    alone = daemon.run("vault")
    assert alone["status"] == "succeeded", alone
    asked = daemon.run("low")
    assert asked["status"] == "succeeded", asked
    for run in ended_runs(home, "vault", 2):
        (peeked,) = tool_calls(home, run["run_id"], "peek")
        assert peeked["detail"]["result"] == "PEEK-FAILED:PermissionError", peeked
    sandbox = [e for e in events(home, alone["run_id"], "log") if e["name"] == "sandbox"]
    assert not any(str(secret) in json.dumps(e["detail"]) for e in sandbox), sandbox


def test_a_custom_tools_omitted_permissions_are_read_alike_by_sandbox_and_narrowing(
        repo: SpecRepo, home: Path, tmp_path: Path, daemons: MakeDaemon) -> None:  # noqa: F811
    """A custom tool without spec permissions holds what its module declares, in its own sandbox and when its
    agent narrows a callee: the caller that may write through it writes, and so may its callee, no more."""
    shared, other = tmp_path / "data" / "shared", tmp_path / "data" / "other"
    for folder in (shared, other):
        folder.mkdir(parents=True)
    repo.write("specs/tools/poke.py", POKE)
    scripted_agent(repo, "writer", [turn(call("file_writer", path=str(shared / "by_callee.txt"), content="x")),
                                    turn(call("file_writer", path=str(other / "by_callee.txt"), content="x")),
                                    turn(content="w done")],
                   tools=[{"name": "file_writer", "paths": [str(shared), str(other)]}])
    scripted_agent(repo, "poker", [turn(call("poke", target=str(shared / "by_caller.txt"))),
                                   turn(call("ask_writer", question="x")), turn(content="ok")],
                   tools=[{"name": "poke", "paths": [str(shared)]}, ask_tool("ask_writer", "writer")])
    repo.commit("a caller that writes through a custom tool, and a writer")
    daemon = daemons()
    final = daemon.run("poker")
    assert final["status"] == "succeeded", final
    (own,) = tool_calls(home, final["run_id"], "poke")
    assert own["detail"]["result"] == "WROTE", own
    (callee,) = ended_runs(home, "writer")
    wrote = tool_calls(home, callee["run_id"], "file_writer")
    assert [c["decision"] for c in wrote] == ["allowed", "denied"], wrote
    assert sorted(p.name for p in shared.iterdir()) == ["by_callee.txt", "by_caller.txt"]
    assert not list(other.iterdir())


def test_the_sandbox_and_narrowing_read_a_tools_permissions_alike(tmp_path: Path) -> None:
    """One reading (catalog.effective_permissions, path_access) for both layers, without a daemon."""
    from runner.plan import RunPlan
    from runner.sandbox.confining import spec_paths
    from runner.settings import Settings

    variables = {"CLIENT_ID": "default", "AGENT_NAME": "x", "AGENT_ORCH_HOME": str(tmp_path)}
    sources = {"poke": POKE, "peek": PEEK}

    def sandbox(spec: AgentSpec) -> dict[str, set[str]]:
        plan = RunPlan(run_id="r", client_id="default", agent="x", revision=None, spec=spec,
                       settings=Settings(home=tmp_path), custom_sources=sources)
        out: dict[str, set[str]] = {}
        for _tool, path, perms in spec_paths(plan):
            out.setdefault(path, set()).update(perms)
        return out

    caller = AgentSpec.model_validate({"name": "caller", "model": "scripted:x.yaml", "tools": [
        {"name": "poke", "paths": ["/data/w"]}, {"name": "peek", "paths": ["/data/r"]},
        {"name": "memory_search", "permissions": ["read"], "paths": ["/data/m"]},
        {"name": "http_get", "paths": ["/data/h"]}]})
    assert sandbox(caller) == {"/data/w": {"read", "write"}, "/data/r": {"read"}}
    callee = AgentSpec.model_validate({"name": "callee", "model": "scripted:x.yaml", "memory": {"type": "vector_db"},
                                       "tools": [{"name": "file_writer", "paths": ["/data"]},
                                                 {"name": "file_reader", "paths": ["/data"]},
                                                 {"name": "memory_save", "paths": ["/data"]}]})
    narrowed = narrow(callee, caller, callee_vars=variables, caller_vars=variables, callee_sources=sources,
                      caller_sources=sources, deeper=False)
    assert {t.name: t.paths for t in narrowed.tools} == \
        {"file_writer": ["/data/w"], "file_reader": ["/data/r", "/data/w"], "memory_save": []}
    assert sandbox(narrowed) == {"/data/w": {"read", "write"}, "/data/r": {"read"}}


# -- the shared budget, the depth ---------------------------------------------------------------------------------


def test_the_callees_tokens_count_on_the_callers_budget(repo: SpecRepo, home: Path, daemons: MakeDaemon) -> None:  # noqa: F811
    scripted_agent(repo, "spender", [turn(content="spent", usage=(500, 100))])
    scripted_agent(repo, "thrifty", [turn(call("ask_spender", question="spend"), usage=(10, 5)),
                                     turn(content="never reached")],
                   tools=[ask_tool("ask_spender", "spender")], constraints={"max_tokens": 100})
    repo.commit("a thrifty caller and a spender")
    daemon = daemons()
    final = daemon.run("thrifty")
    assert final["status"] == "budget_exceeded", final
    assert "used by agents it asked" in final["error"], final
    (callee,) = ended_runs(home, "spender")
    # The callee's budget was capped at what the caller had left (100 - 15): it overshot it and says so.
    assert callee["status"] == "budget_exceeded" and "85" in callee["error"], callee
    (caller,) = ended_runs(home, "thrifty")
    assert caller["input_tokens"] + caller["output_tokens"] == 15  # its own only: the ledger counts nothing twice
    (asked,) = tool_calls(home, final["run_id"], "ask_spender")
    assert asked["detail"]["callee_tokens"] == 600 and asked["detail"]["error"].startswith("agent 'spender'")


def test_a_grandchilds_tokens_count_on_the_top_callers_budget(
        repo: SpecRepo, home: Path, daemons: MakeDaemon) -> None:  # noqa: F811
    """An answer carries the callee's tokens and those it borrowed from its own callees: the first attack had
    top (max_tokens 1000) ask mid five times, each asking leaf for 900 tokens, and top saw 4 per ask."""
    scripted_agent(repo, "leaf", [turn(content="spent", usage=(800, 100))])
    scripted_agent(repo, "mid", [turn(call("ask_leaf", question="spend"), usage=(1, 1)),
                                 turn(content="mid done", usage=(1, 1))],
                   tools=[ask_tool("ask_leaf", "leaf")])
    scripted_agent(repo, "top", [*(turn(call("ask_mid", question=f"go {i}"), usage=(1, 1)) for i in range(5)),
                                 turn(content="top done", usage=(1, 1))],
                   tools=[ask_tool("ask_mid", "mid")], constraints={"max_tokens": 1000})
    repo.commit("top asks mid asks leaf")
    daemon = daemons()
    final = daemon.run("top")
    assert final["status"] == "budget_exceeded" and "used by agents it asked" in final["error"], final
    asks = tool_calls(home, final["run_id"], "ask_mid")
    assert asks[0]["detail"]["callee_tokens"] == 904, asks[0]  # mid's own 4 and leaf's 900
    # The second ask was capped at what was left (1000 - 4 - 904): leaf overshot it once, and top stopped there.
    assert len(asks) == 2, asks
    assert len(ended_runs(home, "leaf", 2)) == 2


def test_an_ask_past_the_depth_limit_is_refused_to_the_model(
        repo: SpecRepo, home: Path, daemons: MakeDaemon) -> None:  # noqa: F811
    scripted_agent(repo, "leaf", [turn(content="leaf")])
    scripted_agent(repo, "root", [turn(call("ask_leaf", question="hello")), turn(content="alone then")],
                   tools=[ask_tool("ask_leaf", "leaf")])
    repo.commit("a root and a leaf")
    daemon = daemons(env={"AGENT_ORCH_MAX_TOOL_DEPTH": "0"})
    final = daemon.run("root")
    assert final["status"] == "succeeded", final
    (refused,) = tool_calls(home, final["run_id"], "ask_leaf")
    assert refused["decision"] == "denied", refused
    assert "AGENT_ORCH_MAX_TOOL_DEPTH (0)" in refused["detail"]["reason"], refused
    assert not state_rows(home, "SELECT run_id FROM run_progress WHERE agent = 'leaf'")
    assert ended_runs(home, "root")[0]["denied"] == 1


def test_a_callee_does_not_keep_its_own_agent_tools_at_the_last_level(
        repo: SpecRepo, home: Path, daemons: MakeDaemon) -> None:  # noqa: F811
    scripted_agent(repo, "c", [turn(content="c")])
    scripted_agent(repo, "b", [turn(call("ask_c", question="hi")), turn(content="b")], tools=[ask_tool("ask_c", "c")])
    scripted_agent(repo, "a", [turn(call("ask_b", question="hi")), turn(content="a")], tools=[ask_tool("ask_b", "b")])
    repo.commit("a asks b asks c")
    daemon = daemons(env={"AGENT_ORCH_MAX_TOOL_DEPTH": "1"})
    assert daemon.run("a")["status"] == "succeeded"
    (b,) = ended_runs(home, "b")
    (refused,) = tool_calls(home, b["run_id"], "ask_c")
    assert refused["decision"] == "denied" and "no tool named 'ask_c'" in refused["detail"]["reason"], refused


# -- stopping -----------------------------------------------------------------------------------------------------


def test_stopping_the_caller_stops_its_callee(repo: SpecRepo, home: Path, daemons: MakeDaemon) -> None:  # noqa: F811
    scripted_agent(repo, "slow", [turn(content="late", sleep=120)])
    scripted_agent(repo, "impatient", [turn(call("ask_slow", question="take your time")), turn(content="x")],
                   tools=[ask_tool("ask_slow", "slow")])
    repo.commit("a caller of a slow agent")
    daemon = daemons()
    started = daemon.call({"op": "run", "agent": "impatient", "wait": False, "requested_by": "test"})
    poll(lambda: state_rows(home, "SELECT run_id FROM run_progress WHERE agent = 'slow' AND status = 'running' "
                            "AND pid IS NOT NULL"), "the callee to run", timeout=30)
    daemon.call({"op": "stop", "agent": "impatient"})
    (callee,) = ended_runs(home, "slow")
    assert callee["status"] == "stopped" and callee["parent_run_id"] == started["run_id"], callee
    (caller,) = ended_runs(home, "impatient")
    assert caller["status"] == "stopped", caller


def test_a_callee_left_in_flight_is_not_followed_again_after_a_restart() -> None:
    """ProcessTable.reattach (Ray, after a daemon's restart) prepared a callee again with its full spec and no
    caller. A run with a parent is not followed again: the daemon ends it interrupted and its node stops it.
    (Reattaching needs a Ray cluster, which tests/ray covers; here the table's decision itself.)"""
    from types import SimpleNamespace

    from runner.supervise.table import ProcessTable

    followed: list[Any] = []
    table = SimpleNamespace(executor=SimpleNamespace(reattach=lambda *args: followed.append(args) or True))
    row = {"run_id": "r-callee", "agent": "reader", "retry_of": None, "status": "running", "pid": 42, "seq": 3,
           "row": json.dumps({"trigger": "agent", "parent_run_id": "r-caller", "input": "q"})}
    assert ProcessTable.reattach(table, row) is False  # type: ignore[arg-type]
    assert followed == []


# -- what a run may ask -------------------------------------------------------------------------------------------


def test_a_run_may_ask_only_the_agents_its_spec_lists() -> None:
    spec = AgentSpec.model_validate({"name": "x", "model": "scripted:x.yaml",
                                     "tools": [ask_tool("ask_b", "b"), {"name": "http_get"}]})
    bounds = Bounds(spec)
    ok = checked({"t": "ask", "id": 1, "op": "agent.ask", "tool": "ask_b", "text": "q" * 20000}, 100)
    assert len(ok["text"]) == 8000 and ok["tool"] == "ask_b"
    bounds.check(ok)
    for tool, op in (("http_get", "agent.ask"), ("ask_c", "agent.ask"), ("ask_b", "remote.ask")):
        with pytest.raises(ChannelError, match="not one of its"):
            bounds.check(checked({"t": "ask", "id": 2, "op": op, "tool": tool, "text": "q"}, 10))
    with pytest.raises(ChannelError, match="names no tool"):
        checked({"t": "ask", "id": 3, "op": "agent.ask", "text": "q"}, 10)
    bounds.borrow(250)
    bounds.check({"t": "usage", "input": 1, "output": 1})
    assert bounds.tokens + bounds.borrowed == 252
