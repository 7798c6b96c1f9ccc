"""Start a run as its own process and see it to its end.

The launcher writes the ``runs`` row (queued, running, final), forks the run process into a process
group of its own, and waits on it with a pidfd. It ends the run early in three cases, always by
signalling the whole group (SIGTERM, then SIGKILL after ``AGENT_ORCH_KILL_GRACE``):
- the deadline (``max_runtime``, else ``DEFAULT_AGENT_TIMEOUT``) passes: ``timed_out``;
- a stop is requested (``agentctl stop``, the API, Ctrl-C): ``stopped``;
- the launcher itself is told to stop (the daemon shutting down).
When the run process has exited, whatever is left in its group is killed: no orphan outlives its run.
"""

from __future__ import annotations

import ctypes
import json
import os
import select
import signal
import socket
import sqlite3
import time
from dataclasses import dataclass
from pathlib import PurePosixPath
from typing import Any

from runner.agent.access import HostRule, redact
from runner.agent.recording import (
    TERMINAL,
    AgentLog,
    RunRow,
    agent_log_path,
    apply,
    new_run_id,
    next_seq,
    progress,
    utcnow,
    write_run,
)
from runner.agent.running import RunPlan, RunResult, execute
from runner.agent.warming import warm
from runner.errors import NotFoundError, OrchestratorError, SpecError
from runner.ledger.ingesting import flush
from runner.reconcile.applied import load_applied
from runner.sandbox import isolating
from runner.sandbox.confining import confine, model_endpoints, needs_network, network_tools
from runner.sandbox.confining import warm as warm_sandbox
from runner.sandbox.egress import EgressPolicy, EgressProxy
from runner.settings import Settings
from runner.source.git import GitSource
from runner.state import Transaction, connect, journal

CHILD_FAILED = 70


@dataclass
class Launch:
    plan: RunPlan
    row: RunRow
    pid: int
    pidfd: int | None
    pipe: int
    deadline: float
    proxy: EgressProxy | None = None


def prepare(settings: Settings, conn: sqlite3.Connection, source: GitSource, name: str, *,
            input: str | None = None, trigger: str = "manual", run_id: str | None = None,
            allow_suspended: bool = False) -> RunPlan:
    """The plan of a run of agent ``name`` at its applied revision."""
    agents = load_applied(conn, settings.client_id, name)
    agent = agents.get(name)
    if agent is None:
        raise NotFoundError(f"no agent named '{name}' for client '{settings.client_id}' (run 'agentctl apply')")
    spec = agent.spec
    if spec is None:
        raise SpecError(f"agent '{name}' has never had a valid spec: {agent.message}")
    if agent.suspended and not allow_suspended:
        raise SpecError(f"agent '{name}' is suspended: 'agentctl start {name}' resumes it")
    folder = source.location.path
    base = PurePosixPath(folder) / PurePosixPath(agent.path or "").parent
    script = None
    if spec.model.startswith("scripted:") and agent.applied_revision:
        target = os.path.normpath(str(base / spec.model[len("scripted:"):]))
        script = source.read_file(agent.applied_revision, target).decode("utf-8", "replace")
    custom = {}
    from runner.specs.catalog import BUILTIN_TOOLS

    for tool in spec.tools:
        if tool.name not in BUILTIN_TOOLS and agent.applied_revision:
            path = str(PurePosixPath(folder) / "tools" / f"{tool.name}.py")
            custom[tool.name] = source.read_file(agent.applied_revision, path).decode("utf-8", "replace")
    return RunPlan(run_id=run_id or new_run_id(), client_id=settings.client_id, agent=name,
                   revision=agent.applied_revision, spec=spec, settings=settings, trigger=trigger, input=input,
                   script=script, custom_sources=custom)


def start(conn: sqlite3.Connection, plan: RunPlan, requested_by: str | None = None,
          queued_at: str | None = None, isolate_here: bool = False) -> Launch:
    """Fork the run process. ``isolate_here``: this process is a launcher of its own (the daemon's, one
    per run), so it enters the run's namespaces itself and the run process is their PID 1 at once;
    `agentctl run` leaves that to the run process, which forks once more (the CLI stays where it is)."""
    warm()  # once per launcher process; every run forked after it starts warm
    warm_sandbox()
    now = utcnow()
    row = RunRow(plan.run_id, plan.client_id, plan.agent, plan.revision, plan.trigger, "running",
                 queued_at=queued_at or now, started_at=now, input=plan.input, requested_by=requested_by)
    write_run(conn, row)
    read_end, write_end = os.pipe()
    sandboxed = plan.settings.sandbox != "off"
    gateway = socket.socketpair() if sandboxed and needs_network(plan) else None
    # Here, a user namespace needs a single thread, and after the PID namespace no thread can start:
    # so the user namespace, then the proxy's thread, then the PID namespace.
    user = isolating.enter_user() if isolate_here and sandboxed else []
    proxy = _egress_proxy(plan) if gateway else None
    entered = None
    if isolate_here:
        pid_ns = isolating.enter_pid() if sandboxed else []
        entered = user + pid_ns if pid_ns else []
    pid = os.fork()
    if pid == 0:  # the run process
        if gateway:
            gateway[0].close()
        _child(plan, read_end, write_end, entered, gateway[1] if gateway else None)
    os.close(write_end)
    try:
        os.setpgid(pid, pid)  # also done in the child; whichever runs first wins the race
    except (PermissionError, ProcessLookupError):
        pass
    row.pid = pid
    conn.execute("UPDATE run_progress SET pid = ? WHERE run_id = ?", (pid, plan.run_id))
    pidfd = os.pidfd_open(pid) if hasattr(os, "pidfd_open") else None
    launch = Launch(plan, row, pid, pidfd, read_end, time.monotonic() + plan.deadline_seconds, proxy)
    if gateway and proxy:
        gateway[1].close()
        _serve_egress(proxy, gateway[0])
    return launch


def _egress_proxy(plan: RunPlan) -> EgressProxy:
    """The run's egress proxy, not serving yet: its model servers, and its allowed domains when a tool
    is granted 'network'."""
    hosts = HostRule(tuple(plan.spec.constraints.allowed_domains), plan.settings.enable_remote_tools) \
        if network_tools(plan) else None
    return EgressProxy(EgressPolicy(frozenset(model_endpoints(plan)), hosts))


def _serve_egress(proxy: EgressProxy, channel: socket.socket) -> None:
    """Take the listener the run made in its network namespace and serve the egress proxy on it.
    Without one (the run could not make its namespace), the run has no way out."""
    channel.settimeout(10)
    try:
        _message, fds, _flags, _addr = socket.recv_fds(channel, 16, 1)
    except OSError:
        fds = []
    finally:
        channel.close()
    if fds:
        proxy.serve(socket.socket(fileno=fds[0]))


def _child(plan: RunPlan, read_end: int, write_end: int, entered: list[str] | None = None,
           gateway: socket.socket | None = None) -> None:
    code = CHILD_FAILED
    try:
        os.setpgid(0, 0)
        die_with_parent()
        os.close(read_end)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        if entered is not None:  # the launcher entered them: this process is PID 1 already
            namespaces = entered
            if namespaces:
                signal.signal(signal.SIGTERM, lambda *_: os._exit(143))  # PID 1 ignores unhandled signals
        else:
            namespaces = isolating.enter() if plan.settings.sandbox != "off" else []
        if namespaces and entered is None:  # PID 1 of the new namespace runs the agent; this one waits
            inner = os.fork()
            if inner:  # on SIGTERM, end the namespace (its PID 1) and reap it: no orphan, no zombie
                os.close(write_end)
                if gateway is not None:
                    gateway.close()
                signal.signal(signal.SIGTERM, lambda *_: os.kill(inner, signal.SIGKILL))
                _pid, status = os.waitpid(inner, 0)
                os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
            die_with_parent()
            signal.signal(signal.SIGTERM, lambda *_: os._exit(143))  # PID 1 ignores signals it does not handle

        def sink(message: dict[str, Any]) -> None:
            data = (json.dumps(message, default=str) + "\n").encode()
            while data:
                data = data[os.write(write_end, data):]

        isolation = _isolate(plan, list(namespaces), gateway)
        try:
            sandbox = confine(plan, isolation)
        except OrchestratorError as exc:
            result = RunResult("failed", error=f"sandbox: {exc.message}")
        else:
            result = execute(plan, sink, sandbox=sandbox)
        sink({"t": "result", **json.loads(result.to_json())})
        code = 0
    except BaseException:
        code = CHILD_FAILED
    finally:
        os._exit(code)


def _isolate(plan: RunPlan, namespaces: list[str], gateway: socket.socket | None) -> dict[str, Any]:
    """In the process that will run the agent (PID 1 of its namespace): its process limit and its
    network namespace; the egress listener goes to the launcher over ``gateway``."""
    isolation: dict[str, Any] = {"namespaces": namespaces}
    if plan.settings.sandbox == "off":
        return isolation
    limit = plan.spec.constraints.max_processes or plan.settings.max_processes
    if "pid" in namespaces:
        isolation["pid_max"] = isolating.limit_processes(limit)
    try:
        listener = isolating.enter_network(gateway=gateway is not None)
        namespaces.append("net")
    except OSError as exc:
        listener, isolation["network_error"] = None, str(exc)
    if listener is not None and gateway is not None:
        try:
            socket.send_fds(gateway, [b"egress"], [listener.fileno()])
            isolation["egress_port"] = listener.getsockname()[1]
        except OSError as exc:
            isolation["network_error"] = f"cannot hand the egress listener to the launcher: {exc}"
        listener.close()
    if gateway is not None:
        gateway.close()
    return isolation


def wait(conn: sqlite3.Connection, launch: Launch, *, kill_grace: float, should_stop: Any = None) -> RunRow:
    """Wait for the run to end (killing it at its deadline or on a stop request); write its final row.

    Meanwhile, apply what the run process reports on its pipe (events, usage, log lines), in order."""
    reader = _Lines(conn, launch)
    ended_by: str | None = None
    while True:
        timeout = max(0.0, min(0.25, launch.deadline - time.monotonic()))
        wake = launch.proxy.wake_fd if launch.proxy else None
        watch = [fd for fd in (launch.pipe, launch.pidfd, wake) if fd is not None and fd >= 0]
        ready, _, _ = select.select(watch, [], [], timeout)
        if launch.proxy and wake in ready:
            _journal_egress(reader, launch.proxy.decisions())
        if launch.pipe in ready:
            chunk = os.read(launch.pipe, 65536)
            reader.feed(chunk)
            if not chunk:
                launch.pipe = _closed(launch.pipe)
        if _exited(launch.pid):
            break
        if time.monotonic() >= launch.deadline:
            ended_by = "timed_out"
        elif _stop_requested(conn, launch.row.run_id) or (should_stop is not None and should_stop()):
            ended_by = "stopped"
        if ended_by:
            _terminate(launch.pid, kill_grace)
            break
    _kill_group(launch.pid)
    reader.feed(_drain(launch.pipe))
    if launch.proxy is not None:
        _journal_egress(reader, launch.proxy.close())
    if launch.pidfd is not None:
        os.close(launch.pidfd)
    return finish(conn, launch, _result(reader.result, ended_by, launch))


def _journal_egress(reader: _Lines, decisions: list[dict[str, Any]]) -> None:
    for d in decisions:
        reader.apply({"t": "event", "ts": d.pop("ts"), "kind": "log", "name": "egress",
                      "decision": d.pop("decision"), "detail": d})


class _Lines:
    """The run process's JSON lines, applied as they arrive; the last one is its result."""

    def __init__(self, conn: sqlite3.Connection, launch: Launch) -> None:
        self.conn, self.launch = conn, launch
        self.buf = b""
        self.result: dict[str, Any] | None = None
        s = launch.plan.settings
        self.log = AgentLog(agent_log_path(s.logs_dir, launch.plan.client_id, launch.plan.agent), launch.plan.run_id)

    def feed(self, chunk: bytes) -> None:
        self.buf += chunk
        while b"\n" in self.buf:
            line, self.buf = self.buf.split(b"\n", 1)
            try:
                message = json.loads(line)
            except ValueError:
                continue  # not ours: a run process cannot forge more than its own record
            if not isinstance(message, dict):
                continue
            if message.get("t") == "result":
                self.result = message
            else:
                self.apply(message)

    def apply(self, message: dict[str, Any]) -> None:
        apply(self.conn, self.launch.plan.run_id, self.log, message)


def finish(conn: sqlite3.Connection, launch: Launch, result: RunResult) -> RunRow:
    row = launch.row
    p = progress(conn, row.run_id)
    row.status, row.output, row.error, row.ended_at = result.status, result.output, result.error, utcnow()
    row.input_tokens, row.output_tokens = int(p.get("input_tokens", 0)), int(p.get("output_tokens", 0))
    row.model_calls, row.tool_calls = int(p.get("model_calls", 0)), int(p.get("tool_calls", 0))
    with Transaction(conn) as tx:
        seq = next_seq(tx, row.run_id)
        journal(tx, "run_events", {"run_id": row.run_id, "seq": seq, "ts": row.ended_at, "kind": "status",
                                   "name": row.status, "decision": None,
                                   "detail": redact({"error": row.error,
                                                     "tokens": row.input_tokens + row.output_tokens})})
    write_run(conn, row)
    return row  # the caller flushes the ledger: per run (CLI) or batched (daemon)


def run_foreground(settings: Settings, source: GitSource, name: str, *, input: str | None = None,
                   trigger: str = "manual", requested_by: str | None = None) -> RunRow:
    """One run now, in this process's care (agentctl run without a daemon)."""
    conn = connect(settings.state_path)
    plan = prepare(settings, conn, source, name, input=input, trigger=trigger)
    interrupted = {"flag": False}

    def on_signal(_signum: int, _frame: Any) -> None:
        interrupted["flag"] = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        launch = start(conn, plan, requested_by)
        row = wait(conn, launch, kill_grace=settings.kill_grace, should_stop=lambda: interrupted["flag"])
        flush(conn, settings.ledger_path)
        return row
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        conn.close()


def die_with_parent(sig: int = signal.SIGKILL) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux; no-op elsewhere)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass


def request_stop(conn: sqlite3.Connection, client_id: str, agent: str) -> int:
    """Ask every in-flight run of ``agent`` to stop; their launchers do the stopping."""
    cur = conn.execute("UPDATE run_progress SET stop_requested = 1 WHERE client_id = ? AND agent = ? "
                       "AND status IN ('queued', 'running')", (client_id, agent))
    return cur.rowcount


def _result(data: dict[str, Any] | None, ended_by: str | None, launch: Launch) -> RunResult:
    if ended_by == "timed_out":
        return RunResult("timed_out", error=f"exceeded max_runtime of {launch.plan.deadline_seconds:g}s")
    if ended_by == "stopped":
        return RunResult("stopped", error="stopped on request")
    if data is None or data.get("status") not in TERMINAL:
        return RunResult("failed", error=f"run process died without a result ({_exit_text(launch.pid)})")
    return RunResult(str(data["status"]), data.get("output"), data.get("error"))


_EXIT_STATUS: dict[int, int] = {}


def _exited(pid: int) -> bool:
    if pid in _EXIT_STATUS:
        return True
    try:
        done, status = os.waitpid(pid, os.WNOHANG)
    except ChildProcessError:
        _EXIT_STATUS[pid] = -1
        return True
    if done == 0:
        return False
    _EXIT_STATUS[pid] = status
    return True


def _exit_text(pid: int) -> str:
    status = _EXIT_STATUS.pop(pid, -1)
    if status == -1:
        return "exit status unknown"
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.WEXITSTATUS(status)}"


def _terminate(pid: int, grace: float) -> None:
    _signal_group(pid, signal.SIGTERM)
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline:
        if _exited(pid):
            return
        time.sleep(0.02)
    _signal_group(pid, signal.SIGKILL)
    while not _exited(pid):
        time.sleep(0.01)


def _kill_group(pid: int) -> None:
    _signal_group(pid, signal.SIGKILL)


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop_requested(conn: sqlite3.Connection, run_id: str) -> bool:
    row = conn.execute("SELECT stop_requested FROM run_progress WHERE run_id = ?", (run_id,)).fetchone()
    return bool(row and row[0])


def _drain(fd: int) -> bytes:
    if fd < 0:
        return b""
    out = b""
    os.set_blocking(fd, False)
    try:
        while True:
            chunk = os.read(fd, 65536)
            if not chunk:
                break
            out += chunk
    except BlockingIOError:
        pass
    os.close(fd)
    return out


def _closed(fd: int) -> int:
    os.close(fd)
    return -1
