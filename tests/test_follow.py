"""Live progress (issue 12): a run's events streamed as server-sent events, `agentctl run` showing its steps
on a terminal, and `agentctl logs -f` following the log across rotations.

A real daemon serves the API on a free port; the streams are read with http.client as a client would, line
by line, with a deadline on every read. The terminal is a real pseudo-terminal. Every wait is a bounded
poll or a read with a timeout; nothing sleeps for a fixed time.
"""

from __future__ import annotations

import http.client
import json
import os
import pty
import queue
import re
import select
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_helpers import Served, poll, scripted, serve
from conftest import ROOT, SpecRepo, agentctl
from test_daemon import MakeDaemon, daemons  # noqa: F401 (the fixture)
from test_run import apply, call, scripted_agent, turn

from runner.api.runs import MAX_CLIENT_STREAMS as MAX_STREAMS  # what one client may open

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture(scope="module")
def main(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("follow")
    data = base / "data"
    data.mkdir()
    (data / "a.txt").write_text("first\n")
    files = {
        **scripted("stepper", [
            {"tool_calls": [{"name": "file_reader", "args": {"path": str(data / "a.txt")}}]},
            {"sleep": 1, "tool_calls": [{"name": "file_reader", "args": {"path": "/etc/shadow"}}]},
            {"sleep": 1, "content": "stepped"},
        ], tools=[{"name": "file_reader", "paths": [str(data)]}], overlap="queue"),
        **scripted("sleeper", [{"sleep": 120, "content": "too late"}], constraints={"max_runtime": 300}),
        **scripted("napper", [{"sleep": 120, "content": "too late"}], constraints={"max_runtime": 300}),
    }
    served = serve(base, files)
    try:
        yield served
    finally:
        served.stop()


def run_now(served: Served, agent: str) -> str:
    reply = served.api("POST", f"/agents/{agent}/runs", role="operator", body={})
    assert reply.status == 202, reply.body
    return str(reply.json["run_id"])


class Stream:
    """GET .../events?follow=1 as a client reads it: its status, headers, and the events as they come."""

    def __init__(self, served: Served, run_id: str, headers: dict[str, str] | None = None, query: str = "") -> None:
        self.conn = http.client.HTTPConnection("127.0.0.1", served.port, timeout=30)
        self.conn.request("GET", f"/agents/v1/runs/{run_id}/events?follow=1{query}",
                          headers={"Authorization": f"Bearer {served.tokens['viewer']}", **(headers or {})})
        self.resp = self.conn.getresponse()
        self.status = self.resp.status
        self.fields: set[str] = set()

    def events(self) -> Iterator[dict[str, Any]]:
        """Each event as it arrives: {"id", "event", "data"}; ends when the server ends the stream."""
        current: dict[str, Any] = {}
        while True:
            line = self.resp.readline()
            if not line:
                return
            text = line.decode().rstrip("\n")
            if not text:
                if "data" in current:  # as EventSource does: a block without data (retry:) is no event
                    yield current
                current = {}
            elif not text.startswith(":"):
                field, _, value = text.partition(": ")
                self.fields.add(field)
                current[field] = json.loads(value) if field == "data" else value

    def close(self) -> None:
        self.conn.close()


def test_following_a_run_streams_its_events_in_order_and_ends_at_its_final_status(main: Served) -> None:
    run_id = run_now(main, "stepper")
    stream = Stream(main, run_id)
    assert stream.status == 200 and stream.resp.headers["Content-Type"].startswith("text/event-stream")
    assert stream.resp.headers["Cache-Control"] == "no-cache"
    got, arrived = [], []
    started = time.monotonic()
    for event in stream.events():  # ends only when the server ends the stream
        got.append(event)
        arrived.append(time.monotonic() - started)
    stream.close()
    assert got, "no event streamed"
    assert [int(e["id"]) for e in got] == list(range(1, len(got) + 1))
    assert all(e["event"] == e["data"]["kind"] and int(e["id"]) == e["data"]["seq"] for e in got)
    assert got[-1]["event"] == "status" and got[-1]["data"]["name"] == "succeeded"
    # Streamed as they happened: the model sleeps a second twice, so the first events came well before the last.
    assert arrived[-1] - arrived[0] >= 1.5, arrived
    listed = main.api("GET", f"/runs/{run_id}/events", role="viewer").json["events"]
    assert [e["data"] for e in got] == listed  # the same events as the JSON page, in the same shape

    # Reconnecting with Last-Event-ID (as EventSource does) resumes after it; a finished run's stream ends.
    again = Stream(main, run_id, headers={"Last-Event-ID": "2"})
    resumed = list(again.events())
    again.close()
    assert [e["data"] for e in resumed] == listed[2:]
    assert [e["data"] for e in list(Stream(main, run_id, query="&after=3").events())] == listed[3:]


def test_a_stream_names_bad_input_and_streams_are_bounded(main: Served) -> None:
    run_id = run_now(main, "sleeper")
    for query, header in (("follow=maybe", {}), ("follow=1", {"Last-Event-ID": "seven"})):
        reply = main.api("GET", f"/runs/{run_id}/events?{query}", role="viewer", headers=header)
        assert reply.status == 400 and reply.error()["code"] == "bad_param", reply.body

    streams = [Stream(main, run_id) for _ in range(MAX_STREAMS)]
    assert [s.status for s in streams] == [200] * MAX_STREAMS
    over = main.api("GET", f"/runs/{run_id}/events?follow=1", role="viewer")
    assert over.status == 503 and over.error()["code"] == "too_many_streams" and int(over.headers["Retry-After"]) > 0
    assert main.api("GET", "/agents", role="viewer").status == 200  # plain requests still have threads

    stopped = main.api("POST", "/agents/sleeper/stop", role="operator", body={})
    assert stopped.status == 200 and stopped.json["stopping_runs"] == 1
    endings = [list(s.events())[-1] for s in streams]  # each ends at the run's final status
    for s in streams:
        s.close()
    assert {(e["event"], e["data"]["name"]) for e in endings} == {("status", "stopped")}
    # Their slots are free again: as many streams as before are taken (of a run that is over, briefly).
    poll(lambda: all(Stream(main, run_id).status == 200 for _ in range(MAX_STREAMS)), "the stream slots to free")


# -- agentctl run on a terminal, agentctl logs -f -----------------------------------------------------------


def on_a_terminal(args: list[str], env: dict[str, str], timeout: float = 60) -> tuple[int, str]:
    """Run agentctl with its stdout on a pseudo-terminal; its exit code and what the terminal showed."""
    leader, follower = pty.openpty()
    proc = subprocess.Popen([sys.executable, "-m", "runner", *args], cwd=ROOT, env={**os.environ, **env},
                            stdin=subprocess.DEVNULL, stdout=follower, stderr=subprocess.PIPE)
    os.close(follower)
    shown = b""
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([leader], [], [], 0.5)
            if not ready:
                if proc.poll() is not None:
                    break
                continue
            try:
                chunk = os.read(leader, 65536)
            except OSError:  # EIO: the process closed the terminal
                break
            if not chunk:
                break
            shown += chunk
        code = proc.wait(timeout=max(1.0, deadline - time.monotonic()))
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        assert proc.stderr is not None
        proc.stderr.close()
    # What stays on the screen: of each line, what was written after its last carriage return (a spinner
    # redraws itself after one, and is erased that way before a line is printed above it).
    lines = shown.decode(errors="replace").replace("\r\n", "\n").split("\n")
    return code, "\n".join(ANSI.sub("", line.split("\r")[-1]) for line in lines)


@pytest.fixture
def stepper(repo: SpecRepo, cli: Any, tmp_path: Path) -> str:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("first\n")
    scripted_agent(repo, "stepper", [turn(call("file_reader", path=str(data / "a.txt"))),
                                     turn(call("file_reader", path="/etc/shadow")), turn(content="stepped")],
                   tools=[{"name": "file_reader", "paths": [str(data)]}])
    apply(repo, cli)
    return "stepper"


def assert_steps_shown(screen: str, run_id: str) -> None:
    lines = [line.strip() for line in screen.splitlines() if line.strip()]
    steps = [line.split()[1] for line in lines if re.match(r"\d+\s+(model|tool|status|log|memory|egress)\s", line)]
    assert steps.count("model") == 3 and steps.count("tool") == 2 and steps[-1] == "status", screen
    assert any("DENIED" in line and "/etc/shadow" in line for line in lines), screen
    assert f"run {run_id} succeeded (1 denied)" in lines, screen
    assert lines[-1] == "stepped", screen


def test_agentctl_run_shows_the_steps_live_on_a_terminal_only(repo: SpecRepo, home: Path, cli: Any,
                                                              stepper: str, daemons: MakeDaemon) -> None:  # noqa: F811
    env = {"AGENT_ORCH_SOURCE": str(repo.path), "AGENT_ORCH_HOME": str(home)}
    code, screen = on_a_terminal(["run", stepper], env)  # no daemon: the run is this process's own
    assert code == 0, screen
    run_id = re.search(r"run ([0-9a-f]{24}) succeeded", screen).group(1)  # type: ignore[union-attr]
    assert_steps_shown(screen, run_id)

    piped = cli("run", stepper)  # not a terminal: the id, the status and the answer, nothing else
    assert piped.returncode == 0, piped.stderr
    assert re.fullmatch(r"run [0-9a-f]{24} succeeded \(1 denied\)\nstepped\n", piped.stdout), piped.stdout
    as_json = json.loads(cli("--output", "json", "run", stepper).stdout)
    assert as_json["status"] == "succeeded" and as_json["denied"] == 1 and as_json["tool_errors"] == 0

    daemons()  # through the daemon: the same lines
    code, screen = on_a_terminal(["run", stepper], env)
    assert code == 0, screen
    served_id = re.search(r"run ([0-9a-f]{24}) succeeded", screen).group(1)  # type: ignore[union-attr]
    assert served_id != run_id
    assert_steps_shown(screen, served_id)
    code, screen = on_a_terminal(["--output", "json", "run", stepper], env)
    assert code == 0 and json.loads(screen)["status"] == "succeeded", screen


class Lines:
    """A process's stdout, line by line, read by a thread: ``wait_for`` polls what has come."""

    def __init__(self, proc: subprocess.Popen[str]) -> None:
        self.proc = proc
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.put(line)

    def wait_for(self, text: str, timeout: float = 30) -> None:
        def found() -> bool:
            while not self.lines.empty():
                self.seen.append(self.lines.get())
            return any(text in line for line in self.seen)

        poll(found, f"{text!r} in the followed log (so far: {self.seen[-5:]})", timeout)


def test_logs_follow_streams_new_lines_across_rotation_until_ctrl_c(repo: SpecRepo, home: Path, cli: Any,
                                                                     stepper: str) -> None:
    log = home / "logs" / "agents" / f"{stepper}.log"
    assert not log.exists()
    proc = subprocess.Popen([sys.executable, "-m", "runner", "--home", str(home), "logs", stepper, "-f"], cwd=ROOT,
                            env={**os.environ, "AGENT_ORCH_SOURCE": str(repo.path)}, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        out = Lines(proc)
        run = json.loads(cli("--output", "json", "run", stepper).stdout)  # the log appears after `logs -f` began
        out.wait_for(f"run={run['run_id']} ")
        out.wait_for("DENIED")
        # Rotation as the writer does it: the file is renamed to NAME.log.1 and a new one begins.
        with open(log, "a") as handle:
            handle.write("2026-01-01T00:00:00.000Z run=0 INFO last line before the rotation\n")
        os.replace(log, log.with_name(log.name + ".1"))
        log.write_text("2026-01-01T00:00:01.000Z run=0 INFO first line after the rotation\n")
        out.wait_for("first line after the rotation")
        assert any("last line before the rotation" in line for line in out.seen)
        again = json.loads(cli("--output", "json", "run", stepper).stdout)
        out.wait_for(f"run={again['run_id']} ")
        assert log.with_name(log.name + ".1").exists()
    finally:
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=10)
    assert code == 0, proc.stderr.read() if proc.stderr else ""
    done = agentctl("logs", "nobody", home=home, env={"AGENT_ORCH_SOURCE": str(repo.path)})
    assert done.returncode == 2 and "no agent named 'nobody'" in done.stderr


def test_a_client_that_goes_away_gives_its_stream_back(main: Served) -> None:
    run_id = run_now(main, "napper")
    poll(lambda: main.api("GET", f"/runs/{run_id}", role="viewer").json["status"] == "running", "the nap to start")
    streams = [Stream(main, run_id) for _ in range(MAX_STREAMS)]
    assert [s.status for s in streams] == [200] * MAX_STREAMS
    assert main.api("GET", f"/runs/{run_id}/events?follow=1", role="viewer").status == 503
    for s in streams:  # the clients go away while the run goes on
        s.resp.close()
        s.close()

    def taken() -> bool:
        stream = Stream(main, run_id)
        stream.close()
        return stream.status == 200

    poll(taken, "a stream slot to be given back", timeout=60, every=0.2)
    assert main.api("GET", f"/runs/{run_id}", role="viewer").json["status"] == "running"
    assert main.api("POST", "/agents/napper/stop", role="operator", body={}).json["stopping_runs"] == 1
