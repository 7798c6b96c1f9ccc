"""The process table: runs queued and in flight, at most MAX_AGENTS at once, in arrival order.

``submit`` applies the agent's overlap policy (forbid: a ``skipped`` run on record; queue: wait;
replace: stop the runs in flight, then wait) and records the run as ``queued``. A dispatcher thread
takes requests in order while fewer than MAX_AGENTS run, prepares each plan (the spec at its applied
revision) and submits it to the executor (``runner.agent.executor``: local by default) with a
``RunRecord`` as its watcher, which records what the run reports and its end.

A run an agent asks as a tool (``runner.supervise.calling``: its ``parent_run_id`` is the caller) is
handed off at once, with the spec its caller narrowed (``Request.spec``): it takes no MAX_AGENTS slot
(its caller holds one and waits for it) and runs beside other runs of its agent.

A run's end is handled in one place (``_ended``, once its final row is durable, or ``_record`` for a
run that never started): the slot is freed, the runs it asked as tools and that still run are stopped,
and when the agent opted into retries (``retry: {limit, backoff, on}``) and the run was started by a
trigger and ended in one of the ``on`` states, a new run is queued, ``backoff`` seconds later, whose
``retry_of`` is the run that ended. Such a run waits in
the queue like any other (so a kill -9 during its backoff keeps it), but is not handed off before its
time.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from runner.agent.asking import Asks
from runner.agent.executor import Executor
from runner.agent.launching import prepare, start
from runner.agent.local import LocalExecutor
from runner.agent.recording import (
    NO_LINKS,
    Links,
    LiveWriter,
    RunRecord,
    RunRow,
    new_run_id,
    stops_requested,
    write_run,
)
from runner.errors import OrchestratorError
from runner.reconcile.applied import load_applied
from runner.settings import Settings
from runner.source.git import GitSource
from runner.specs.models import AgentSpec
from runner.state import PerThread
from runner.supervise.calling import Calls
from runner.times import utcnow

log = logging.getLogger("runner.supervise")
RETRIABLE = ("failed", "timed_out", "interrupted")  # the states a spec's retry.on may name


@dataclass
class Request:
    run_id: str
    agent: str
    trigger: str
    input: str | None
    requested_by: str | None
    queued_at: str
    submitted: float = field(default_factory=time.monotonic)
    done: threading.Event = field(default_factory=threading.Event)
    status: str = "queued"
    retry_of: str | None = None  # the run this one retries
    attempt: int = 1  # 1, then 2 for its first retry, ...
    not_before: float = 0.0  # monotonic time before which it is not handed off (a retry's backoff)
    row: RunRow | None = None  # its final row, once it ended
    workflow_run_id: str | None = None  # a workflow's step: runs beside other runs of its agent
    step: str | None = None
    limits: dict[str, float] | None = None  # constraints narrowed for this run (a workflow's time and tokens left)
    on_end: Callable[[Request, RunRow], None] | None = None  # told once the final row is durable
    record: RunRecord | None = None  # once its executor has it
    stop_wanted: tuple[str, str] | None = None  # a stop asked before its executor had it: (status, reason)
    links: Links = field(default_factory=Links)  # the run that asked it, or whose end triggered it
    spec: AgentSpec | None = None  # an agent asked as a tool: its spec, narrowed to its caller's

    @property
    def called(self) -> bool:
        """Asked as a tool by a run (which holds a slot and waits for it)."""
        return self.links.parent_run_id is not None

    @property
    def concurrent(self) -> bool:
        """One run of an agent at a time holds for runs its triggers and users start, not for workflow steps
        nor for agents asked as tools."""
        return self.workflow_run_id is not None or self.called


class ProcessTable:
    def __init__(self, settings: Settings, source: GitSource, executor: Executor | None = None) -> None:
        self.settings, self.source = settings, source
        self.cond = threading.Condition()
        self.queue: deque[Request] = deque()
        self.running: dict[str, Request] = {}
        self.accepting = True
        self.peak = 0  # most runs in flight at once (tests and metrics read it)
        self.dispatched = 0
        self.latencies: deque[float] = deque(maxlen=1000)  # trigger to hand-off, seconds
        self._conns = PerThread(settings.state_path)
        self.on_dispatch: Callable[[float], None] | None = None
        self.on_run_end: Callable[[Request, RunRow], None] | None = None  # any run's end, once its row is durable
        self.owns_executor = executor is None  # a shared one (Ray's) is closed by the daemon
        self.executor: Executor = executor or LocalExecutor(settings.kill_grace)
        self.writer = LiveWriter(settings.state_path)
        self.calls = Calls(self)
        self.asks = Asks(self.executor, agents=self.calls.ask)
        self.dispatcher = threading.Thread(target=self._dispatch_loop, name="dispatcher", daemon=True)
        self.dispatcher.start()

    @property
    def conn(self) -> sqlite3.Connection:
        return self._conns.get()

    # -- submitting ---------------------------------------------------------------------------------

    def submit(self, agent: str, *, trigger: str, input: str | None = None, requested_by: str | None = None,
               overlap: str | None = None, retry_of: str | None = None, attempt: int = 1,
               delay: float = 0.0, step: tuple[str, str] | None = None, limits: dict[str, float] | None = None,
               on_end: Callable[[Request, RunRow], None] | None = None, run_id: str | None = None,
               links: Links = NO_LINKS, spec: AgentSpec | None = None) -> Request:
        """Queue a run of ``agent`` (or record it skipped, per its overlap policy). ``step``: (workflow run id,
        step id) of a workflow's step, which runs beside other runs of its agent with ``limits``. ``spec``:
        the spec it runs with instead of the applied one (an agent asked as a tool, narrowed)."""
        request = Request(run_id or new_run_id(), agent, trigger, input, requested_by, utcnow(), retry_of=retry_of,
                          attempt=attempt, not_before=time.monotonic() + delay,
                          workflow_run_id=step[0] if step else None, step=step[1] if step else None,
                          limits=limits, on_end=on_end, links=links, spec=spec)
        with self.cond:
            if not self.accepting:
                return self._record(request, "skipped", "the daemon is shutting down")
            policy = "queue" if request.concurrent else overlap or self._overlap(agent)
            busy = [r for r in [*self.running.values(), *self.queue] if r.agent == agent and not r.concurrent]
            if busy and policy == "forbid":
                return self._record(request, "skipped", f"overlap policy forbid: run {busy[0].run_id} in flight")
            if busy and policy == "replace":
                for old in [r for r in self.queue if r.agent == agent]:
                    self.queue.remove(old)
                    self._record(old, "stopped", f"replaced by run {request.run_id}")
                for old in [r for r in self.running.values() if r.agent == agent]:
                    self.stop_run(old.run_id, f"replaced by run {request.run_id}")
            write_run(self.conn, RunRow(request.run_id, self.settings.client_id, agent, None, trigger, "queued",
                                        queued_at=request.queued_at, input=input, requested_by=requested_by,
                                        retry_of=retry_of, attempt=attempt, workflow_run_id=request.workflow_run_id,
                                        step=request.step, **links.fields()))
            if retry_of is not None:
                self.conn.execute("UPDATE run_progress SET retry_of = ? WHERE run_id = ?", (retry_of, request.run_id))
            self.queue.append(request)
            self.cond.notify_all()
        return request

    def requeue(self, progress_row: Any) -> Request:
        """Put back on the queue a run a previous daemon had queued but not started when it died (same run id;
        nothing of it ran). From now on this daemon is its launcher."""
        data = json.loads(progress_row["row"]) if progress_row["row"] else {}
        request = Request(progress_row["run_id"], progress_row["agent"], data.get("trigger") or "unknown",
                          data.get("input"), data.get("requested_by"), data.get("queued_at") or utcnow(),
                          retry_of=progress_row["retry_of"], attempt=int(data.get("attempt") or 1),
                          links=Links.of(data))
        if request.called:  # its caller died with that daemon, and its narrowed spec with it: it never runs
            with self.cond:
                return self._record(request, "interrupted", "the daemon died before this agent asked as a tool "
                                    "started; its caller was interrupted")
        with self.cond:
            self.conn.execute("UPDATE run_progress SET launcher_pid = ? WHERE run_id = ?",
                              (os.getpid(), request.run_id))
            self.queue.append(request)
            self.cond.notify_all()
        return request

    def _overlap(self, agent: str) -> str:
        applied = load_applied(self.conn, self.settings.client_id, agent).get(agent)
        spec = applied.spec_dict if applied else None
        return str(spec.get("overlap", "forbid")) if spec else "forbid"

    def _record(self, request: Request, status: str, error: str) -> Request:
        stamp = utcnow()
        row = RunRow(request.run_id, self.settings.client_id, request.agent, None, request.trigger, status,
                     queued_at=request.queued_at, ended_at=stamp, error=error, input=request.input,
                     requested_by=request.requested_by, retry_of=request.retry_of, attempt=request.attempt,
                     workflow_run_id=request.workflow_run_id, step=request.step, **request.links.fields())
        write_run(self.conn, row)
        request.status, request.row = status, row
        request.done.set()
        log.info("run %s of %s %s: %s", request.run_id, request.agent, status, error)
        if request.on_end is not None:
            request.on_end(request, row)
        return request

    def reattach(self, progress_row: Any) -> bool:
        """Follow again a run a previous daemon left in flight on a cluster node, when its node still has it
        (its story is read again from the first message; what is on record is not written twice). False:
        nobody has it, and the caller ends it interrupted (its node, told nobody follows it, stops it).

        An agent asked as a tool (``parent_run_id``) is never followed again: its narrowed spec and its
        caller's links died with that daemon, and prepared again it would go on with its full spec. It ends
        interrupted, as a callee still queued does (``requeue``); its caller, if followed again, asks anew."""
        data = json.loads(progress_row["row"]) if progress_row["row"] else {}
        if Links.of(data).parent_run_id is not None:
            log.info("run %s of %s: asked as a tool by run %s; not followed again", progress_row["run_id"],
                     progress_row["agent"], Links.of(data).parent_run_id)
            return False
        reattach = getattr(self.executor, "reattach", None)
        if reattach is None:
            return False
        request = Request(progress_row["run_id"], progress_row["agent"], data.get("trigger") or "unknown",
                          data.get("input"), data.get("requested_by"), data.get("queued_at") or utcnow(),
                          status="running", retry_of=progress_row["retry_of"], attempt=int(data.get("attempt") or 1),
                          links=Links.of(data))
        try:
            plan = prepare(self.settings, self.conn, self.source, request.agent, input=request.input,
                           trigger=request.trigger, run_id=request.run_id, allow_suspended=True)
        except OrchestratorError:
            plan = None  # it runs still; only its memory asks go unanswered
        record = RunRecord.resume(self.writer, progress_row, self.settings.logs_dir,
                                  on_end=lambda final: self._ended(request, final),
                                  on_ask=functools.partial(self._cannot_answer, request.run_id))
        if plan is not None:
            record.on_ask = functools.partial(self.asks.take, plan, record=record)
        with self.cond:
            self.running[request.run_id] = request
        deadline = plan.deadline_seconds if plan is not None else self.settings.default_agent_timeout
        if not reattach(request.run_id, plan, record, deadline):
            with self.cond:
                self.running.pop(request.run_id, None)
            return False
        self.conn.execute("UPDATE run_progress SET launcher_pid = ? WHERE run_id = ?", (os.getpid(), request.run_id))
        log.info("run %s of %s: followed again on its node", request.run_id, request.agent)
        return True

    def _cannot_answer(self, run_id: str, ask: dict[str, Any]) -> None:
        self.executor.answer(run_id, {"t": "answer", "id": ask["id"],
                                      "error": "the agent's spec cannot be read now: its memory is unavailable"})

    def interrupted(self, progress_row: Any) -> Request | None:
        """A run a previous daemon left running, now on record as interrupted (recovery.sweep): its retry."""
        data = json.loads(progress_row["row"]) if progress_row["row"] else {}
        return self.retry(progress_row["run_id"], progress_row["agent"], data.get("trigger") or "unknown",
                          data.get("input"), "interrupted", int(data.get("attempt") or 1), Links.of(data))

    # -- retrying -----------------------------------------------------------------------------------

    def retry(self, run_id: str, agent: str, trigger: str, input: str | None, status: str,
              attempt: int, links: Links = NO_LINKS) -> Request | None:
        """Queue a retry of a run that ended in ``status``, if the agent's ``retry`` asks for one. The retry keeps
        the run's links: a chain's depth goes on where it was (a retry never restarts a chain)."""
        if trigger in ("manual", "a2a", "workflow", "agent") or status not in RETRIABLE or not self.accepting:
            return None
        applied = load_applied(self.conn, self.settings.client_id, agent).get(agent)
        policy = (applied.spec_dict or {}).get("retry") if applied is not None else None
        if not policy or status not in policy.get("on", []):
            return None
        attempts = attempt - 1  # retries made before this run
        if attempts >= int(policy.get("limit", 0)):
            log.info("run %s of %s %s: no retry left (%d of %d made)", run_id, agent, status, attempts,
                     policy.get("limit", 0))
            return None
        delay = float(policy.get("backoff", 0))
        log.info("run %s of %s %s: retry %d of %d in %gs", run_id, agent, status, attempts + 1, policy["limit"], delay)
        return self.submit(agent, trigger=trigger, input=input, overlap="queue", retry_of=run_id,
                           attempt=attempt + 1, delay=delay, links=links)

    # -- dispatching --------------------------------------------------------------------------------

    def _dispatch_loop(self) -> None:
        while True:
            with self.cond:
                request = self._next()
                while request is None:
                    self.cond.wait(timeout=self._until_due())
                    request = self._next()
                self.queue.remove(request)
                self.running[request.run_id] = request
                self.peak = max(self.peak, len(self.running))
            self._hand_off(request)

    def _next(self) -> Request | None:
        """The oldest queued run whose agent has none in flight (an agent runs once at a time: 'queue'
        waits for the run before it, 'replace' for the stopped one to be gone), while a slot is free. An
        agent asked as a tool needs no slot: its caller holds one."""
        free = sum(1 for r in self.running.values() if not r.called) < self.settings.max_agents
        busy = {r.agent for r in self.running.values() if not r.concurrent}
        now = time.monotonic()
        return next((r for r in self.queue if (r.called or free) and (r.concurrent or r.agent not in busy)
                     and r.not_before <= now), None)

    def _until_due(self) -> float | None:
        """Seconds until the first queued retry's backoff is over (None: nothing waits for its time)."""
        now = time.monotonic()
        waits = [r.not_before - now for r in self.queue if r.not_before > now]
        return max(0.01, min(waits)) if waits else None

    def _hand_off(self, request: Request) -> None:
        try:
            plan = prepare(self.settings, self.conn, self.source, request.agent, input=request.input,
                           trigger=request.trigger, run_id=request.run_id, allow_suspended=True, spec=request.spec)
        except Exception as exc:  # whatever one run's preparation meets, the dispatcher goes on with the next
            if not isinstance(exc, OrchestratorError):
                log.exception("preparing run %s of %s failed", request.run_id, request.agent)
            with self.cond:
                self.running.pop(request.run_id, None)
                self._record(request, "failed", exc.message if isinstance(exc, OrchestratorError) else
                             f"the run could not be prepared: {type(exc).__name__} (see the daemon's log)")
                self.cond.notify_all()
            return
        latency = time.monotonic() - request.submitted
        self.latencies.append(latency)
        if self.on_dispatch is not None:
            self.on_dispatch(latency)
        if request.limits:  # a workflow's step: at most the workflow's time and tokens left
            narrowed = {k: v if getattr(plan.spec.constraints, k) is None else min(v, getattr(plan.spec.constraints, k))
                        for k, v in request.limits.items()}
            plan.spec = plan.spec.model_copy(update={"constraints": plan.spec.constraints.model_copy(update=narrowed)})
        request.status = "running"
        record = start(plan, self.executor, self.asks, self.writer, self.conn, queued_at=request.queued_at,
              requested_by=request.requested_by, retry_of=request.retry_of, attempt=request.attempt,
              on_end=lambda final: self._ended(request, final), step=(request.workflow_run_id, request.step),
              links=request.links)
        with self.cond:  # a stop asked while it was being handed off is carried out now (never lost)
            request.record, wanted = record, request.stop_wanted
        if wanted is not None:
            record.stop_as = wanted if wanted[0] != "stopped" else None
            self.executor.stop(request.run_id)
        self.dispatched += 1

    def _ended(self, request: Request, row: RunRow) -> None:
        """A run's final row is durable: free its slot, and queue its retry if its spec asks for one."""
        with self.cond:
            self.running.pop(request.run_id, None)
            self.cond.notify_all()
        request.status, request.row = row.status, row
        request.done.set()
        log.info("run %s of %s ended: %s", request.run_id, request.agent, row.status)
        self.calls.caller_ended(request.run_id)
        if request.on_end is not None:
            request.on_end(request, row)
        if self.on_run_end is not None:
            self.on_run_end(request, row)
        self.retry(request.run_id, request.agent, request.trigger, request.input, row.status, request.attempt,
                   request.links)

    # -- stopping -----------------------------------------------------------------------------------

    def stop_agent(self, agent: str, reason: str) -> int:
        """Drop the agent's queued runs and stop its running ones."""
        with self.cond:
            for old in [r for r in self.queue if r.agent == agent]:
                self.queue.remove(old)
                self._record(old, "stopped", reason)
            running = [r.run_id for r in self.running.values() if r.agent == agent]
        for run_id in running:
            self.stop_run(run_id, reason)
        return len(running)

    def stop_run(self, run_id: str, reason: str, status: str = "stopped") -> bool:
        """Stop one run: dropped if still queued, told to stop if running (False if neither); either way it
        ends ``status`` with ``reason`` as its error (a workflow's deadline: timed_out)."""
        with self.cond:
            queued = next((r for r in self.queue if r.run_id == run_id), None)
            if queued is not None:
                self.queue.remove(queued)
                self._record(queued, status, reason)
                return True
            request = self.running.get(run_id)
            if request is None:
                return False
            if request.record is None:  # being handed off: _hand_off stops it once its executor has it
                request.stop_wanted = (status, reason)
                return True
            if status != "stopped":
                request.record.stop_as = (status, reason)
        self.executor.stop(run_id)
        self.calls.stop_callees(run_id, f"its caller, run {run_id}, was stopped")
        return True

    def is_running(self, run_id: str) -> bool:
        with self.cond:
            return run_id in self.running

    def record_of(self, run_id: str) -> RunRecord | None:
        """The record of a run in flight here (None: not here, or not handed to its executor yet)."""
        with self.cond:
            request = self.running.get(run_id)
            return request.record if request is not None else None

    def follow(self, run_id: str, on_end: Callable[[Request, RunRow], None]) -> bool:
        """Be told when run ``run_id``, queued or in flight here, ends; False when this table does not have it."""
        with self.cond:
            request = self.running.get(run_id) or next((r for r in self.queue if r.run_id == run_id), None)
            if request is None:
                return False
            request.on_end = on_end
            return True

    def stop_requested(self) -> None:
        """Stop the runs someone asked to stop through the state database (``agentctl stop`` without the
        daemon's socket: recording.request_stop)."""
        with self.cond:
            mine = set(self.running)
        for run_id in stops_requested(self.conn, self.settings.client_id):
            if run_id in mine:
                self.stop_run(run_id, "stopped on request")

    def shutdown(self, grace: float, kill_grace: float) -> None:
        """No new runs; queued ones are dropped; running ones get ``grace`` seconds, then are stopped."""
        with self.cond:
            self.accepting = False
            for old in list(self.queue):
                self.queue.remove(old)
                self._record(old, "stopped", "the daemon stopped before the run started")
            deadline = time.monotonic() + grace
            while self.running and time.monotonic() < deadline:
                self.cond.wait(timeout=0.2)
            running = list(self.running)
        for run_id in running:
            self.stop_run(run_id, "the daemon stopped")
        with self.cond:
            deadline = time.monotonic() + kill_grace + 5
            while self.running and time.monotonic() < deadline:
                self.cond.wait(timeout=0.2)
        if self.owns_executor:
            self.executor.close()
        self.asks.close()
        self.writer.close()

    def in_flight(self) -> dict[str, int]:
        with self.cond:
            return {"running": len(self.running), "queued": len(self.queue)}


def pid_alive(pid: int | None) -> bool:
    """Whether ``pid`` is a live process. A zombie is not: after a kill -9 the dead launchers linger as
    zombies until something reaps them, and os.kill(pid, 0) still succeeds on those."""
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        pass
    try:
        with open(f"/proc/{pid}/stat", "rb") as stat:
            return stat.read().rsplit(b")", 1)[1].split()[0] not in (b"Z", b"X")
    except (OSError, IndexError):
        return True
