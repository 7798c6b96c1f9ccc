"""The daemon: the one owner of a home's live state. It follows the git source, fires triggers, and
runs agents as supervised processes forked by a zygote (``runner.agent.spawning``).

Who owns what. The daemon holds the home's lock (``owning``: one daemon per home) and owns what is
live: the process table (runs queued and in flight), the armed triggers, the control sockets, the API.
The applied state in ``state.sqlite`` is shared: any process may apply (``agentctl apply``, an API
write, a push, the daemon's own poll), and every apply bumps the client's generation of applied agents
in its own transaction. The daemon follows that generation a few times a second and re-arms the
client's schedules and watches from the applied state when it moves: one mechanism, whoever applied.

Start order matters: the home's lock first, before anything of the home is touched (a second daemon
leaves at once, with the first one's pid and API address). Then per client: the process table (its
zygote is exec'd, so our threads do not leak into it), the sweep of runs a previous daemon left
(running ones become interrupted, queued ones go back on the queue), the first reconcile, the
triggers (catch-up of missed slots is decided then, from trigger_state, before anything else arms the
schedule), the control socket. Then the API (its address goes into the lock file), the flusher and the
follower. Stop order is the reverse: triggers stop firing, the control sockets and the API close, the
process tables give runs in flight their grace and then stop them, the ledger is flushed, the lock is
dropped (the kernel drops it too, however the process ends).

Between reconciles the loop waits for the next poll (sync_interval with jitter) or a reconcile
request (the post-receive hook or the webhook touches a file). A source that cannot be read keeps the
last good state: a transient failure (a fetch, a full disk) is retried after the delay the error
carries, a permanent one (a ref or folder that is not there) with exponential backoff, never in a hot
loop.
"""

from __future__ import annotations

import json
import logging
import os
import random
import signal
import sqlite3
import threading
import time
from collections.abc import Callable
from datetime import datetime
from types import FrameType
from typing import Any

from runner.agent.launching import no_agent
from runner.agent.recording import RunRow, end_in_flight
from runner.errors import OrchestratorError, PermanentError, SourceError, StorageFullError, TransientError, UsageError
from runner.ledger import reading
from runner.ledger.ingesting import checkpoint, flush, retry_rejected
from runner.reconcile.applied import (
    AppliedAgent,
    applied_generations,
    load_applied,
    set_suspended,
    set_trigger_condition,
)
from runner.reconcile.reconciling import open_source, reconcile
from runner.sandbox import capabilities, egress
from runner.scale import shared_executor
from runner.settings import Settings, client_ids, shadowed_environment
from runner.source.git import GitSource
from runner.source.hooks import reconcile_request_path
from runner.specs.models import AgentSpec
from runner.state import PerThread, connect
from runner.supervise import workflow_ops
from runner.supervise.control import ControlServer, socket_path
from runner.supervise.events import OPS as EVENT_OPS
from runner.supervise.events import Events, Received
from runner.supervise.logfile import setup_logging
from runner.supervise.metrics import Metrics
from runner.supervise.owning import HomeLock
from runner.supervise.recovery import sweep
from runner.supervise.runtime import Runtime
from runner.supervise.table import ProcessTable, Request
from runner.supervise.triggers import Scheduler, Watcher
from runner.supervise.workflows import WorkflowEngine

log = logging.getLogger("runner.daemon")
# Builds the WSGI app from the runtimes and metrics; the entry point (runner.__main__) hands in
# runner.api.app.create_app (the API is a layer above supervision, so the daemon is handed it rather than
# importing it).
AppFactory = Callable[[dict[str, Runtime], Metrics], Any]
MAX_BACKOFF = 300.0
API_MAX_BODY = 2 << 20  # bytes waitress reads of a body; the app answers past its own 1 MiB (MAX_BODY) in JSON
FOLLOW_INTERVAL = 0.2  # seconds between two reads of the applied generations: a re-arm lags an apply by about this


class Daemon:
    """One process serving one or more clients: a ClientDaemon each, one API, one ledger flusher.

    The clients are the one chosen with --client-id (default 'default') and every client named in the
    settings file's ``clients`` section. Each has its own source, process table (MAX_AGENTS is per
    client), triggers and control socket; they share the home's state database and ledger.
    """

    def __init__(self, settings: Settings, app_factory: AppFactory | None = None) -> None:
        self.lock = HomeLock(settings.home).acquire()  # first: DaemonRunningError while another daemon holds it
        reading.KEEP_READER = True  # the ledger's one writer: its reads keep a connection (it drops it to flush)
        reading.create_empty(settings.ledger_path)  # readers (duckdb -readonly) find its tables from the start
        self.settings = settings
        self.app_factory = app_factory
        self.stopping = threading.Event()
        self.signals = 0
        ids = [settings.client_id, *(c for c in client_ids(settings.home) if c != settings.client_id)]
        self.clients = [ClientDaemon(settings if cid == settings.client_id else
                                     Settings.load(settings.home, cid, host=settings.host, port=settings.port),
                                     self.stopping) for cid in ids]

    def run(self) -> None:
        # Ray's executor is the daemon's, shared by its clients; None: each client's table runs runs locally.
        # Joined first: Ray installs signal handlers of its own, which ours replace just below.
        self.executor = shared_executor(self.settings)
        if self.executor is not None:
            log.info("executor ray: cluster at %s, %d live node(s)", self.settings.ray_address,
                     len(self.executor.cluster()["nodes"]))
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        caps = capabilities.detect()
        log.info("sandbox %s: files %s, network %s, processes %s, scoping %s, namespaces %s",
                 self.settings.sandbox, caps["filesystem"], caps["network"], caps["process_limit"], caps["scoping"],
                 ", ".join(caps["namespaces"]) or "none")
        if (caps["landlock_abi"] == 0 or "net" not in caps["namespaces"]) and self.settings.sandbox == "strict":
            log.warning("this kernel lacks %s: runs will be refused (AGENT_ORCH_SANDBOX=permissive runs them "
                        "without; see docs/security.md)",
                        "Landlock" if caps["landlock_abi"] == 0 else "namespaces for runs")
        for line in (shadowed for c in self.clients for shadowed in shadowed_environment(c.settings)):
            log.warning("%s", line)  # a client's section of the settings file wins over the environment
        for client in self.clients:
            client.executor = self.executor
            client.start()
        if self.executor is not None:
            self.executor.settle()  # what the clients did not follow again is stopped on its node
        runtimes: dict[str, Runtime] = {c.settings.client_id: c.runtime for c in self.clients}
        self.metrics = Metrics(runtimes)
        for client in self.clients:
            client.attach(self.metrics)
        s = self.settings
        self.api: ApiServer | None = None
        if self.app_factory is not None:
            self.api = ApiServer(self.app_factory(runtimes, self.metrics), s.host, s.port)
            address = f"[{s.host}]:{self.api.port}" if ":" in s.host else f"{s.host}:{self.api.port}"
            for client in self.clients:
                client.api_address = address
            log.info("API on http://%s/agents/v1 (health: /healthz)", address)
        retry_rejected(self.clients[0].conn)
        flusher = threading.Thread(target=self._flush_loop, name="flusher", daemon=True)
        flusher.start()
        threading.Thread(target=self._follow_loop, name="follower", daemon=True).start()
        loops = [threading.Thread(target=c.loop, name=f"reconcile-{c.settings.client_id}", daemon=True)
                 for c in self.clients]
        for t in loops:
            t.start()
        # One record: the API's address and that the daemon is ready (`agentctl run` waits for this before it runs
        # anything in the foreground).
        self.lock.record(ready=True, **({"api": self.clients[0].api_address} if self.api is not None else {}))
        log.info("ready: client(s) %s", ", ".join(runtimes))
        while not self.stopping.wait(0.5):
            pass
        for client in self.clients:
            client.stop_triggers()
        if self.api is not None:
            self.api.close()
        for client in self.clients:
            client.shutdown(now=self.signals > 1)
        if self.executor is not None:
            self.executor.close()
        flush(self.clients[0].conn, s.ledger_path, wait=True, observe=self.metrics.observe_row)
        checkpoint(s.ledger_path)
        log.info("stopped")
        self.lock.release()

    def _flush_loop(self) -> None:
        conn = connect(self.settings.state_path)
        while not self.stopping.wait(self.settings.flush_interval):
            try:
                flush(conn, self.settings.ledger_path, observe=self.metrics.observe_row)
            except Exception as exc:  # the ledger must never take the daemon down; rows wait in the journal
                log.error("ledger flush failed: %s", exc)

    def _follow_loop(self) -> None:
        """Re-arm a client's triggers when its applied agents changed, whichever process changed them."""
        conn = connect(self.settings.state_path)
        while not self.stopping.wait(FOLLOW_INTERVAL):
            try:
                generations = applied_generations(conn)
                for client in self.clients:
                    if generations.get(client.settings.client_id, 0) != client.armed_generation:
                        client.refresh_triggers()
                    client.table.stop_requested()
            except Exception as exc:  # a locked or full database must not end the following: try again
                log.error("re-arming triggers failed: %s", exc)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.signals += 1
        log.info("received %s, stopping", signal.Signals(signum).name)
        self.stopping.set()
        if self.signals > 1:
            log.warning("second signal: stopping runs in flight now")
            for client in self.clients:
                client.stop_all("the daemon was told to stop twice")


class ClientDaemon:
    def __init__(self, settings: Settings, stopping: threading.Event) -> None:
        self.settings = settings
        self.stopping = stopping
        self.metrics: Metrics | None = None
        self._conns = PerThread(settings.state_path)
        self.source = open_source(settings)
        self._request = reconcile_request_path(settings)
        self._request_mtime = self._mtime()
        self._failures = 0
        self._request_now = threading.Event()
        self._arming = threading.Lock()
        self.armed_generation = -1  # the generation of applied agents the triggers were last armed from
        self._first_wait = settings.sync_interval
        self._armed_agents: set[str] = set()
        self._armed_workflows: set[str] = set()
        self.api_address: str | None = None
        self.executor: Any = None  # the daemon's shared executor (Ray's), or None for a local one of its own

    @property
    def conn(self) -> sqlite3.Connection:
        return self._conns.get()

    def start(self) -> None:
        s = self.settings
        log.info("starting: source %s, client %s, home %s", self.source.location.describe(), s.client_id, s.home)
        self.table = ProcessTable(s, open_source(s), executor=self.executor)
        self.workflows = WorkflowEngine(s, self.table)
        self.events = Events(s, self.table, self.workflows)
        self.table.on_run_end = self._run_ended
        self.workflows.on_end = lambda row, output: self.events.ended(
            "workflow", row["workflow"], row["workflow_run_id"], row["status"], output, int(row["chain_depth"] or 0))
        left = sweep(self.conn, s.client_id, s.home / "scratch" / s.client_id)
        if left.interrupted:
            log.warning("marked %d run(s) interrupted (in flight when the last daemon stopped): %s",
                        len(left.interrupted), ", ".join(r["run_id"] for r in left.interrupted))
        self._first_wait = self.reconcile_once("daemon:start")
        for row in left.remote:
            if self.table.reattach(row):
                continue
            # It waited for a node (the record may not say so yet: the daemon died before writing it down)
            # and no node has it: nothing of it ran, it was never placed, nothing of it is on record.
            if row["status"] == "queued" or (not row["pid"] and not row["seq"]):
                left.queued.append(row)
                continue
            end_in_flight(self.conn, row, "interrupted", "the daemon died while the run was in flight, and no node "
                          "has it now")
            log.warning("run %s: no node has it now: interrupted", row["run_id"])
            left.interrupted.append(row)
        steps = [r for r in left.queued if r["row"] and json.loads(r["row"]).get("workflow_run_id")]
        left.queued = [r for r in left.queued if r not in steps]
        if left.queued:
            log.warning("put %d run(s) back on the queue (queued, not started, when the last daemon stopped): %s",
                        len(left.queued), ", ".join(r["run_id"] for r in left.queued))
        for row in left.queued:
            self.table.requeue(row)
        for row in left.interrupted:
            self.table.interrupted(row)  # queues its retry, if its spec asks for one
        self.workflows.recover(steps)  # a workflow's step runs go back to their steps
        self.events.recover()  # deliveries accepted, not started, when the last daemon stopped
        # The triggers are armed only now, after the first reconcile: the catch-up of missed slots must see an
        # empty schedule, whatever the reconcile applied.
        self.scheduler = Scheduler(lambda: self.conn, s.client_id, self.submit)
        self.watcher = Watcher(self.submit, on_waiting=self.sync_waiting)
        self.refresh_triggers(catch_up=True)
        self.control = ControlServer(socket_path(s.home, s.client_id), self.handle)
        self.runtime = DaemonRuntime(self)
        log.info("client %s ready: %d agent(s), MAX_AGENTS=%d", s.client_id, len(self.applied_specs()),
                 s.max_agents)

    def attach(self, metrics: Metrics) -> None:
        self.metrics = metrics
        self.table.on_dispatch = metrics.dispatch.labels(self.settings.client_id).observe
        self.scheduler.on_lag = metrics.trigger_lag.labels(self.settings.client_id).observe
        self.workflows.on_step_end = lambda workflow, seconds: metrics.step_seconds.labels(
            self.settings.client_id, workflow).observe(seconds)
        self.events.on_refused = lambda why: metrics.webhook_refused.labels(self.settings.client_id, why).inc()
        self.events.on_decided = lambda trigger, decision: metrics.deliveries.labels(
            self.settings.client_id, trigger, decision).inc()

    def loop(self) -> None:
        delay = self._first_wait  # the poll interval, or what the first reconcile's failure asked for
        while not self.stopping.is_set():
            if self._wait(delay):
                delay = self.reconcile_once("daemon:request")
            elif not self.stopping.is_set():
                delay = self.reconcile_once("daemon:poll")

    # -- reconcile ----------------------------------------------------------------------------------

    def reconcile_once(self, initiator: str) -> float:
        """Reconcile; returns how long to wait before the next poll.

        A failure keeps the last good state and says when the next try is. The error's class decides
        that: a transient one (a fetch that failed, a full disk) carries the wait it needs, and it is
        honoured as given (within 1 s and MAX_BACKOFF: never a hot loop); a permanent one (a ref or
        folder not there) will fail the same way until someone fixes the source, so it is tried again
        with exponential backoff; anything else is a bug, logged with its traceback, and backed off too.
        """
        started = time.perf_counter()
        try:
            plan, outcome = reconcile(self.settings, self.conn, self.source, initiator=initiator, archive=False)
        except Exception as exc:  # nothing a reconcile raises may take the daemon down
            self._failures += 1
            backoff = min(MAX_BACKOFF, 2.0 ** self._failures)
            full = StorageFullError.of(exc)  # SQLite, DuckDB or the OS out of space, said as ours
            transient = full or (exc if isinstance(exc, TransientError) else None)
            if transient is not None:
                wait = min(MAX_BACKOFF, max(1.0, transient.delay))
                what = f"reconcile failed, the disk holding the home is full ({full.details[0]})" if full \
                    else transient.message
                log.warning("transient: %s; keeping the last good state, retry in %gs", what, wait)
                return wait
            if isinstance(exc, (PermanentError, SourceError)):
                log.warning("permanent: %s; keeping the last good state: fix the source; next try in %gs",
                            exc.message, backoff)
            else:
                log.exception("reconcile failed (%s); retry in %.0fs", exc, backoff)
            return backoff
        self._failures = 0
        if self.metrics is not None:
            self.metrics.reconcile_seconds.labels(self.settings.client_id).observe(time.perf_counter() - started)
        if plan.refused:
            log.error("reconcile refused: %s", plan.refused)
        for change in plan.changes:
            log.info("%s", change)
        if outcome and plan.changes:
            log.info("applied %s: %d created, %d updated, %d deleted, %d invalid", plan.revision[:12],
                     outcome.created, outcome.updated, outcome.deleted, outcome.invalid)
            if hasattr(self, "scheduler"):
                self.refresh_triggers()
        interval = self.settings.sync_interval
        return interval + random.uniform(0, interval / 10)

    def applied_specs(self, *, runnable: bool = False) -> dict[str, Any]:
        out = {}
        for name, agent in load_applied(self.conn, self.settings.client_id).items():
            spec = agent.spec
            if spec is None or (runnable and (agent.suspended or not spec.enabled)):
                continue
            out[name] = spec
        return out

    def refresh_triggers(self, *, catch_up: bool = False) -> None:
        """Arm schedules and watches from the applied state as it is now; stop the runs of deleted agents.

        Called after any change of the applied agents (the follower sees their generation move), and at
        once by whoever changed them in this process. The generation is read first: a change that lands
        while this runs moves it again, and the follower comes back.
        """
        with self._arming:
            cid = self.settings.client_id
            generation = applied_generations(self.conn).get(cid, 0)
            applied = load_applied(self.conn, cid)
            present = {name for name, a in applied.items() if a.spec_json is not None}
            for name in sorted(self._armed_agents - present):
                self.table.stop_agent(name, "agent deleted from the source")
            agents: dict[str, Any] = {name: spec for name, a in applied.items() if (spec := _runnable(a)) is not None}
            flows = {name: a.workflow for name, a in load_applied(self.conn, cid, kind="workflow").items()
                     if a.workflow is not None and a.workflow.enabled and not a.suspended}
            self._armed_workflows = set(flows)
            agents.update(flows)  # triggers work alike for both: only their runs differ (``submit``)
            self.scheduler.update(agents, catch_up=catch_up)
            self.events.update(agents)
            s = self.settings
            self.watcher.update(agents, lambda name: {"CLIENT_ID": s.client_id, "AGENT_NAME": name,
                                                      "AGENT_ORCH_HOME": str(s.home)})
            if generation != self.armed_generation:
                log.info("triggers armed from generation %d of the applied agents: %d schedule(s), %d watch(es)",
                         generation, len(self.scheduler.heap), len(self.watcher.watches))
            self._armed_agents, self.armed_generation = present, generation
            self._sync_waiting(applied)

    def sync_waiting(self) -> None:
        """Say in each agent's status which watched folders it waits for (the watcher saw one come or go)."""
        with self._arming:
            self._sync_waiting(load_applied(self.conn, self.settings.client_id))

    def _sync_waiting(self, applied: dict[str, AppliedAgent]) -> None:
        waiting = self.watcher.waiting()
        for name, agent in applied.items():
            want = "; ".join(f"waiting for {path} to exist" for path in waiting.get(name, [])) or None
            have = agent.condition("Triggered")
            if want != (have.get("message") if have.get("status") == "False" else None):
                set_trigger_condition(self.conn, self.settings.client_id, name, waiting.get(name, []))

    # -- runs ---------------------------------------------------------------------------------------

    def submit(self, agent: str, *, trigger: str, input: str | None = None, requested_by: str | None = None,
               overlap: str | None = None) -> Any:
        """A run of ``agent`` (a trigger's, or a user's); a trigger of a workflow starts a run of the workflow."""
        if agent in self._armed_workflows:
            try:
                return self.workflows.start(agent, {}, trigger=trigger, requested_by=requested_by or trigger)
            except OrchestratorError as exc:
                log.warning("workflow %s: its %s trigger could not start it: %s", agent, trigger, exc.message)
                return None
        return self.table.submit(agent, trigger=trigger, input=input, requested_by=requested_by, overlap=overlap)

    def _run_ended(self, request: Request, row: RunRow) -> None:
        """A run's end fires run_completed triggers (a step's or a callee's: its workflow's or caller's end does)."""
        if request.workflow_run_id is None and request.links.parent_run_id is None:
            self.events.ended("agent", request.agent, request.run_id, row.status, row.output, request.links.chain_depth)

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """The control socket's requests: ping, run, start, stop, reconcile."""
        op, agent = request.get("op"), request.get("agent")
        client = self.settings.client_id
        if op == "ping":
            cluster = self.executor.cluster() if self.executor is not None else None
            return {"ok": True, "pid": os.getpid(), **self.table.in_flight(), "armed_generation": self.armed_generation,
                    **({"api": self.api_address} if self.api_address else {}),
                    **({"cluster": cluster} if cluster is not None else {})}
        if op == "reconcile":
            self._request_now.set()
            return {"ok": True}
        if op in workflow_ops.OPS:
            return workflow_ops.handle(self.workflows, request)
        if op in EVENT_OPS:
            return self.events.handle(request)
        applied = load_applied(self.conn, client, agent) if isinstance(agent, str) else {}
        if not isinstance(agent, str) or agent not in applied:
            hint = " (run 'agentctl apply')" if op == "run" else ""  # as agentctl says it without a daemon
            return {"ok": False, "code": "not_found", "error": no_agent(self.conn, client, str(agent), hint).message}
        if op == "stop":
            set_suspended(self.conn, client, agent, True)
            stopping = self.table.stop_agent(agent, "stopped on request")
            self.refresh_triggers()
            return {"ok": True, "stopping_runs": stopping}
        if op == "run" and applied[agent].suspended:  # as agentctl refuses it without a daemon
            return {"ok": False, "code": "suspended",
                    "error": f"agent '{agent}' is suspended: 'agentctl start {agent}' resumes it"}
        if op in ("run", "start"):
            if op == "start":
                set_suspended(self.conn, client, agent, False)
                self.refresh_triggers()
            req = self.submit(agent, trigger="manual", input=request.get("input"),
                              requested_by=request.get("requested_by", "cli"), overlap="queue")
            if not request.get("wait", True):
                return {"ok": True, "run_id": req.run_id, "status": req.status}
            req.done.wait()
            final = req.row.as_ledger() if req.row is not None else {}
            return {"ok": True, **final, "run_id": req.run_id, "status": req.status}
        return {"ok": False, "code": "usage", "error": f"unknown op {op!r}"}

    # -- loop helpers -------------------------------------------------------------------------------

    def _wait(self, seconds: float) -> bool:
        """Wait for the next poll; True when a reconcile was requested instead."""
        deadline = time.monotonic() + seconds
        while not self.stopping.is_set() and time.monotonic() < deadline:
            mtime = self._mtime()
            if mtime != self._request_mtime or self._request_now.is_set():
                self._request_mtime = mtime
                self._request_now.clear()
                log.info("reconcile requested")
                return True
            self.stopping.wait(0.1)
        return False

    def _mtime(self) -> float:
        try:
            return self._request.stat().st_mtime_ns / 1e9
        except OSError:
            return 0.0

    def stop_all(self, reason: str) -> None:
        for agent in {r.agent for r in list(self.table.running.values())}:
            self.table.stop_agent(agent, reason)

    def stop_triggers(self) -> None:
        self.scheduler.stop()
        self.watcher.stop()
        self.control.close()

    def shutdown(self, *, now: bool) -> None:
        s = self.settings
        self.workflows.detach()  # what the table's stop does to step runs is for the next start to take up
        self.table.shutdown(grace=0 if now else s.shutdown_grace, kill_grace=s.kill_grace)
        self.workflows.park()
        self.events.close()


def _runnable(agent: AppliedAgent) -> AgentSpec | None:
    """The agent's spec when its triggers should fire (a valid spec, enabled, not suspended), else None."""
    spec = agent.spec
    return None if spec is None or agent.suspended or not spec.enabled else spec


class DaemonRuntime:
    """The daemon as the API sees one client (runner.supervise.runtime.Runtime)."""

    def __init__(self, daemon: ClientDaemon) -> None:
        self.daemon = daemon
        self._local = threading.local()
        self.started = time.time()

    @property
    def settings(self) -> Settings:
        return self.daemon.settings

    @property
    def source(self) -> GitSource:
        if not hasattr(self._local, "source"):  # GitPython's object reader is not shared across threads
            self._local.source = open_source(self.settings)
        source: GitSource = self._local.source
        return source

    def conn(self) -> sqlite3.Connection:
        return self.daemon.conn

    def submit_run(self, agent: str, input: str | None, requested_by: str, trigger: str = "manual") -> str:
        run_id: str = self.daemon.submit(agent, trigger=trigger, input=input, requested_by=requested_by,
                                         overlap="queue").run_id
        return run_id

    def stop_run(self, run_id: str, requested_by: str) -> bool:
        """Stop one run, queued or running here; False when it is neither (ended, or not this client's)."""
        return bool(self.daemon.table.stop_run(run_id, f"stopped by {requested_by}"))

    def start_agent(self, agent: str, requested_by: str) -> str:
        set_suspended(self.conn(), self.settings.client_id, agent, False)
        self.daemon.refresh_triggers()
        return self.submit_run(agent, None, requested_by)

    def stop_agent(self, agent: str, requested_by: str) -> int:
        set_suspended(self.conn(), self.settings.client_id, agent, True)
        stopping = self.daemon.table.stop_agent(agent, f"stopped by {requested_by}")
        self.daemon.refresh_triggers()
        return stopping

    def start_workflow(self, name: str, inputs: dict[str, Any], requested_by: str, trigger: str = "manual") -> str:
        return self.daemon.workflows.start(name, inputs, trigger=trigger, requested_by=requested_by)

    def cancel_workflow(self, workflow_run_id: str, requested_by: str) -> dict[str, Any]:
        return self.daemon.workflows.cancel(workflow_run_id, requested_by)

    def resume_workflow(self, workflow_run_id: str, from_step: str | None, at_head: bool,
                        requested_by: str) -> dict[str, Any]:
        return self.daemon.workflows.resume(workflow_run_id, from_step, at_head, requested_by)

    def approve_step(self, workflow_run_id: str, step: str, approve: bool, comment: str | None,
                     requested_by: str) -> dict[str, Any]:
        return self.daemon.workflows.approve(workflow_run_id, step, approve, comment, requested_by)

    def webhook(self, *request: Any) -> Received:  # (segment, header, headers, body): Runtime.webhook
        return self.daemon.events.webhook(*request)

    def replay_delivery(self, delivery_id: str, requested_by: str) -> dict[str, Any]:
        return self.daemon.events.replay(delivery_id, requested_by).as_json()

    def request_reconcile(self, initiator: str) -> None:
        self.daemon._request_now.set()

    def next_runs(self) -> dict[str, datetime]:
        return self.daemon.scheduler.next_runs()

    def in_flight(self) -> dict[str, int]:
        return self.daemon.table.in_flight()

    def health(self) -> dict[str, Any]:
        row = self.conn().execute("SELECT * FROM sources WHERE client_id = ?", (self.settings.client_id,)).fetchone()
        source = dict(row) if row else {}
        agents = self.conn().execute("SELECT count(*) FROM agents WHERE client_id = ? AND spec IS NOT NULL "
                                     "AND kind = 'agent'", (self.settings.client_id,)).fetchone()[0]
        cluster = self.daemon.executor.cluster() if getattr(self.daemon.executor, "cluster", None) else None
        return {"sandbox": {"mode": self.settings.sandbox, **capabilities.detect()},
                **({"cluster": cluster} if cluster is not None else {}),
                "source": source.get("location"), "revision": source.get("revision"),
                "reconciled_at": source.get("reconciled_at"), "error": source.get("error"), "agents": agents,
                "uptime_seconds": round(time.time() - self.started, 1), **self.in_flight()}


class ApiServer:
    """waitress serving the Falcon app in a thread of the daemon."""

    def __init__(self, app: Any, host: str, port: int) -> None:
        from waitress.server import create_server

        # poll, not select: the daemon may hold more than 1,024 descriptors (runs' channels and proxies)
        try:
            # channel_request_lookahead: a client that leaves an event stream is seen at once, not at the
            # stream's next write
            # Streams (8 at most) and blocking A2A calls (6) hold 14 of 24 threads; a body past the limit is refused
            self.server = create_server(app, host=host, port=port, threads=24, ident="agent-orchestrator",
                                        clear_untrusted_proxy_headers=True, asyncore_use_poll=True,
                                        channel_request_lookahead=1, max_request_body_size=API_MAX_BODY)
        except OSError as exc:
            raise UsageError(f"the API cannot listen on {host}:{port}: {exc.strerror or exc} (another program "
                             "holds it? choose another with --port or AGENT_ORCH_PORT)") from None
        self.port = int(self.server.effective_port)
        egress.CONTROL_PLANE.add(self.port)  # runs may not reach their own control plane, "local" or not
        self.thread = threading.Thread(target=self.server.run, name="api", daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.close()


__all__ = ["Daemon", "setup_logging"]
