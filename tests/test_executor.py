"""The executor interface holds with a second implementation: runs in plain subprocesses over the same
channel (tests/subprocess_executor.py, a test double that imports nothing of the local executor).

Everything above the interface (the run record, the live store, the ledger, the agent's log) is the
real one, as the CLI and the daemon use it.
"""

from __future__ import annotations

import ast
import threading
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, SpecRepo, poll
from subprocess_executor import SubprocessExecutor
from test_run import call, events, run_row, scripted_agent, turn

from runner.agent.channel import VERSION, ChannelError, Decoder, checked, encode
from runner.agent.launching import run_foreground
from runner.agent.recording import RunRow, request_stop
from runner.reconcile.reconciling import open_source, reconcile
from runner.settings import Settings
from runner.state import connect


def settings_for(home: Path, repo: SpecRepo) -> Settings:
    s = Settings.load(home, source=str(repo.path))
    reconcile(s, connect(s.state_path), open_source(s), initiator="test")
    return s


def foreground(s: Settings, name: str, executor: Any) -> RunRow:
    return run_foreground(s, open_source(s), name, executor=executor)


def run_once(repo: SpecRepo, home: Path, name: str, executor: SubprocessExecutor) -> RunRow:
    """Commit what the test wrote, apply it, and run ``name`` once through ``executor``."""
    repo.commit()
    s = settings_for(home, repo)
    try:
        return foreground(s, name, executor)
    finally:
        executor.close()


def test_the_double_imports_nothing_of_the_local_executor() -> None:
    tree = ast.parse((ROOT / "tests" / "subprocess_executor.py").read_text())
    imported = {n.module for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module} | \
        {a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    assert not imported & {"runner.agent.local", "runner.agent.spawning", "runner.agent.launching",
                           "runner.sandbox.confining", "runner.sandbox.egress"}, imported


def test_a_run_through_another_executor_is_recorded_like_any(repo: SpecRepo, home: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "note.txt").write_text("a note\n")
    scripted_agent(repo, "reader", [turn(call("file_reader", path=str(data / "note.txt")),
                                         call("file_reader", path="/etc/shadow")),
                                    turn(content="read it")],
                   tools=[{"name": "file_reader", "paths": [str(data)]}])
    executor = SubprocessExecutor()
    row = run_once(repo, home, "reader", executor)
    assert executor.submitted == [row.run_id]
    assert (row.status, row.output, row.denied, row.tool_errors, row.tool_calls) == \
        ("succeeded", "read it", 1, 0, 2)
    stored = run_row(home, row.run_id)
    assert stored["status"] == "succeeded" and stored["denied"] == 1
    got = events(home, row.run_id)
    assert [e["seq"] for e in got] == list(range(1, len(got) + 1))
    assert got[-1]["kind"] == "status" and got[-1]["name"] == "succeeded"
    tools = [e for e in got if e["kind"] == "tool_call"]
    assert tools[0]["detail"]["result"] == "a note\n" and tools[1]["decision"] == "denied"
    log = (home / "logs" / "agents" / "reader.log").read_text()
    assert f"run={row.run_id} INFO run ended: succeeded" in log and "1 denied, 0 tool error(s)" in log


@pytest.mark.parametrize("ending", ["stopped", "timed_out"])
def test_stop_and_deadline_reach_another_executor(repo: SpecRepo, home: Path, ending: str) -> None:
    extra = {"constraints": {"max_runtime": 1}} if ending == "timed_out" else {}
    scripted_agent(repo, "slow", [turn(content="never", sleep=60)], **extra)
    repo.commit()
    s = settings_for(home, repo)
    executor = SubprocessExecutor(kill_grace=1)
    done: list[RunRow] = []
    worker = threading.Thread(target=lambda: done.append(foreground(s, "slow", executor)))
    worker.start()
    conn = connect(s.state_path)
    try:
        if ending == "stopped":
            # The run has begun once its first event (the sandbox it got) is on record.
            poll(lambda: conn.execute("SELECT 1 FROM journal WHERE tbl = 'run_events'").fetchone(), "first event")
            assert request_stop(conn, s.client_id, "slow") == 1
        worker.join(timeout=60)
    finally:
        executor.close()
    assert done and done[0].status == ending, done


def test_the_channel_speaks_one_versioned_format() -> None:
    line = encode({"t": "usage", "input": 3, "output": 4})
    (message, size), = Decoder().feed(line)
    assert message["v"] == VERSION and checked(message, size) == {"t": "usage", "input": 3, "output": 4}
    with pytest.raises(ChannelError, match="channel version 2"):
        Decoder().feed(b'{"v": 2, "t": "usage"}\n')
    halves = Decoder()
    assert halves.feed(line[:5]) == [] and len(halves.feed(line[5:])) == 1


def test_a_transcript_keeps_no_secret_a_tool_read_or_a_model_said(repo: SpecRepo, home: Path, tmp_path: Path) -> None:
    """What a tool returned and what the model said are in the record, capped; the secrets in them are not."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "env.txt").write_text("OPENAI=sk-live0123456789abcdef\nurl=https://x/?token=hunter2hunter2\n" + "x" * 9000)
    scripted_agent(repo, "leaky", [turn(call("file_reader", path=str(data / "env.txt"))),
                                   turn(content="the key is Bearer abc.def.ghi and that is all")],
                   tools=[{"name": "file_reader", "paths": [str(data)]}])
    row = run_once(repo, home, "leaky", SubprocessExecutor())
    assert row.status == "succeeded"
    got = events(home, row.run_id)
    (tool,) = [e for e in got if e["kind"] == "tool_call"]
    result = tool["detail"]["result"]
    assert "sk-live0123456789abcdef" not in result and "hunter2hunter2" not in result and "[redacted]" in result
    assert len(result) <= 4096 and tool["detail"]["result_bytes"] > 9000  # capped, with its full size beside it
    said = [e["detail"]["text"] for e in got if e["kind"] == "llm_call"][-1]
    assert "abc.def.ghi" not in said and "[redacted]" in said
