"""After a crash: runs on record as queued or running whose launcher is gone become ``interrupted``.

The launcher (the daemon's, or a foreground ``agentctl run``) owns a run's row. If it died (kill -9,
power loss), nobody will write the final row, so the next daemon start does, and kills whatever is
left of the run's process group.
"""

from __future__ import annotations

import os
import signal
import sqlite3

from runner.agent.recording import end_in_flight
from runner.supervise.table import pid_alive


def sweep_interrupted(conn: sqlite3.Connection, client_id: str) -> list[str]:
    rows = conn.execute("SELECT * FROM run_progress WHERE client_id = ? AND status IN ('queued', 'running')",
                        (client_id,)).fetchall()
    swept = []
    for r in rows:
        if pid_alive(r["launcher_pid"]) and r["launcher_pid"] != os.getpid():
            continue  # a foreground run still in its launcher's care
        if r["pid"]:
            try:
                os.killpg(int(r["pid"]), signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        end_in_flight(conn, r, "interrupted", "the daemon or launcher died while the run was in flight")
        swept.append(r["run_id"])
    return swept
