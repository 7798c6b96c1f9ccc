"""The escape suite, part two: network, processes and resources. Custom tools try; the kernel says no.

Each tool declares only the permissions it is given ("read" or "write", never "network"), so the run
is confined as a spec without network tools is: in its own PID and network namespaces (scripted model),
under Landlock and rlimits. The tool's failure goes back to the model; the run itself succeeds.
"""

from __future__ import annotations

import json
import os
import socket
import time
from pathlib import Path

import duckdb
from conftest import SpecRepo, TcpCatcher

TOOL = '''
import os, socket, subprocess, sys, time
from langchain_core.tools import tool

PERMISSIONS = ["write"]


@tool
def attempt(what: str) -> str:
    """Try something the sandbox must stop."""
    kind, _, arg = what.partition(":")
    if kind == "tcp":
        host, port = arg.split(",")
        socket.create_connection((host, int(port)), timeout=3).sendall(b"ESCAPED")
        return "connected"
    if kind == "udp":
        host, port = arg.split(",")
        socket.socket(socket.AF_INET, socket.SOCK_DGRAM).sendto(b"ESCAPED", (host, int(port)))
        return "sent"
    if kind == "resolve":
        return str(socket.getaddrinfo(arg, 80))
    if kind == "orphan":
        if os.fork() == 0:
            os.setsid()
            if os.fork() == 0:
                out = open(arg, "w")  # kept open: the test finds survivors by this open file
                out.write(str(os.getpid()))
                out.flush()
                time.sleep(120)
            os._exit(0)
        return "forked"
    if kind == "allocate":
        blob = bytearray(int(arg) * 1024 * 1024)
        return str(len(blob))
    if kind == "bigfile":
        with open(arg, "wb") as out:
            for _ in range(50):
                out.write(b"x" * 1024 * 1024)
        return "written"
    if kind == "flood":
        for _ in range(100):
            sys.stdout.write("y" * 1024 * 1024)
        sys.stdout.flush()
        return "flooded"
    return "unknown"
'''


def _run_attempts(repo: SpecRepo, cli, home: Path, out: Path, attempts: list[str], extra: str = "") -> list[dict]:
    repo.write("specs/tools/attempt.py", TOOL)
    calls = ", ".join(f"{{name: attempt, args: {{what: {json.dumps(a)}}}}}" for a in attempts)
    repo.write("specs/_scripts/esc.yaml", f"turns:\n  - tool_calls: [{calls}]\n  - content: done\n")
    repo.spec("esc", model="scripted:_scripts/esc.yaml",
              extra=f"tools:\n  - name: attempt\n    permissions: [write]\n    paths: [{json.dumps(str(out))}]\n"
                    f"{extra}")
    repo.commit()
    assert cli("apply").returncode == 0
    done = cli("--output", "json", "run", "esc", timeout=120)
    result = json.loads(done.stdout)
    assert result["status"] == "succeeded", done.stdout + done.stderr
    con = duckdb.connect(str(home / "runs.duckdb"), read_only=True)
    try:
        rows = con.execute("SELECT detail FROM run_events WHERE run_id = ? AND kind = 'tool_call' ORDER BY seq",
                           [result["run_id"]]).fetchall()
        sandbox = json.loads(con.execute("SELECT detail FROM run_events WHERE run_id = ? AND name = 'sandbox'",
                                         [result["run_id"]]).fetchone()[0])
    finally:
        con.close()
    assert "pid" in sandbox["namespaces"] and "net" in sandbox["namespaces"], sandbox
    return [json.loads(r[0]) for r in rows]


def test_no_connection_no_datagram_no_name(repo: SpecRepo, cli, home: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    catcher = TcpCatcher()
    udp = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    udp.bind(("127.0.0.1", 0))
    udp.settimeout(0.5)
    events = _run_attempts(repo, cli, home, out, [f"tcp:127.0.0.1,{catcher.port}",
                                                  f"udp:127.0.0.1,{udp.getsockname()[1]}", "resolve:example.com"])
    assert all("error" in e for e in events), events  # each attempt failed inside the tool
    assert catcher.caught() == []
    try:
        data = udp.recv(64)
    except OSError:
        data = b""
    assert data == b""


def test_a_double_forked_child_does_not_outlive_the_run(repo: SpecRepo, cli, home: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    marker = out / "orphan.pid"
    events = _run_attempts(repo, cli, home, out, [f"orphan:{marker}"])
    assert "error" not in events[0]
    # It may be killed before it opens the file at all: the run has ended, and with it its PID namespace (the
    # kernel reaps the namespace's processes before its init's end is seen), so a short look is enough.
    deadline = time.monotonic() + 2
    while not marker.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    if marker.exists() and marker.read_text():
        pid_inside = int(marker.read_text())
        assert pid_inside != os.getpid()
    # No process on this machine runs the orphan's `time.sleep(120)` from our scratch tool any more.
    deadline = time.monotonic() + 20
    survivors = _orphans(marker)
    while survivors and time.monotonic() < deadline:
        time.sleep(0.1)
        survivors = _orphans(marker)
    assert survivors == []


def _orphans(marker: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            environ_cmd = (proc / "cmdline").read_bytes()
            fds = os.listdir(proc / "fd")
        except OSError:
            continue
        if b"runner" in environ_cmd and any(os.path.realpath(proc / "fd" / fd) == str(marker) for fd in fds):
            found.append(int(proc.name))
    return found


def test_memory_file_size_and_output_are_bounded(repo: SpecRepo, cli, home: Path, tmp_path: Path) -> None:
    out = tmp_path / "out"
    out.mkdir()
    events = _run_attempts(repo, cli, home, out, ["allocate:2048", f"bigfile:{out / 'big.bin'}", "flood:"],
                           extra="constraints: {max_memory_mb: 1024, max_file_mb: 10}\n")
    assert "MemoryError" in str(events[0].get("error")), events[0]
    assert "error" in events[1] and (out / "big.bin").stat().st_size <= 10 * 1024 * 1024
    # The flood went to the run's own capped output file in its scratch tmpfs, not to the CLI or the
    # daemon's log; its size and tail are on record, and the scratch folder is gone with the run.
    con = duckdb.connect(str(home / "runs.duckdb"), read_only=True)
    try:
        output = json.loads(con.execute("SELECT detail FROM run_events WHERE name = 'output'").fetchone()[0])
    finally:
        con.close()
    assert 0 < output["bytes"] <= 10 * 1024 * 1024 and output["tail"].endswith("y" * 100), output["bytes"]
    assert not list((home / "scratch").rglob("output.txt"))
