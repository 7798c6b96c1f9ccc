"""A real daemon (`agentctl serve`) in a subprocess, and ways to look at it from the outside.

Every process a daemon starts (fork server, launchers, runs, the tools' commands) inherits its environment,
so a marker variable with a value of its own finds them all in /proc, whatever their process group.
Waits are bounded polls; nothing here sleeps for a fixed time to let something happen.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import sqlite3
import subprocess
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import duckdb
from conftest import ROOT, poll, process_table

from runner.errors import TransientError
from runner.ledger.runs import get_run, list_runs
from runner.supervise.control import call, socket_path
from runner.supervise.table import pid_alive

MARKER = "AGENT_ORCH_TEST_DAEMON"


class ServeProcess:
    """`python -m runner ... serve` under a test: spawned with its output in a log, checked for an early
    exit while the test waits for it, stopped with SIGTERM."""

    log_path: Path
    proc: subprocess.Popen[bytes] | None

    def _spawn(self, options: list[str], env: dict[str, str], *serve_options: str) -> None:
        with open(self.log_path, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "runner", *options, "serve", *serve_options],
                                         cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)

    def _running(self) -> subprocess.Popen[bytes]:
        """The process; an AssertionError with its log if it has exited."""
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"the daemon exited with {self.proc.returncode}:\n{self.log()}")
        return self.proc

    def terminate(self, timeout: float = 30.0) -> int:
        """SIGTERM, and the exit code (SIGKILL and a failure if it does not exit within ``timeout``)."""
        if self.proc is None:
            return -1
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
                raise AssertionError(f"the daemon did not exit within {timeout:g}s of SIGTERM:\n{self.log()}") from None
        return self.proc.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""


class Daemon(ServeProcess):
    """`python -m runner --home HOME serve` with its own environment, started and stopped by the test."""

    def __init__(self, home: Path, source: Path, log: Path, env: dict[str, str] | None = None) -> None:
        self.home, self.source, self.log_path = home, source, log
        self.marker = uuid.uuid4().hex
        self.env = {**os.environ, "AGENT_ORCH_SOURCE": str(source), "AGENT_ORCH_SYNC_INTERVAL": "300",
                    "AGENT_ORCH_SHUTDOWN_GRACE": "0", "AGENT_ORCH_KILL_GRACE": "1",
                    "AGENT_ORCH_FLUSH_INTERVAL": "0.5", "AGENT_ORCH_PORT": "0", MARKER: self.marker, **(env or {})}
        self.proc: subprocess.Popen[bytes] | None = None
        self.socket = socket_path(home, "default")

    def start(self, timeout: float = 30.0) -> Daemon:
        self._spawn(["--home", str(self.home)], self.env)
        poll(self._ready, "the daemon to answer ping", timeout)
        return self

    def _ready(self) -> bool:
        proc = self._running()
        try:
            answer = call(self.socket, {"op": "ping"}, timeout=5)
        except (OSError, TransientError):
            return False
        return bool(answer and answer.get("ok") and answer.get("pid") == proc.pid)

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def call(self, request: dict[str, Any], timeout: float = 60.0) -> dict[str, Any]:
        answer = call(self.socket, request, timeout=timeout)
        assert answer is not None, "no daemon listens on the control socket"
        assert answer.get("ok"), answer
        return answer

    def run(self, agent: str, input: str | None = None) -> dict[str, Any]:
        """A manual run through the control socket, waited for: the final row."""
        return self.call({"op": "run", "agent": agent, "input": input, "requested_by": "test"})

    def submit(self, agent: str, input: str | None = None) -> str:
        """A manual run through the control socket, not waited for: its run id."""
        answer = self.call({"op": "run", "agent": agent, "input": input, "requested_by": "test", "wait": False})
        return str(answer["run_id"])

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(timeout=10)

    def processes(self) -> list[int]:
        """Live processes (not zombies) of this daemon: the daemon and all it started. The zygote and
        the runs have a clean environment, so they are found by the zygote's command line instead."""
        tag = f"--supervisor={self.pid}".encode()
        zygote = [int(e) for e in os.listdir("/proc") if e.isdigit() and tag in _cmdline(int(e))
                  and pid_alive(int(e))]
        return sorted(set(processes_with_env(MARKER, self.marker)) | set(zygote))

    def zygote(self) -> int:
        """The pid of this daemon's zygote (a child of the daemon, which forks its runs)."""
        found = [pid for pid in children_of(self.pid) if b"runner.agent.spawning" in _cmdline(pid)]
        assert len(found) == 1, found
        return found[0]


def processes_with_env(key: str, value: str) -> list[int]:
    wanted = f"{key}={value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            if wanted not in Path(f"/proc/{entry}/environ").read_bytes().split(b"\0"):
                continue
            state = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:
            continue
        if state not in ("Z", "X"):
            found.append(int(entry))
    return found


def live_in_group(pgid: int) -> list[int]:
    """Live processes (zombies left out: this machine's init reaps orphans lazily) in process group ``pgid``."""
    return [pid for pid, state, _ppid, group in process_table() if group == pgid and state not in ("Z", "X")]


def children_of(pid: int) -> list[int]:
    """Live (not zombie) children of ``pid``, from /proc."""
    return [child for child, state, ppid, _group in process_table() if ppid == pid and state not in ("Z", "X")]


def _cmdline(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return b""


def process_alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state not in ("Z", "X")


# -- the state database and the ledger, read from outside ---------------------------------------------


def state_rows(home: Path, sql: str, params: tuple[Any, ...] = ()) -> list[dict[str, Any]]:
    conn = sqlite3.connect(home / "state.sqlite", timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        return [dict(r) for r in conn.execute(sql, params)]
    finally:
        conn.close()


def progress_of(home: Path, run_id: str, client_id: str = "default") -> dict[str, Any]:
    """The run as the API and the CLI read it (runner.ledger.runs: the live store, then the ledger), or {}."""
    with _reader(home) as conn:
        return get_run(conn, home / "runs.duckdb", client_id, run_id) or {}


def listed_runs(home: Path, agent: str, status: str | None = None, client_id: str = "default") -> list[dict[str, Any]]:
    """The agent's runs as the API and the CLI list them (both stores), newest first."""
    with _reader(home) as conn:
        return list_runs(conn, home / "runs.duckdb", client_id, agent=agent, status=status, limit=100_000)[0]


@contextlib.contextmanager
def _reader(home: Path) -> Iterator[sqlite3.Connection]:
    conn = sqlite3.connect(home / "state.sqlite", timeout=10)
    conn.row_factory = sqlite3.Row
    try:
        yield conn
    finally:
        conn.close()


def status_of(home: Path, run_id: str) -> str | None:
    return progress_of(home, run_id).get("status")


def ledger_rows(home: Path, sql: str, params: list[Any] | None = None) -> list[dict[str, Any]] | None:
    """Rows of a query over runs.duckdb, or None while the daemon's flusher holds the file."""
    try:
        con = duckdb.connect(str(home / "runs.duckdb"), read_only=True)
    except duckdb.IOException as exc:
        if "lock" in str(exc).lower():
            return None
        raise
    try:
        cur = con.execute(sql, params or [])
        names = [d[0] for d in cur.description]
        return [dict(zip(names, r, strict=True)) for r in cur.fetchall()]
    except duckdb.CatalogException:
        return None  # the daemon has not created the tables yet
    finally:
        con.close()


def wait_ledger(home: Path, sql: str, params: list[Any] | None = None, *, until: Callable[[list[dict[str, Any]]],
                bool], what: str, timeout: float = 20.0) -> list[dict[str, Any]]:
    """Poll the ledger until the rows of ``sql`` satisfy ``until``; those rows."""
    def check() -> list[dict[str, Any]] | None:
        rows = ledger_rows(home, sql, params)
        return rows if rows is not None and until(rows) else None

    rows: list[dict[str, Any]] = poll(check, what, timeout, every=0.1)
    return rows


def runs_of(home: Path, agent: str) -> list[dict[str, Any]] | None:
    return ledger_rows(home, "SELECT * FROM runs WHERE agent = ? ORDER BY coalesce(started_at, queued_at), run_id",
                       [agent])


def journal_pending(home: Path) -> int:
    return int(state_rows(home, "SELECT count(*) AS n FROM journal")[0]["n"])


def duckdb_cli() -> str:
    return str(Path(sys.executable).parent / "duckdb")


def run_duckdb_cli(home: Path, sql: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([duckdb_cli(), "-readonly", "-json", str(home / "runs.duckdb"), sql], capture_output=True,
                          text=True, timeout=30, check=False)


def cli_json(done: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(done.stdout)
