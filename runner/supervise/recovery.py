"""After a crash: runs on record as queued or running whose launcher is gone become ``interrupted``.

The launcher (the daemon's, or a foreground ``agentctl run``) owns a run's row. If it died (kill -9,
power loss), nobody will write the final row, so the next daemon start does, and kills whatever is
left of the run's process group.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3

from runner.agent.recording import RunRow, utcnow, write_run
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
        data = json.loads(r["row"]) if r["row"] else {}
        row = RunRow(run_id=r["run_id"], client_id=r["client_id"], agent=r["agent"],
                     spec_revision=data.get("spec_revision"), trigger=data.get("trigger") or "unknown",
                     status="interrupted", queued_at=data.get("queued_at"), started_at=data.get("started_at"),
                     ended_at=utcnow(), input_tokens=int(r["input_tokens"]), output_tokens=int(r["output_tokens"]),
                     model_calls=int(r["model_calls"]), tool_calls=int(r["tool_calls"]),
                     error="the daemon or launcher died while the run was in flight", input=data.get("input"),
                     requested_by=data.get("requested_by"), pid=r["pid"])
        write_run(conn, row)
        swept.append(r["run_id"])
    return swept
