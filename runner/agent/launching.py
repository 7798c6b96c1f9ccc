"""Start a run and see it to its end, from the supervisor's side (the daemon, or `agentctl run`).

The supervisor writes the ``runs`` row (running, final), has the zygote (``spawning``) fork the run
process, sends it its plan over the run's channel, and then waits on three things at once: the
channel (the run's events, applied in order), a pidfd of the run process, and the egress proxy's
decisions. It ends the run early, always by signalling the run's whole process group (SIGTERM, then
SIGKILL after ``AGENT_ORCH_KILL_GRACE``):
- the deadline (``max_runtime``, else ``DEFAULT_AGENT_TIMEOUT``) passes: ``timed_out``;
- a stop is requested (``agentctl stop``, the API, Ctrl-C, the daemon shutting down): ``stopped``;
- the run breaks its channel (an oversized or malformed message): ``failed``, with the reason.
The egress proxy, and the model credentials it adds, live here: never in the run.
"""

from __future__ import annotations

import functools
import json
import os
import select
import shutil
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
from runner.agent.running import RunPlan, RunResult
from runner.agent.spawning import Zygote
from runner.errors import NotFoundError, SpecError
from runner.ledger.ingesting import flush
from runner.reconcile.applied import load_applied
from runner.sandbox.confining import (
    check_paths,
    model_endpoints,
    model_upstream,
    needs_network,
    network_tools,
    run_view,
    runtime_overlaps,
)
from runner.sandbox.egress import Budget, EgressPolicy, EgressProxy
from runner.settings import Settings
from runner.source.git import GitSource
from runner.specs.checking import private_folders, protected_folders
from runner.state import Transaction, connect, journal

MAX_SCRIPT = 1 << 20  # bytes of a scripted model file, as of a spec file
MAX_MESSAGE = 1 << 20  # bytes of one line on a run's channel; events are capped far below it
MAX_MESSAGES = 20_000  # lines from one run: a flood of small ones would fill the journal and the log
MAX_BYTES = 64 << 20  # bytes from one run in all
MAX_STRANGERS = 20  # names of tools the agent does not have, that a run may report calls of
MAX_DETAIL = 64 << 10  # bytes of one event as recorded; a larger one keeps its size, not its content


@dataclass
class Launch:
    plan: RunPlan
    row: RunRow
    pid: int
    pidfd: int
    channel: socket.socket
    deadline: float
    zygote: Zygote
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
        script = source.read_file(agent.applied_revision, target, limit=MAX_SCRIPT).decode("utf-8", "replace")
    custom = {}
    from runner.specs.catalog import BUILTIN_TOOLS

    for tool in spec.tools:
        if tool.name not in BUILTIN_TOOLS and agent.applied_revision:
            path = str(PurePosixPath(folder) / "tools" / f"{tool.name}.py")
            custom[tool.name] = source.read_file(agent.applied_revision, path, limit=MAX_SCRIPT).decode(
                "utf-8", "replace")
    plan = RunPlan(run_id=run_id or new_run_id(), client_id=settings.client_id, agent=name,
                   revision=agent.applied_revision, spec=spec, settings=settings, trigger=trigger, input=input,
                   script=script, custom_sources=custom, private=list(_folders(settings)[1]))
    check_paths(plan, list(_folders(settings)[0]))
    return plan


@functools.lru_cache(maxsize=32)
def _folders(settings: Settings) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
    """The folders no spec path may overlap, and those of them a runtime path overlaps: worked out once
    per settings (a few milliseconds of settings files and realpaths; a daemon restarts for new ones)."""
    return protected_folders(settings), tuple(runtime_overlaps(list(private_folders(settings))))


def start(conn: sqlite3.Connection, plan: RunPlan, requested_by: str | None = None,
          queued_at: str | None = None, *, zygote: Zygote, retry_of: str | None = None) -> Launch:
    """Record the run as running, have the zygote fork its process, and send it its plan."""
    now = utcnow()
    row = RunRow(plan.run_id, plan.client_id, plan.agent, plan.revision, plan.trigger, "running",
                 queued_at=queued_at or now, started_at=now, input=plan.input, requested_by=requested_by,
                 retry_of=retry_of)
    write_run(conn, row)
    plan.scratch.mkdir(parents=True, exist_ok=True)  # the run mounts its own tmpfs over it
    proxy = _egress_proxy(plan) if plan.settings.sandbox != "off" and needs_network(plan) else None
    ours, theirs = socket.socketpair()
    try:
        pid, pidfd = zygote.fork(plan.run_id, theirs)
    except BaseException:
        ours.close()
        if proxy is not None:
            proxy.close()
        raise
    finally:
        theirs.close()
    row.pid = pid
    conn.execute("UPDATE run_progress SET pid = ? WHERE run_id = ?", (pid, plan.run_id))
    # The run's view of its plan: secrets masked, no spec source, no credentials in URLs.
    ours.sendall((json.dumps(run_view(plan).to_json()) + "\n").encode())
    ours.setblocking(False)
    return Launch(plan, row, pid, pidfd, ours, time.monotonic() + plan.deadline_seconds, zygote, proxy)


def _egress_proxy(plan: RunPlan) -> EgressProxy:
    """The run's egress proxy, not serving yet: its model servers (with the credentials the run never
    sees), and its allowed domains when a tool is granted 'network'."""
    hosts = HostRule(tuple(plan.spec.constraints.allowed_domains), plan.settings.enable_remote_tools) \
        if network_tools(plan) else None
    c = plan.spec.constraints
    return EgressProxy(EgressPolicy(frozenset(model_endpoints(plan)), hosts, model_upstream(plan),
                                    frozenset(model_endpoints(plan, tls=True)),
                                    Budget(c.max_model_calls, c.max_tokens), frozenset({plan.settings.port})))


def wait(conn: sqlite3.Connection, launch: Launch, *, kill_grace: float, should_stop: Any = None) -> RunRow:
    """Wait for the run to end (killing it at its deadline, on a stop request, or when it breaks its
    channel); write its final row. Meanwhile, apply what the run reports on its channel, in order."""
    reader = _Channel(conn, launch)
    ended_by: str | None = None
    try:
        ended_by = _watch(conn, launch, reader, should_stop)
    except Exception as exc:  # the database, say: the run must not go on unsupervised
        reader.fault = reader.fault or f"its supervisor failed: {type(exc).__name__}: {exc}"
        ended_by = "fault"
    if ended_by:
        _terminate(launch, kill_grace)
    try:
        reader.drain()
        if reader.fault:  # found in what the run sent before it ended
            ended_by = "fault"
    finally:
        launch.channel.close()
        decisions = launch.proxy.close() if launch.proxy is not None else []
        os.close(launch.pidfd)
        shutil.rmtree(launch.plan.scratch, ignore_errors=True)
    _journal_egress(reader, decisions)
    status = launch.zygote.exit_status(launch.plan.run_id)
    return finish(conn, launch, _result(reader, ended_by, launch, status))


def _watch(conn: sqlite3.Connection, launch: Launch, reader: _Channel, should_stop: Any) -> str | None:
    """Until the run exits (None) or must be ended: why ("fault", "timed_out", "stopped")."""
    while True:
        timeout = max(0.0, min(0.25, launch.deadline - time.monotonic()))
        wake = launch.proxy.wake_fd if launch.proxy else None
        watch = [fd for fd in (launch.channel.fileno(), launch.pidfd, wake) if fd is not None and fd >= 0]
        ready = readable(watch, timeout)
        if launch.proxy and wake in ready:
            _journal_egress(reader, launch.proxy.decisions())
        if launch.channel.fileno() in ready:
            reader.receive()
        if reader.fault:
            return "fault"
        if launch.pidfd in ready:
            return None
        if time.monotonic() >= launch.deadline:
            return "timed_out"
        if _stop_requested(conn, launch.row.run_id) or (should_stop is not None and should_stop()):
            return "stopped"


def _journal_egress(reader: _Channel, decisions: list[dict[str, Any]]) -> None:
    for d in decisions:
        reader.apply({"t": "event", "ts": d.pop("ts"), "kind": "log", "name": "egress",
                      "decision": d.pop("decision"), "detail": d})


class _Channel:
    """The run's side of the story: JSON lines, applied as they arrive; the last one is its result.

    The run's code holds its end of the channel, so anything may come: a line longer than
    MAX_MESSAGE, a line that is not a JSON object, or one that does not apply, is a fault that ends
    the run with the reason on record. The one descriptor it may send is the egress listener, once,
    before the proxy serves (every other is closed unread)."""

    def __init__(self, conn: sqlite3.Connection, launch: Launch) -> None:
        self.conn, self.launch = conn, launch
        self.buf = bytearray()
        self.scanned = 0  # bytes of buf known to hold no newline
        self.result: dict[str, Any] | None = None
        self.fault: str | None = None
        self.count = 0
        self.total = 0
        self.usages = self.tokens = 0
        self.strangers: set[str] = set()
        self.closed = False
        s = launch.plan.settings
        self.log = AgentLog(agent_log_path(s.logs_dir, launch.plan.client_id, launch.plan.agent), launch.plan.run_id)

    def receive(self) -> bool:
        """Read what is there; False when nothing was (the run has sent all, or nothing yet)."""
        if self.closed:
            return False
        try:
            data, fds, _flags, _addr = socket.recv_fds(self.launch.channel, 1 << 16, 1)
        except BlockingIOError:
            return False
        except OSError:
            data, fds = b"", []
        for fd in fds:
            proxy = self.launch.proxy
            if proxy is not None and proxy.listener is None and self.result is None:
                proxy.serve(socket.socket(fileno=fd))
            else:
                os.close(fd)
        if not data:
            self.closed = True
            return False
        self.feed(data)
        return True

    def drain(self) -> None:
        """Everything the run sent before it ended."""
        while not self.fault and self.receive():
            pass

    def feed(self, chunk: bytes) -> None:
        if self.fault:
            return
        self.total += len(chunk)
        if self.total > MAX_BYTES:
            self._broken(f"the run sent more than {MAX_BYTES >> 20} MiB on its channel")
            return
        self.buf += chunk
        while True:
            end = self.buf.find(b"\n", self.scanned)
            if end < 0:
                self.scanned = len(self.buf)
                if len(self.buf) > MAX_MESSAGE:
                    self._broken(f"the run sent a message over {MAX_MESSAGE} bytes on its channel")
                return
            line = bytes(self.buf[:end])
            del self.buf[:end + 1]
            self.scanned = 0
            if len(line) > MAX_MESSAGE:
                self._broken(f"the run sent a message over {MAX_MESSAGE} bytes on its channel")
                return
            if line.strip():
                self._line(line)
            if self.fault:
                return

    def _line(self, line: bytes) -> None:
        self.count += 1
        if self.count > MAX_MESSAGES:
            self._broken(f"the run sent more than {MAX_MESSAGES} messages on its channel")
            return
        try:
            message = json.loads(line)
        except (ValueError, RecursionError):
            self._broken("the run sent a line on its channel that is not JSON")
            return
        try:
            message = checked(message, len(line))
            self._within_spec(message)
        except ValueError as exc:
            self._broken(f"the run sent a message its supervisor refuses: {exc}")
            return
        if message["t"] == "result":
            self.result = message
        elif message["t"] != "egress":
            try:
                self.apply(message)
            except (ValueError, TypeError, KeyError, AttributeError, OverflowError, RecursionError) as exc:
                self._broken(f"the run sent a message its supervisor cannot apply ({type(exc).__name__})")

    def _within_spec(self, message: dict[str, Any]) -> None:
        """What the spec bounds, the run's reports are bounded by: model calls (each reports its
        usage once), tools it does not have (a model may name some; not thousands), and the names
        of the supervisor's own records (the proxy's ``egress``)."""
        spec = self.launch.plan.spec
        if message["t"] == "usage":
            self.usages += 1
            self.tokens += message["input"] + message["output"]
            if self.usages > spec.constraints.max_model_calls:
                raise ValueError(f"usage of more model calls than max_model_calls ({spec.constraints.max_model_calls})")
            budget = spec.constraints.max_tokens
            if budget is not None and self.tokens > 2 * budget + MAX_OVERSHOOT:
                raise ValueError(f"usage far past the token budget ({self.tokens} tokens of {budget})")
        elif message["t"] == "event" and message["kind"] == "tool_call" and \
                message["name"] not in {t.name for t in spec.tools}:
            self.strangers.add(str(message["name"]))
            if len(self.strangers) > MAX_STRANGERS:
                raise ValueError(f"calls of more than {MAX_STRANGERS} tools the agent does not have")
        elif message["t"] == "event" and message["kind"] == "log" and message["name"] is not None and \
                (not message["name"].isascii() or message["name"].strip().lower().startswith("egress")):
            raise ValueError("a log event named like the proxy's own records (egress), or not in plain ASCII")

    def _broken(self, reason: str) -> None:
        self.fault = reason
        self.buf.clear()

    def apply(self, message: dict[str, Any]) -> None:
        apply(self.conn, self.launch.plan.run_id, self.log, message)


EVENT_KINDS = ("llm_call", "tool_call", "memory", "log")  # 'status' rows are the supervisor's alone
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
MAX_COUNT = 2_000_000  # tokens one model call may report (the largest contexts today)
MAX_OVERSHOOT = 100_000  # tokens past twice its budget a run's own loop never reaches


def printable(text: str) -> str:
    """Text with its control characters shown, not obeyed: a log line reaches operators' terminals
    (`agentctl logs`), where an escape sequence could rewrite the screen or the clipboard."""
    return "".join(c if c.isprintable() or c == "\t" else f"\\x{ord(c):02x}" for c in text)


def checked(message: Any, size: int) -> dict[str, Any]:
    """A message from a run, in the shapes the run process sends, or ValueError. The run's code holds
    its channel, so nothing in a message is trusted: kinds and levels come from fixed lists, counts
    are bounded, and times are the supervisor's (a run cannot backdate its record)."""
    if not isinstance(message, dict):
        raise ValueError("not a JSON object")
    kind = message.get("t")
    if kind == "event":
        detail = message.get("detail")
        if message.get("kind") not in EVENT_KINDS:
            raise ValueError(f"an event of kind {str(message.get('kind'))[:40]!r}")
        if message.get("decision") not in (None, "allowed", "denied"):
            raise ValueError("an event with a decision other than allowed or denied")
        if not isinstance(detail, dict) and detail is not None:
            raise ValueError("an event whose detail is not an object")
        name = message.get("name")
        return {"t": "event", "ts": utcnow(), "kind": message["kind"], "decision": message.get("decision"),
                "name": None if name is None else printable(str(name)[:200]),
                "detail": {"truncated": True, "bytes": size} if size > MAX_DETAIL else (detail or {})}
    if kind == "usage":
        counts = [message.get("input"), message.get("output")]
        if not all(type(c) is int and 0 <= c <= MAX_COUNT for c in counts):
            raise ValueError("token counts that are not whole numbers from 0 to 2,000,000")
        return {"t": "usage", "input": counts[0], "output": counts[1]}
    if kind == "log":
        level = message.get("level", "INFO")
        if level not in LOG_LEVELS:
            raise ValueError("a log line of an unknown level")
        return {"t": "log", "level": level, "message": printable(str(message.get("message", ""))[:4000])}
    if kind in ("tool", "egress"):
        return {"t": kind}
    if kind == "result":  # timed_out, stopped, interrupted and skipped are the supervisor's to say
        if message.get("status") not in ("succeeded", "failed", "budget_exceeded"):
            raise ValueError("a result with a status a run cannot end with")
        return message
    raise ValueError(f"a message of type {str(kind)[:40]!r}")


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
    interrupted = {"flag": False}

    def on_signal(_signum: int, _frame: Any) -> None:
        interrupted["flag"] = True

    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)}
    zygote: Zygote | None = None
    try:
        plan = prepare(settings, conn, source, name, input=input, trigger=trigger)
        zygote = Zygote()
        launch = start(conn, plan, requested_by, zygote=zygote)
        row = wait(conn, launch, kill_grace=settings.kill_grace, should_stop=lambda: interrupted["flag"])
        flush(conn, settings.ledger_path)
        return row
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        conn.close()
        if zygote is not None:
            zygote.close()


def request_stop(conn: sqlite3.Connection, client_id: str, agent: str) -> int:
    """Ask every in-flight run of ``agent`` to stop; their launchers do the stopping."""
    cur = conn.execute("UPDATE run_progress SET stop_requested = 1 WHERE client_id = ? AND agent = ? "
                       "AND status IN ('queued', 'running')", (client_id, agent))
    return cur.rowcount


def _result(reader: _Channel, ended_by: str | None, launch: Launch, status: int | None) -> RunResult:
    if ended_by == "fault":
        return RunResult("failed", error=reader.fault)
    if ended_by == "timed_out":
        return RunResult("timed_out", error=f"exceeded max_runtime of {launch.plan.deadline_seconds:g}s")
    if ended_by == "stopped":
        return RunResult("stopped", error="stopped on request")
    data = reader.result
    if data is None or data.get("status") not in TERMINAL:
        return RunResult("failed", error=f"run process died without a result ({_exit_text(status)})")
    return RunResult(str(data["status"]), _text(data.get("output")), _text(data.get("error")))


def _text(value: Any) -> str | None:
    return None if value is None else str(value)[:16000]


def _exit_text(status: int | None) -> str:
    if status is None:
        return "exit status unknown"
    if os.WIFSIGNALED(status):
        return f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
    return f"exit code {os.WEXITSTATUS(status)}"


def _terminate(launch: Launch, grace: float) -> None:
    """SIGTERM to the run's process group, SIGKILL after ``grace``. The group is the run process's
    (it called setsid), and its PID stays reserved until the zygote reaps it, after we see it exit."""
    _signal_group(launch.pid, signal.SIGTERM)
    ready = readable([launch.pidfd], grace)
    if not ready:
        _signal_group(launch.pid, signal.SIGKILL)
        readable([launch.pidfd], 30)


def readable(fds: list[int], timeout: float) -> list[int]:
    """Which of ``fds`` can be read within ``timeout`` seconds. poll, not select: a daemon serving many
    runs holds descriptors past select's 1,024."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return [fd for fd, _event in poller.poll(max(0.0, timeout) * 1000)]


def _signal_group(pid: int, sig: signal.Signals) -> None:
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def _stop_requested(conn: sqlite3.Connection, run_id: str) -> bool:
    row = conn.execute("SELECT stop_requested FROM run_progress WHERE run_id = ?", (run_id,)).fetchone()
    return bool(row and row[0])
