"""The fork server: a one-thread process with LangChain loaded that forks a launcher per run.

Protocol, one JSON object per line: the daemon writes ``{"op": "run", "plan": ..., "requested_by": ...,
"queued_at": ...}`` on stdin; the server answers ``{"op": "ready"}`` once warm, then
``{"op": "started", "run_id", "launcher"}`` and ``{"op": "ended", "run_id", "status"}`` per run.
EOF on stdin (the daemon went away) ends it; so does the daemon's death (PR_SET_PDEATHSIG).

A launcher's exit code carries the run's final status (an index into TERMINAL), so the server needs
no database of its own.
"""

from __future__ import annotations

import json
import os
import select
import signal
import sys
from typing import Any

from runner.agent.launching import die_with_parent, start, wait
from runner.agent.recording import TERMINAL
from runner.agent.running import RunPlan
from runner.agent.warming import warm
from runner.sandbox.confining import warm as warm_sandbox
from runner.state import connect

STATUS_BASE = 10


def main() -> None:
    die_with_parent()
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the daemon decides when runs stop
    signal.signal(signal.SIGTERM, signal.SIG_DFL)
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    warm()
    warm_sandbox()
    out = sys.stdout
    _send(out, {"op": "ready", "pid": os.getpid()})
    launchers: dict[int, str] = {}
    buf = b""
    stdin = sys.stdin.fileno()
    while True:
        ready, _, _ = select.select([stdin, wake_r], [], [], 1.0)
        if wake_r in ready:
            os.read(wake_r, 4096)
        _reap(launchers, out)
        if stdin not in ready:
            continue
        chunk = os.read(stdin, 1 << 20)
        if not chunk:
            break
        buf += chunk
        while b"\n" in buf:
            line, buf = buf.split(b"\n", 1)
            if line.strip():
                request = json.loads(line)
                pid = _launch(request)
                launchers[pid] = request["plan"]["run_id"]
                _send(out, {"op": "started", "run_id": request["plan"]["run_id"], "launcher": pid})
    for pid in list(launchers):  # the daemon is gone: our launchers get SIGKILL via PDEATHSIG
        os.kill(pid, signal.SIGTERM)


def _launch(request: dict[str, Any]) -> int:
    pid = os.fork()
    if pid:
        return pid
    code = STATUS_BASE + TERMINAL.index("failed")
    try:
        die_with_parent()
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGCHLD, signal.SIGTERM):
            signal.signal(sig, signal.SIG_DFL)
        plan = RunPlan.from_json(request["plan"])
        conn = connect(plan.settings.state_path)
        launch = start(conn, plan, request.get("requested_by"), request.get("queued_at"), isolate_here=True)
        row = wait(conn, launch, kill_grace=plan.settings.kill_grace)
        code = STATUS_BASE + TERMINAL.index(row.status)
    except BaseException as exc:
        print(f"launcher for run {request.get('plan', {}).get('run_id')} failed: {exc!r}", file=sys.stderr)
    finally:
        os._exit(code)


def _reap(launchers: dict[int, str], out: Any) -> None:
    while launchers:
        try:
            pid, status = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return
        run_id = launchers.pop(pid, None)
        if run_id is None:
            continue
        code = os.WEXITSTATUS(status) if os.WIFEXITED(status) else -1
        index = code - STATUS_BASE
        if 0 <= index < len(TERMINAL):
            _send(out, {"op": "ended", "run_id": run_id, "status": TERMINAL[index]})
        else:  # the launcher died before it could write the run's final row
            how = f"was killed by {signal.Signals(os.WTERMSIG(status)).name}" if os.WIFSIGNALED(status) \
                else f"failed (exit status {code}; the daemon's log says why)"
            _send(out, {"op": "ended", "run_id": run_id, "status": "failed", "error": f"the run's launcher {how}"})


def _send(out: Any, message: dict[str, Any]) -> None:
    out.write(json.dumps(message) + "\n")
    out.flush()


if __name__ == "__main__":
    main()
