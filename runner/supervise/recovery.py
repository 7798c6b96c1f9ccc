"""After a crash: what a dead daemon (or foreground launcher) left on record as queued or running.

The launcher (the daemon's, or a foreground ``agentctl run``) owns a run's row. If it died (kill -9,
power loss), nobody will write the final row, so the next daemon start sorts its runs in two:
- a run that was ``running`` (its process had started) is ``interrupted``, and whatever is left of its
  process group is killed: part of it ran, and running it again is the spec's choice (``retry``);
- a run on a Ray node (``executor`` ray) may still run there: the caller asks the executor to follow it
  again (``ProcessTable.reattach``), and ends it interrupted (``end_in_flight``) when no node has it;
- a run that was still ``queued`` had not started: nothing of it ran, so it goes back on the queue,
  under its own run id, ahead of anything new.
"""

from __future__ import annotations

import os
import shutil
import signal
import sqlite3
from dataclasses import dataclass, field
from pathlib import Path

from runner.agent.recording import end_in_flight
from runner.supervise.table import pid_alive


@dataclass
class Recovered:
    interrupted: list[sqlite3.Row] = field(default_factory=list)  # now 'interrupted'
    remote: list[sqlite3.Row] = field(default_factory=list)  # running on a cluster node: to follow again
    queued: list[sqlite3.Row] = field(default_factory=list)  # to put back on the queue, oldest first


def sweep(conn: sqlite3.Connection, client_id: str, scratch: Path | None = None) -> Recovered:
    """Sort the runs a dead supervisor left; ``scratch`` (the client's scratch folder) loses their folders."""
    rows = conn.execute("SELECT * FROM run_progress WHERE client_id = ? AND status IN ('queued', 'running') "
                        "ORDER BY run_id", (client_id,)).fetchall()
    found = Recovered()
    for r in rows:
        if pid_alive(r["launcher_pid"]) and r["launcher_pid"] != os.getpid():
            continue  # a foreground run still in its launcher's care
        if r["executor"] == "ray":  # on a node, or waiting for one: the executor may find it there
            found.remote.append(r)
            continue
        if r["status"] == "queued" and not r["pid"]:
            found.queued.append(r)
            continue
        if r["pid"]:
            try:
                os.killpg(int(r["pid"]), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        end_in_flight(conn, r, "interrupted", "the daemon or launcher died while the run was in flight")
        found.interrupted.append(r)
        if scratch is not None:
            shutil.rmtree(scratch / r["run_id"], ignore_errors=True)
    return found

