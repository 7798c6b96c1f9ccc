"""One run of an agent, end to end, through the real agentctl: the ledger, the log, budgets, deadlines, stop.

Agents use the scripted model (a turns file committed next to the spec), so every run is deterministic.
The ledger (runs.duckdb) and the state database are opened as files once the CLI has exited.
The helpers here are shared with test_tools.py and test_memory.py.
"""

from __future__ import annotations

import json
import os
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
import yaml
from conftest import ROOT, SpecRepo, process_table
from doubles import FakeOllamaServer

Cli = Callable[..., subprocess.CompletedProcess[str]]


# -- helpers shared by the run, tool and memory tests ----------------------------------------------------


def call(tool: str, **args: Any) -> dict[str, Any]:
    """One tool call of a scripted turn."""
    return {"name": tool, "args": args}


def turn(*calls: dict[str, Any], content: str | None = None, usage: tuple[int, int] = (10, 5),
         sleep: float | None = None) -> dict[str, Any]:
    """One scripted model answer: tool calls, or a final content."""
    out: dict[str, Any] = {"usage": {"input_tokens": usage[0], "output_tokens": usage[1]}}
    if calls:
        out["tool_calls"] = list(calls)
    if content is not None:
        out["content"] = content
    if sleep is not None:
        out["sleep"] = sleep
    return out


def scripted_agent(repo: SpecRepo, name: str, turns: list[dict[str, Any]], **fields: Any) -> None:
    """specs/NAME.yaml with the scripted model specs/_scripts/NAME.yaml (not committed yet)."""
    repo.write(f"specs/_scripts/{name}.yaml", yaml.safe_dump({"turns": turns}, sort_keys=False))
    body = {"name": name, "description": f"test agent {name}", "model": f"scripted:_scripts/{name}.yaml", **fields}
    repo.write(f"specs/{name}.yaml", yaml.safe_dump(body, sort_keys=False))


def expect(done: subprocess.CompletedProcess[str], code: int) -> subprocess.CompletedProcess[str]:
    assert done.returncode == code, f"exit {done.returncode}, wanted {code}\nstdout:\n{done.stdout}\n" \
                                    f"stderr:\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    return done


def apply(repo: SpecRepo, cli: Cli) -> None:
    repo.commit()
    expect(cli("apply"), 0)


def run(cli: Cli, name: str, *args: str, code: int = 0, env: dict[str, str] | None = None) -> dict[str, Any]:
    """`agentctl --output json [args] run NAME`, with its exit code checked; the JSON it printed."""
    done = expect(cli("--output", "json", *args, "run", name, env=env or {}), code)
    data: dict[str, Any] = json.loads(done.stdout)
    data["_stdout"], data["_stderr"] = done.stdout, done.stderr
    return data


def ledger(home: Path, sql: str, params: list[Any] | None = None) -> list[tuple[Any, ...]]:
    con = duckdb.connect(str(home / "runs.duckdb"), read_only=True)
    try:
        return con.execute(sql, params or []).fetchall()
    finally:
        con.close()


def run_row(home: Path, run_id: str) -> dict[str, Any]:
    con = duckdb.connect(str(home / "runs.duckdb"), read_only=True)
    try:
        cur = con.execute("SELECT * FROM runs WHERE run_id = ?", [run_id])
        names = [d[0] for d in cur.description]
        rows = cur.fetchall()
    finally:
        con.close()
    assert len(rows) == 1, rows
    return dict(zip(names, rows[0], strict=True))


def events(home: Path, run_id: str) -> list[dict[str, Any]]:
    rows = ledger(home, "SELECT seq, kind, name, decision, detail FROM run_events WHERE run_id = ? ORDER BY seq",
                  [run_id])
    return [{"seq": s, "kind": k, "name": n, "decision": d, "detail": json.loads(det) if det else {}}
            for s, k, n, d, det in rows]


def tool_events(home: Path, run_id: str) -> list[dict[str, Any]]:
    return [e for e in events(home, run_id) if e["kind"] == "tool_call"]


def wait_for(predicate: Callable[[], Any], what: str, timeout: float = 20.0) -> Any:
    """Poll ``predicate`` until it is truthy, for at most ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.05)
    raise AssertionError(f"gave up waiting for {what} after {timeout:g}s")


def processes_in_group(pgid: int) -> list[int]:
    """Live processes (from /proc) whose process group is ``pgid``."""
    return [pid for pid, _state, _ppid, group in process_table() if group == pgid]


def processes_with_arg(arg: str) -> list[int]:
    """Live processes (from /proc) that have ``arg`` as one of their command-line arguments."""
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            argv = Path(f"/proc/{entry}/cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if arg.encode() in argv:
            found.append(int(entry))
    return found


def free_port() -> int:
    """A port nothing listens on (bound, then released)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- a run end to end -----------------------------------------------------------------------------------


def test_scripted_run_end_to_end(repo: SpecRepo, cli: Cli, home: Path, tmp_path: Path) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "note.txt").write_text("a note for the agent\n")
    scripted_agent(repo, "e2e", [
        turn(call("file_reader", path=str(inbox / "note.txt")), call("file_reader", path="/etc/passwd"),
             usage=(120, 30)),
        turn(call("memory_save", text="the inbox held one note"), usage=(50, 10)),
        turn(content="All done: one note read.", usage=(60, 5)),
    ], tools=[{"name": "file_reader", "paths": [str(inbox)]}, {"name": "memory_save"}],
        memory={"type": "vector_db"})
    revision = repo.commit()
    expect(cli("apply"), 0)

    result = run(cli, "e2e", code=0)
    assert result["status"] == "succeeded"
    assert result["output"] == "All done: one note read."
    assert result["error"] is None
    assert (result["input_tokens"], result["output_tokens"]) == (230, 45)
    run_id = result["run_id"]

    row = run_row(home, run_id)
    assert row["agent"] == "e2e" and row["client_id"] == "default" and row["trigger"] == "manual"
    assert row["status"] == "succeeded" and row["output"] == "All done: one note read." and row["error"] is None
    assert row["spec_revision"] == revision
    assert (row["input_tokens"], row["output_tokens"]) == (120 + 50 + 60, 30 + 10 + 5)
    assert (row["model_calls"], row["tool_calls"]) == (3, 3)
    assert row["started_at"] is not None and row["ended_at"] >= row["started_at"]

    # The events, read through the CLI's own SQL door, in seq order with nothing missing.
    done = expect(cli("--output", "json", "history", "--sql",
                      f"SELECT seq, kind, name, decision FROM run_events WHERE run_id = '{run_id}' ORDER BY seq"), 0)
    listed = json.loads(done.stdout)
    assert [e["seq"] for e in listed] == list(range(1, len(listed) + 1))
    assert [(e["kind"], e["name"], e["decision"]) for e in listed] == [
        ("log", "sandbox", None),
        ("memory", "recall", None),
        ("llm_call", "scripted:_scripts/e2e.yaml", None),
        ("tool_call", "file_reader", "allowed"),
        ("tool_call", "file_reader", "denied"),
        ("llm_call", "scripted:_scripts/e2e.yaml", None),
        ("tool_call", "memory_save", "allowed"),
        ("llm_call", "scripted:_scripts/e2e.yaml", None),
        ("log", "final_answer", None),
        ("memory", "save", None),
        ("status", "succeeded", None),
    ]
    detail = events(home, run_id)
    assert [e["detail"]["input_tokens"] for e in detail if e["kind"] == "llm_call"] == [120, 50, 60]
    denied = detail[4]["detail"]
    assert denied["args"] == {"path": "/etc/passwd"} and "outside the allowed paths" in denied["reason"]
    assert detail[3]["detail"]["result_bytes"] == len("a note for the agent\n")
    assert detail[-1]["detail"]["tokens"] == 275

    # The agent log has the run's lines; `agentctl logs --run` shows those and no other run's.
    second = run(cli, "e2e", code=0)
    log = (home / "logs" / "agents" / "e2e.log").read_text()
    mine = [line for line in log.splitlines() if f" run={run_id} " in line]
    assert any("run started" in line for line in mine)
    assert any("DENIED" in line and "/etc/passwd" in line for line in mine)
    assert any("succeeded: All done" in line for line in mine)
    assert f" run={second['run_id']} " in log
    shown = expect(cli("logs", "e2e", "--run", run_id), 0).stdout.splitlines()
    assert shown == mine


# -- budgets and the deadline ---------------------------------------------------------------------------


def test_max_tokens_stops_the_run_at_once(repo: SpecRepo, cli: Cli, home: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    writer = [{"name": "file_writer", "paths": [str(out)]}]
    scripted_agent(repo, "spender", [
        turn(call("file_writer", path=str(out / "first.txt"), content="1"), usage=(40, 10)),
        turn(call("file_writer", path=str(out / "second.txt"), content="2"), usage=(900, 200)),  # 1150 > 1000
        turn(call("file_writer", path=str(out / "third.txt"), content="3"), usage=(5, 5)),
        turn(content="never reached"),
    ], tools=writer, constraints={"max_tokens": 1000})
    apply(repo, cli)

    result = run(cli, "spender", code=1)
    assert result["status"] == "budget_exceeded"
    assert "token budget of 1000" in result["error"]
    assert (result["input_tokens"], result["output_tokens"]) == (940, 210)
    assert (out / "first.txt").exists()
    assert not (out / "second.txt").exists(), "the tool calls of the turn that broke the budget ran"
    assert not (out / "third.txt").exists()
    kinds = [(e["kind"], e["name"]) for e in events(home, result["run_id"])]
    assert kinds.count(("llm_call", "scripted:_scripts/spender.yaml")) == 2
    assert kinds.count(("tool_call", "file_writer")) == 1
    assert kinds[-1] == ("status", "budget_exceeded")
    assert run_row(home, result["run_id"])["status"] == "budget_exceeded"


def test_max_model_calls_stops_a_tool_loop(repo: SpecRepo, cli: Cli, home: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    loop = [turn(call("file_reader", path=str(data))) for _ in range(6)] + [turn(content="never reached")]
    scripted_agent(repo, "looper", loop, tools=[{"name": "file_reader", "paths": [str(data)]}],
                   constraints={"max_model_calls": 3})
    apply(repo, cli)

    result = run(cli, "looper", code=1)
    assert result["status"] == "budget_exceeded"
    assert "max_model_calls (3)" in result["error"]
    kinds = [e["kind"] for e in events(home, result["run_id"])]
    assert kinds.count("llm_call") == 3
    assert kinds[-1] == "status"
    assert run_row(home, result["run_id"])["model_calls"] == 3


def test_max_runtime_times_out_and_leaves_no_process(repo: SpecRepo, cli: Cli, home: Path) -> None:
    scripted_agent(repo, "sleeper", [turn(content="too late", sleep=30)], constraints={"max_runtime": 2})
    apply(repo, cli)

    result = run(cli, "sleeper", code=1, env={"AGENT_ORCH_KILL_GRACE": "1"})
    assert result["status"] == "timed_out"
    assert "max_runtime of 2s" in result["error"]
    row = run_row(home, result["run_id"])
    assert row["status"] == "timed_out" and row["pid"]
    assert processes_in_group(row["pid"]) == []
    assert events(home, result["run_id"])[-1]["name"] == "timed_out"


def test_a_timed_out_shell_command_does_not_outlive_its_run(repo: SpecRepo, cli: Cli, home: Path) -> None:
    # A unique argument to find the command by, whatever process group it put itself in.
    marker = f"{29 + (os.getpid() % 1000) / 1000:.3f}"
    scripted_agent(repo, "hanger", [turn(call("shell", command=f"sleep {marker}")), turn(content="too late")],
                   tools=[{"name": "shell", "commands": ["sleep"]}], constraints={"max_runtime": 2})
    apply(repo, cli)

    result = run(cli, "hanger", code=1, env={"AGENT_ORCH_KILL_GRACE": "1"})
    assert result["status"] == "timed_out"
    left = processes_with_arg(marker)
    for pid in left:  # clean up what the run left behind before failing
        os.kill(pid, 9)
    assert left == [], "the shell tool's command survived its timed-out run"


def test_stop_ends_a_running_run(repo: SpecRepo, cli: Cli, home: Path) -> None:
    scripted_agent(repo, "napper", [turn(content="woke up", sleep=30)], constraints={"max_runtime": 60})
    apply(repo, cli)

    env = {**os.environ, "AGENT_ORCH_SOURCE": str(repo.path), "AGENT_ORCH_KILL_GRACE": "1"}
    background = subprocess.Popen([sys.executable, "-m", "runner", "--home", str(home), "--output", "json",
                                   "run", "napper"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True)
    try:
        def running() -> str | None:
            try:
                conn = sqlite3.connect(f"file:{home / 'state.sqlite'}?mode=ro", uri=True, timeout=1)
                try:
                    row = conn.execute("SELECT run_id FROM run_progress WHERE agent = 'napper' "
                                       "AND status = 'running'").fetchone()
                finally:
                    conn.close()
            except sqlite3.Error:
                return None
            return str(row[0]) if row else None

        run_id = wait_for(running, "the run to be running")
        stopped = expect(cli("--output", "json", "stop", "napper"), 0)
        assert json.loads(stopped.stdout)["stopping_runs"] == 1
        out, err = background.communicate(timeout=30)
    finally:
        if background.poll() is None:
            background.kill()
            background.communicate()
    assert background.returncode == 1, err
    assert "Traceback" not in err
    result = json.loads(out)
    assert result["run_id"] == run_id
    assert result["status"] == "stopped"
    assert run_row(home, run_id)["status"] == "stopped"
    assert processes_in_group(run_row(home, run_id)["pid"]) == []


# -- a model that cannot be reached ---------------------------------------------------------------------


def test_unreachable_ollama_fails_fast_with_the_fix(repo: SpecRepo, cli: Cli, home: Path) -> None:
    repo.spec("llm")  # model: llama2, on Ollama
    apply(repo, cli)
    host = f"http://127.0.0.1:{free_port()}"

    done = expect(cli("run", "llm", env={"OLLAMA_HOST": host}, timeout=30), 1)
    assert "failed" in done.stdout
    assert host in done.stderr
    assert "ollama serve" in done.stderr and "OLLAMA_HOST" in done.stderr
    status = ledger(home, "SELECT status, error FROM runs WHERE agent = 'llm'")
    assert status[0][0] == "failed" and host in status[0][1]


def test_missing_ollama_model_names_ollama_pull(repo: SpecRepo, cli: Cli) -> None:
    repo.spec("llm")
    apply(repo, cli)
    with FakeOllamaServer() as ollama:  # Ollama is up, with no model pulled
        done = expect(cli("run", "llm", env={"OLLAMA_HOST": ollama.url}, timeout=30), 1)
        assert "/api/tags" in ollama.requests
    assert "ollama pull llama2" in done.stderr
    assert ollama.url in done.stderr
