"""A full disk under the home: the API answers 503 storage_full (never a 500), the ledger flush pauses
with the rows kept in the journal, and both resume once space is freed.

The home sits on a small tmpfs mounted by the test (we are root here and in CI), filled by a file the
test writes until the kernel says ENOSPC: the same disk-full SQLite, DuckDB and the OS report in
production. Every wait is a bounded poll.
"""

from __future__ import annotations

import errno
import gc
import json
import logging
import os
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import duckdb
import pytest
from api_helpers import Served, scripted, serve
from conftest import SpecRepo, agentctl, poll
from daemon_helpers import journal_pending, wait_ledger

from runner.api.app import AuditWriter
from runner.errors import StorageFullError
from runner.ledger.ingesting import flush, pending
from runner.ledger.schema import journal
from runner.state import Transaction, connect


@pytest.fixture
def disk(tmp_path: Path) -> Iterator[Path]:
    """A fresh 16 MiB tmpfs, unmounted after the test (and after whatever used it has stopped)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(mount)], check=True)
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], check=False).returncode != 0:
            subprocess.run(["umount", "-l", str(mount)], check=True)  # busy: detach it, and fail below
            raise AssertionError(f"{mount} was still in use when the test ended")


def fill(disk: Path, *, logs: Path | None = None) -> Path:
    """Write a file until the disk is full; the file. With ``logs``, the log files there get their last
    block filled too (with newlines), as a disk that fills up while the daemon logs leaves them."""
    filler = disk / "filler"
    _write_until_full(filler, b"\0")
    for log in sorted(logs.glob("*.log")) if logs else []:
        _write_until_full(log, b"\n")
    return filler


def _write_until_full(path: Path, byte: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (1 << 20, 1 << 12, 1):  # big blocks, then the last pages, then the last bytes
            try:
                while True:
                    os.write(fd, byte * size)
            except OSError as exc:
                assert exc.errno == errno.ENOSPC, exc
    finally:
        os.close(fd)


# -- the ledger flush on its own, in this process ---------------------------------------------------------


def run_row(n: int) -> dict[str, Any]:
    return {"run_id": f"run-{n:04d}", "client_id": "default", "agent": "a", "status": "succeeded",
            "trigger": "manual", "started_at": "2024-01-01T00:00:00Z"}


def ledger_count(ledger: Path) -> int:
    con = duckdb.connect(str(ledger), read_only=True)
    try:
        return int(con.execute("SELECT count(*) FROM runs").fetchone()[0])  # type: ignore[index]
    finally:
        con.close()


@pytest.fixture
def state(disk: Path) -> Iterator[sqlite3.Connection]:
    """The state database, on the small disk."""
    conn = connect(disk / "state.sqlite")
    try:
        yield conn
    finally:
        conn.close()


@pytest.mark.parametrize("ledger_exists", [True, False], ids=["ledger-exists", "ledger-created-on-a-full-disk"])
def test_the_flush_pauses_on_a_full_disk_keeps_every_row_and_resumes(disk: Path, state: sqlite3.Connection,
                                                                      ledger_exists: bool,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    ledger = disk / "runs.duckdb"
    if ledger_exists:
        with Transaction(state) as tx:
            journal(tx, "runs", run_row(0))
        assert flush(state, ledger) == 1
    with Transaction(state) as tx:
        for n in range(1, 301):
            journal(tx, "runs", run_row(n))
    filler = fill(disk)
    caplog.set_level(logging.INFO, logger="runner.ledger")

    for _ in range(5):
        assert flush(state, ledger) is None  # the flusher's view: busy, try later; no exception
        assert flush(state, ledger, wait=True) is None
    assert pending(state) == 300
    paused = [r for r in caplog.records if "ledger flush paused" in r.getMessage()]
    assert len(paused) == 1 and paused[0].levelno == logging.WARNING, caplog.text
    assert f"the disk holding {disk} is full" in paused[0].getMessage(), paused[0].getMessage()
    assert "Traceback" not in caplog.text

    filler.unlink()
    assert flush(state, ledger) == 300
    assert pending(state) == 0
    assert ledger_count(ledger) == 300 + ledger_exists
    assert [r.getMessage() for r in caplog.records if "ledger flush resumed" in r.getMessage()] == [
        f"ledger flush resumed: 300 row(s) moved to {ledger}"]
    rejected = state.execute("SELECT name FROM sqlite_master WHERE name = 'journal_rejected'").fetchone()
    assert rejected is None or state.execute("SELECT count(*) FROM journal_rejected").fetchone()[0] == 0

    # a second episode warns again
    caplog.clear()
    with Transaction(state) as tx:
        journal(tx, "runs", run_row(999))
    filler = fill(disk)
    assert flush(state, ledger) is None
    assert flush(state, ledger) is None
    assert len([r for r in caplog.records if "ledger flush paused" in r.getMessage()]) == 1
    filler.unlink()
    assert flush(state, ledger) == 1


class StateOnly:
    """The one part of a runtime (runner.supervise.runtime.Runtime) the audit writer uses: the state database."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self.state = conn

    def conn(self) -> sqlite3.Connection:
        return self.state


def test_the_api_keeps_the_audit_rows_it_cannot_write_until_there_is_space(disk: Path,
                                                                           state: sqlite3.Connection) -> None:
    writer = AuditWriter({"default": StateOnly(state)})  # type: ignore[dict-item]
    rows = [{"audit_id": f"a{n}", "client_id": "default", "action": "POST /x", "outcome": "503"} for n in range(3)]
    filler = fill(disk)
    for row in rows:
        writer.add("default", row)
    writer.flush()  # what its thread does every 0.2 s: never raises, keeps what it cannot write
    assert pending(state) == 0
    with writer.lock:
        assert [row for _client, row in writer.pending] == rows
    filler.unlink()
    writer.flush()
    written = [json.loads(r[0]) for r in state.execute("SELECT row FROM journal WHERE tbl = 'audit' ORDER BY id")]
    assert written == rows


def test_every_way_a_full_disk_is_reported_maps_to_one_error(disk: Path) -> None:
    made = connect(disk / "state.sqlite")
    made.close()  # the last connection closed: SQLite removed the -shm file the next one must create
    fill(disk)
    mapped: dict[str, StorageFullError | None] = {}  # what was raised, mapped (not kept: it holds files open)
    try:
        (disk / "more").write_bytes(b"x" * 65536)
    except OSError as exc:
        mapped[repr(exc)] = StorageFullError.of(exc)
    try:
        duckdb.connect(str(disk / "new.duckdb")).execute("CREATE TABLE t (x INTEGER)")
    except duckdb.Error as exc:
        mapped[repr(exc)] = StorageFullError.of(exc)
    try:
        connect(disk / "state.sqlite")
    except sqlite3.Error as exc:  # "disk I/O error": SQLITE_IOERR_SHMSIZE
        mapped[repr(exc)] = StorageFullError.of(exc)
    gc.collect()  # connect() leaves the connection it opened to its traceback's frames: close it, free the disk
    assert len(mapped) == 3, mapped
    for raised, full in mapped.items():
        assert full is not None and full.code == "storage_full", raised
        assert "disk holding the home" in full.message and "free space" in full.message
    assert StorageFullError.of(ValueError("no")) is None
    assert StorageFullError.of(OSError(errno.EACCES, "Permission denied")) is None


# -- the real daemon, its API and its flusher -------------------------------------------------------------


@pytest.fixture
def served(tmp_path: Path, disk: Path) -> Iterator[Served]:
    files = scripted("quick", [{"content": "done"}], overlap="queue")
    served = serve(tmp_path, files, home=disk / "home")
    try:
        yield served
    finally:
        served.stop()


def test_a_full_disk_is_a_503_for_the_api_and_a_pause_for_the_ledger(served: Served, disk: Path) -> None:
    home = served.home
    first = run(served, "before")
    wait_ledger(home, "SELECT run_id FROM runs", until=lambda rows: len(rows) == 1, what="the first run in the ledger")

    # A reader holds the ledger (DuckDB then refuses the flusher) while a run ends, so its rows are still in
    # the journal when the disk fills: the flusher's next attempt meets the full disk, not an idle journal.
    reader = duckdb.connect(str(home / "runs.duckdb"), read_only=True)
    try:
        second = run(served, "while the ledger is read")
        assert journal_pending(home) > 0
        filler = fill(disk, logs=home / "logs")
    finally:
        reader.close()
    poll(lambda: "ledger flush paused" in served.log(), "the flusher to meet the full disk")

    refused = served.api("POST", "/agents/quick/runs", role="operator", body={"input": "while full"})
    assert refused.status == 503, refused.body
    error = refused.error()
    assert error["code"] == "storage_full", error
    assert "disk holding the home" in error["message"] and "free space" in error["message"], error
    assert int(refused.headers["Retry-After"]) > 0
    for _ in range(3):
        assert served.api("POST", "/agents/quick/runs", role="operator", body={}).status == 503
    for path in ("/agents", "/agents/quick", "/runs", f"/runs/{first}", "/tools"):
        reply = served.api("GET", path, role="viewer")  # reads need no space: answered, or a 503 at worst
        assert reply.status in (200, 503), (path, reply.status, reply.body)
        if reply.status == 503:
            assert reply.error()["code"] == "storage_full", (path, reply.body)
    assert served.request("GET", "/healthz").status == 200
    reconcile = served.api("POST", "/hooks/git", role="operator", body={})  # a reconcile, which writes state
    assert reconcile.status in (202, 503), reconcile.body
    if reconcile.status == 202:
        poll(lambda: "reconcile failed, the disk holding the home is full" in served.log(), "the reconcile to fail")
    assert journal_pending(home) > 0  # the second run's rows wait in the journal
    for command, code in ((["history"], 0), (["status"], 0), (["run", "quick"], 2),
                          (["token", "create", "--role", "viewer"], 2)):
        done = agentctl(*command, home=home, env=served.env)  # reads work (the flush waits); writes say why not
        assert done.returncode == code and "Traceback" not in done.stderr, (command, done.stdout, done.stderr)
        if code:
            assert done.stderr.startswith("error: the disk holding the home"), (command, done.stderr)

    filler.unlink()
    third = poll(lambda: (r := served.api("POST", "/agents/quick/runs", role="operator", body={"input": "after"}))
                 .status == 202 and r.json["run_id"], "the API to take runs again")
    assert served.wait_run(third)["status"] == "succeeded"
    rows = wait_ledger(home, "SELECT run_id, status FROM runs ORDER BY run_id",  # each archived with its final row
                       until=lambda rows: [r["status"] for r in rows] == ["succeeded"] * 3,
                       what="the three runs in the ledger")
    assert rows == [{"run_id": r, "status": "succeeded"} for r in sorted([first, second, third])]
    refusals = 4 + (reconcile.status == 503)
    wait_ledger(home, "SELECT outcome FROM audit WHERE outcome = '503'", until=lambda rows: len(rows) == refusals,
                what="the refused requests in the audit ledger")  # kept by the API until it could write them
    poll(lambda: journal_pending(home) == 0, "the journal to drain")
    poll(lambda: "ledger flush resumed" in served.log(), "the flusher to say it resumed")

    log = served.log()
    assert "Traceback" not in log and "Logging error" not in log, log
    assert "internal error" not in log and "ledger flush failed" not in log, log
    assert log.count("ledger flush paused") == 1, log
    assert log.count("answering 503 storage_full") == 1, log  # one line, not one per request
    in_file = (home / "logs" / "agent_orchestrator.log").read_text(errors="replace")
    assert "Traceback" not in in_file and "ledger flush resumed" in in_file  # the file took lines again


def run(served: Served, text: str) -> str:
    """A run through the API, waited for: its id."""
    reply = served.api("POST", "/agents/quick/runs", role="operator", body={"input": text})
    assert reply.status == 202, reply.body
    run_id: str = reply.json["run_id"]
    assert served.wait_run(run_id)["status"] == "succeeded"
    return run_id


def test_the_cli_says_the_disk_is_full_without_a_traceback(disk: Path, repo: SpecRepo) -> None:
    """No daemon: the last process to close the state database removed its -shm file, so even a read must
    create one, and cannot (SQLite's "disk I/O error")."""
    home = disk / "home"
    repo.spec("alpha")
    repo.commit()
    env = {"AGENT_ORCH_SOURCE": str(repo.path)}
    assert agentctl("apply", home=home, env=env).returncode == 0
    filler = fill(disk)
    for command in (["token", "create", "--role", "admin"], ["status"], ["history"], ["apply"]):
        done = agentctl(*command, home=home, env=env)
        assert done.returncode == 2 and "Traceback" not in done.stderr, (command, done.stdout, done.stderr)
        assert done.stderr.startswith("error: the disk holding the home"), (command, done.stderr)
        assert "free space" in done.stderr
    filler.unlink()
    assert agentctl("status", home=home, env=env).returncode == 0
