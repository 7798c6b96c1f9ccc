"""The workflow engine: one thread per client that moves workflow runs along, driven by events.

Events are a workflow run started, resumed, cancelled or approved, a step's run ended (the process table
says so once its final row is durable), and timers (a retry's backoff, an approval's timeout, the
workflow's deadline). Each event ends in ``advance(workflow_run_id)``, which reads the run's rows from the
live store, decides, writes, and submits runs to the process table. Nothing waits in a thread: a run
waiting for a person or a backoff is rows and a timer, so a kill -9 loses nothing (``recover`` picks every
running workflow up again at the next start). docs/workflows.md has the states and the failure table.
"""

from __future__ import annotations

import functools
import heapq
import json
import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Callable
from typing import Any

from runner.agent.recording import NO_LINKS, Links, RunRow, end_in_flight, new_run_id
from runner.errors import ConflictError, ExpressionError, NotFoundError, SpecError, UsageError
from runner.ledger.workflows import (
    approvals_of,
    closing_of,
    journal_approval,
    journal_run,
    outputs_of,
    run_row,
    step_states,
    workflow_output,
)
from runner.ledger.workflows import (
    in_flight as runs_in_flight,
)
from runner.reconcile.applied import load_applied
from runner.settings import Settings
from runner.specs.models import WorkflowSpec
from runner.state import PerThread, Transaction
from runner.supervise.evaluator import Evaluator
from runner.supervise.table import ProcessTable, Request
from runner.supervise.workflow_state import (
    DONE,
    FAILED,
    coerce_inputs,
    context_of,
    deadline,
    descendants,
    order,
    reset,
    step_outcome,
    too_long,
)
from runner.times import utcnow

log = logging.getLogger("runner.workflows")
MAX_ERROR = 4000  # characters of an error kept (a run's error is kept as long)
ADVANCE_BUDGET = 10.0  # seconds of expressions one look at a run may spend before the others get a turn
MAX_AT_ONCE = 1000  # runs of one step handed to the process table at once when max_parallel says nothing
STOPPING = ("timed_out", "budget_exceeded", "stopped")  # ends that stop the runs in flight (a failure lets them end)


class WorkflowEngine:
    def __init__(self, settings: Settings, table: ProcessTable) -> None:
        self.settings, self.table = settings, table
        self.client_id = settings.client_id
        self.events: queue.Queue[tuple[str, Any] | None] = queue.Queue()
        self.timers: list[tuple[float, str]] = []
        self._conns = PerThread(settings.state_path)
        self._stopped: set[str] = set()  # runs told to stop (once each)
        self._specs: dict[str, tuple[str, WorkflowSpec]] = {}  # each running run's spec, parsed once
        self.evaluator = Evaluator()  # the expressions' own process, started when first needed
        self._next_at: dict[str, float] = {}  # each run's armed timer
        self.detached = False  # the daemon is stopping: ends of runs are not acted on (recover does, at the next start)
        self.on_step_end: Any = None  # metrics: called with (workflow, seconds)
        self.on_end: Callable[[sqlite3.Row, str | None], None] | None = None  # a run ended: (its row, its output)
        self.thread = threading.Thread(target=self._loop, name=f"workflows-{self.client_id}", daemon=True)
        self.thread.start()

    @property
    def conn(self) -> sqlite3.Connection:
        return self._conns.get()

    # -- what users ask ----------------------------------------------------------------------------

    def start(self, name: str, inputs: dict[str, Any] | None, *, trigger: str, requested_by: str,
              wf_id: str | None = None, event: dict[str, Any] | None = None, links: Links = NO_LINKS) -> str:
        """A run: its id (``wf_id``: a delivery's). ``event``: its expressions' event, headers, payload."""
        applied = load_applied(self.conn, self.client_id, name, kind="workflow").get(name)
        if applied is None:
            raise NotFoundError(f"no workflow named '{name}' for client '{self.client_id}' (run 'agentctl apply')")
        spec = applied.workflow
        if spec is None:
            raise SpecError(f"workflow '{name}' has never had a valid spec: {applied.message}")
        if not isinstance(inputs, dict):
            raise UsageError("inputs must be a mapping of input names to values", details=["inputs: not a mapping"])
        values, problems = coerce_inputs({k: v.model_dump() for k, v in spec.inputs.items()}, inputs)
        if problems:
            raise UsageError(problems[0], details=problems)
        wf_id = wf_id or new_run_id()
        now = time.time()
        with Transaction(self.conn) as tx:
            tx.execute("""INSERT INTO wf_runs (workflow_run_id, client_id, workflow, spec_revision, spec, trigger,
                              requested_by, status, attempt, inputs, started_at, deadline, event, trigger_run_id,
                              chain_depth)
                          VALUES (?, ?, ?, ?, ?, ?, ?, 'running', 1, ?, ?, ?, ?, ?, ?)""",
                       (wf_id, self.client_id, name, applied.applied_revision, spec.model_dump_json(by_alias=True),
                        trigger, requested_by, json.dumps(values), utcnow(), deadline(spec, now),
                        json.dumps(event) if event else None, links.trigger_run_id, links.chain_depth))
            tx.executemany("INSERT INTO wf_steps (workflow_run_id, step, position, status) VALUES (?, ?, ?, 'pending')",
                           [(wf_id, s.id, i) for i, s in enumerate(spec.steps)])
            journal_run(tx, run_row(tx, wf_id))
        log.info("workflow %s run %s started (%s, by %s)", name, wf_id, trigger, requested_by)
        self.poke(wf_id)
        return wf_id

    # What users ask never waits for the engine's thread (which may be waiting for an expression): each is one
    # transaction whose conditions are checked in it, so a race with the engine is decided by the store.

    def cancel(self, wf_id: str, requested_by: str) -> dict[str, Any]:
        self._mine(wf_id)
        with Transaction(self.conn) as tx:
            done = tx.execute("UPDATE wf_runs SET closing = 'stopped', error = ? WHERE workflow_run_id = ? AND "
                              "status = 'running' AND (closing IS NULL OR closing = 'failed')",
                              (f"cancelled by {requested_by}"[:MAX_ERROR], wf_id)).rowcount
            run = self._mine(wf_id)
        if not done:
            what = f"has ended ({run['status']})" if run["status"] != "running" else f"is ending ({run['closing']})"
            raise ConflictError(f"workflow run {wf_id} {what}: nothing to cancel")
        in_flight = runs_in_flight(self.conn, wf_id)
        self.poke(wf_id)
        return {"workflow_run_id": wf_id, "status": "stopped" if not in_flight else "running",
                "stopping_runs": len(in_flight)}

    def approve(self, wf_id: str, step: str, approve: bool, comment: str | None, requested_by: str) -> dict[str, Any]:
        run = self._mine(wf_id)
        row = self.conn.execute("SELECT status FROM wf_steps WHERE workflow_run_id = ? AND step = ?",
                                (wf_id, step)).fetchone()
        if row is None:
            raise NotFoundError(f"workflow run {wf_id} has no step '{step}'")
        if run["status"] != "running" or not self._decide(wf_id, step, approve, comment, requested_by):
            run, row = self._mine(wf_id), self.conn.execute("SELECT status FROM wf_steps WHERE workflow_run_id = ? "
                                                            "AND step = ?", (wf_id, step)).fetchone()
            what = run["status"] if run["status"] != "running" else f"the step is {row['status']}"
            raise ConflictError(f"step '{step}' of workflow run {wf_id} waits for no approval ({what})")
        self.poke(wf_id)
        return {"workflow_run_id": wf_id, "step": step, "approved": approve, "status": "running"}

    def resume(self, wf_id: str, from_step: str | None, at_head: bool, requested_by: str) -> dict[str, Any]:
        run = self._mine(wf_id)
        if run["status"] == "running":
            raise ConflictError(f"workflow run {wf_id} is still running: cancel it first, or wait for its end")
        spec, revision = WorkflowSpec.model_validate_json(run["spec"]), run["spec_revision"]
        if at_head:
            applied = load_applied(self.conn, self.client_id, run["workflow"], kind="workflow").get(run["workflow"])
            if applied is None or applied.workflow is None:
                raise SpecError(f"workflow '{run['workflow']}' has no valid applied spec to resume at")
            spec, revision = applied.workflow, applied.applied_revision
        ids = [s.id for s in spec.steps]
        if from_step is not None and from_step not in ids:
            raise UsageError(f"workflow '{run['workflow']}' has no step '{from_step}' (steps: {', '.join(ids)})",
                             details=[f"from: no step '{from_step}'"])
        redo = descendants(spec, from_step) if from_step else set()
        with Transaction(self.conn) as tx:
            if tx.execute("SELECT status FROM wf_runs WHERE workflow_run_id = ?", (wf_id,)).fetchone()[0] == \
                    "running":
                raise ConflictError(f"workflow run {wf_id} is still running: cancel it first, or wait for its end")
            reset(tx, wf_id, spec, redo)
            tx.execute("""UPDATE wf_runs SET status = 'running', closing = NULL, error = NULL, ended_at = NULL,
                              attempt = attempt + 1, spec = ?, spec_revision = ?, deadline = ?,
                              budget_base = input_tokens + output_tokens WHERE workflow_run_id = ?""",
                       (spec.model_dump_json(by_alias=True), revision, deadline(spec, time.time()), wf_id))
            journal_run(tx, run_row(tx, wf_id))
        attempt = int(run["attempt"]) + 1
        log.info("workflow run %s resumed by %s (attempt %d%s%s)", wf_id, requested_by, attempt,
                 f", from {from_step}" if from_step else "", ", at the head revision" if at_head else "")
        self.poke(wf_id)
        return {"workflow_run_id": wf_id, "status": "running", "attempt": attempt, "spec_revision": revision}

    def recover(self, never_started: list[sqlite3.Row]) -> None:
        """At the daemon's start: every running workflow run goes on. ``never_started``: step runs a dead daemon
        had queued (they go back to their step, not to the queue); running step runs are interrupted by now
        (recovery.sweep), and their steps' retry decides."""
        for row in never_started:
            end_in_flight(self.conn, row, "stopped", "queued when the daemon stopped: its workflow starts the step "
                          "again")
            self.conn.execute("UPDATE wf_items SET status = 'pending', run_id = NULL, reserved = 0 WHERE run_id = ?",
                              (row["run_id"],))
        runs = [r[0] for r in self.conn.execute("SELECT workflow_run_id FROM wf_runs WHERE client_id = ? AND "
                                                "status = 'running'", (self.client_id,))]
        for wf_id in runs:
            for item in self.conn.execute("SELECT run_id FROM wf_items WHERE workflow_run_id = ? AND "
                                          "status = 'running'", (wf_id,)).fetchall():
                if not self.table.follow(item["run_id"], self._on_end):  # reattached on its node, or gone
                    self.events.put(("lost", item["run_id"]))
            self.poke(wf_id)
        if runs:
            log.info("workflows: %d run(s) going on after the restart", len(runs))

    def detach(self) -> None:
        """The daemon stops: from now on the ends of step runs are left for ``park`` and the next start (the
        engine's thread sees it before each step it starts, so this never waits for an expression)."""
        self.detached = True

    def park(self) -> None:
        """After the process table stopped: step runs it dropped before they started go back to their step (the
        next daemon starts them); those that ran and were stopped are interrupted, for the next daemon to retry."""
        self.conn.execute("""UPDATE wf_items SET status = 'pending', run_id = NULL, reserved = 0
                             WHERE status = 'running' AND run_id IN (SELECT run_id FROM run_progress
                                                                     WHERE client_id = ? AND started_at IS NULL)""",
                          (self.client_id,))
        self.close()

    def poke(self, wf_id: str) -> None:
        self.events.put(("advance", wf_id))

    def close(self) -> None:
        self.events.put(None)
        self.thread.join(timeout=5)
        self.evaluator.close()

    # -- the loop ----------------------------------------------------------------------------------

    def _loop(self) -> None:
        while True:
            wait = max(0.0, self.timers[0][0] - time.time()) if self.timers else None
            try:
                event = self.events.get(timeout=wait)
            except queue.Empty:
                event = ("timer", None)
            if event is None:
                return
            try:
                self._handle(event)
            except Exception:  # one workflow's trouble must not stop the others
                log.exception("workflow engine: %s failed", event[0])

    def _handle(self, event: tuple[str, Any]) -> None:
        kind, what = event
        due: set[str] = set()
        now = time.time()
        while self.timers and self.timers[0][0] <= now:
            at, wf_id = heapq.heappop(self.timers)
            if self._next_at.get(wf_id) == at:
                del self._next_at[wf_id]
                due.add(wf_id)
        if not self.detached:
            if kind == "ended":
                due.add(self._item_ended(*what))
            elif kind == "lost":
                due.add(self._item_lost(what))
            elif kind == "advance":
                due.add(what)
            for wf_id in sorted(d for d in due if d):
                self._advance(wf_id)

    def _on_end(self, request: Request, row: RunRow) -> None:
        """The process table's word that a step's run ended (any thread, maybe under the table's lock)."""
        self.events.put(("ended", (request.run_id, row)))

    # -- moving a run along ------------------------------------------------------------------------

    def _advance(self, wf_id: str) -> None:
        """Look at one run and move it on. It reads the run's row and its steps' states, and of the runs only
        what it needs (in flight, ready to start, what an expression reads): an event costs about the same in a
        workflow of 3 steps and of 300."""
        run = self.conn.execute("SELECT * FROM wf_runs WHERE workflow_run_id = ?", (wf_id,)).fetchone()
        if run is None or run["status"] != "running":
            self._specs.pop(wf_id, None)
            return
        spec = self._spec(run)
        now = time.time()
        closing = run["closing"]
        if not closing and run["deadline"] and now >= run["deadline"]:
            closing = self._close(wf_id, "timed_out",
                                  f"the workflow's max_runtime of {spec.constraints.max_runtime:g}s passed")
        steps = step_states(self.conn, wf_id)
        if not closing:
            try:
                self._progress(wf_id, run, spec, steps, now)
            except Exception as exc:  # never a run stuck 'running' for good: it fails, saying why
                log.exception("workflow run %s: the engine could not move it on", wf_id)
                closing = self._close(wf_id, "failed", f"the engine could not move this run on: {type(exc).__name__}: "
                                      f"{exc}")
                steps = step_states(self.conn, wf_id)
            closing = closing or self._failure(wf_id, spec, steps)
        in_flight = runs_in_flight(self.conn, wf_id)
        if closing:
            if closing in STOPPING:
                why = self.conn.execute("SELECT error FROM wf_runs WHERE workflow_run_id = ?", (wf_id,)).fetchone()[0]
                for run_id in in_flight:
                    if run_id not in self._stopped:
                        self._stopped.add(run_id)
                        self.table.stop_run(run_id, why or f"its workflow ended {closing}", closing)
            if not in_flight:
                self._finish(wf_id, closing)
            return
        if all(s["status"] in DONE for s in steps.values()):
            self._finish(wf_id, "succeeded")
            return
        self._arm(wf_id, run, steps, now)

    def _spec(self, run: sqlite3.Row) -> WorkflowSpec:
        """The run's spec, parsed once per run (and again after a resume changed it)."""
        text = run["spec"]
        cached = self._specs.get(run["workflow_run_id"])
        if cached is None or cached[0] != text:
            cached = (text, WorkflowSpec.model_validate_json(text))
            self._specs[run["workflow_run_id"]] = cached
        return cached[1]

    def _progress(self, wf_id: str, run: sqlite3.Row, spec: WorkflowSpec, steps: dict[str, dict[str, Any]],
                  now: float) -> None:
        by_id = {s.id: s for s in spec.steps}
        budget = time.monotonic() + ADVANCE_BUDGET
        for step_id in order(spec):
            state = steps[step_id]
            if state["status"] not in ("pending", "waiting"):
                continue
            step = by_id[step_id]
            if state["status"] == "waiting":
                if state["wait_until"] and now >= state["wait_until"]:
                    state["status"] = self._timeout_approval(wf_id, step)
                continue
            needs = [steps[n]["status"] for n in step.needs]
            blocked = [(n, s) for n, s in zip(step.needs, needs, strict=True) if s in FAILED]
            if blocked:
                self._set_step(wf_id, step_id, "skipped", f"not run: step '{blocked[0][0]}' ended {blocked[0][1]}")
                state["status"] = "skipped"
                continue
            if any(s not in ("succeeded", "skipped") for s in needs):
                continue
            if self.detached or closing_of(self.conn, wf_id):
                return  # the daemon stops, or the run was cancelled meanwhile: nothing new starts
            if time.monotonic() > budget:  # expressions took long: let the other events in, then go on
                self.poke(wf_id)
                break
            context = context_of(spec.steps, step, json.loads(run["inputs"]), steps,
                                 functools.partial(outputs_of, self.conn, wf_id),
                                 functools.partial(approvals_of, self.conn, wf_id),
                                 json.loads(run["event"]) if run["event"] else {})
            state["status"] = self._begin(wf_id, step, context, now)
            if state["status"] in FAILED and not step.continue_on_error:
                break  # the workflow fails: no more expressions for steps that will not run
        self._start_items(wf_id, run, spec, steps, now)

    def _ask(self, field: str, op: str, text: str, context: dict[str, Any], items: list[Any] | None = None) -> Any:
        try:
            return self.evaluator.ask(op, text, context, items)
        except ExpressionError as exc:
            raise ExpressionError(f"{field}: {exc}") from None

    def _begin(self, wf_id: str, step: Any, context: dict[str, Any], now: float) -> str:
        """A ready step: skipped, waiting for a person, or its runs laid out as items; returns its status. Its
        expressions run in the evaluator's process (``runner.supervise.evaluator``): what they cost is theirs."""
        try:
            if step.if_ and not self._ask("if", "if", step.if_, context):
                self._set_step(wf_id, step.id, "skipped", None, started=True)
                return "skipped"
            if step.approval is not None:
                message = self._ask("approval.message", "render", step.approval.message, context)[0] \
                    if step.approval.message else None
                self.conn.execute("UPDATE wf_steps SET status = 'waiting', started_at = ?, wait_until = ?, message = ? "
                                  "WHERE workflow_run_id = ? AND step = ?",
                                  (utcnow(), now + step.approval.timeout, message, wf_id, step.id))
                log.info("workflow run %s: step %s waits for an approval", wf_id, step.id)
                return "waiting"
            items = self._ask("for_each", "for_each", step.for_each, context) if step.for_each else None
            texts = self._ask("input", "render", step.input, context, items) if items != [] else []
            laid = list(zip(items if items is not None else [None], texts, strict=True))
        except ExpressionError as exc:
            self._set_step(wf_id, step.id, "failed", str(exc), started=True, ended=True)
            return "failed"
        with Transaction(self.conn) as tx:
            tx.executemany("INSERT OR REPLACE INTO wf_items (workflow_run_id, step, idx, item, input, status) "
                           "VALUES (?, ?, ?, ?, ?, 'pending')",
                           [(wf_id, step.id, i, json.dumps(item) if step.for_each else None, text)
                            for i, (item, text) in enumerate(laid)])
            status = "running" if laid else "succeeded"
            tx.execute("UPDATE wf_steps SET status = ?, started_at = ?, ended_at = ? WHERE workflow_run_id = ? "
                       "AND step = ?", (status, utcnow(), None if laid else utcnow(), wf_id, step.id))
        return status

    def _start_items(self, wf_id: str, run: sqlite3.Row, spec: WorkflowSpec, steps: dict[str, dict[str, Any]],
                     now: float) -> None:
        by_id = {s.id: s for s in spec.steps}
        active = [by_id[i] for i in order(spec) if steps[i]["status"] == "running" and by_id[i].agent]
        if not active:
            return
        flying = {r[0]: (int(r[1]), int(r[2] or 0)) for r in self.conn.execute(
            "SELECT step, count(*), sum(reserved) FROM wf_items WHERE workflow_run_id = ? AND status = 'running' "
            "GROUP BY step", (wf_id,))}
        start: list[tuple[sqlite3.Row, Any]] = []
        for step in active:
            room = (step.max_parallel or MAX_AT_ONCE) - flying.get(step.id, (0, 0))[0]
            if room > 0:
                start += [(r, step) for r in self.conn.execute(
                    "SELECT * FROM wf_items WHERE workflow_run_id = ? AND step = ? AND status = 'pending' AND "
                    "not_before <= ? ORDER BY idx LIMIT ?", (wf_id, step.id, now, room))]
        if not start:
            return
        limits: dict[str, float] = {}
        if run["deadline"]:
            limits["max_runtime"] = max(0.001, run["deadline"] - now)
        share = None
        if spec.constraints.max_tokens:
            held = sum(reserved for _, reserved in flying.values())
            used = int(run["input_tokens"]) + int(run["output_tokens"]) - int(run["budget_base"])
            share = (spec.constraints.max_tokens - used - held) // len(start)
            if share < 1:
                if not held:
                    self._close(wf_id, "budget_exceeded", f"the workflow's max_tokens of {spec.constraints.max_tokens} "
                                f"is used up ({used} tokens)")
                    self.poke(wf_id)
                return  # the runs in flight give back what they do not use
        for r, step in start:
            self._submit(wf_id, r, step, {**limits, **({"max_tokens": share} if share else {})})

    def _submit(self, wf_id: str, item: sqlite3.Row, step: Any, limits: dict[str, float]) -> None:
        request = self.table.submit(step.agent, trigger="workflow", input=item["input"],
                                    requested_by=f"workflow:{wf_id}", retry_of=item["retry_of"],
                                    attempt=int(item["attempt"]), step=(wf_id, step.id), limits=limits,
                                    on_end=self._on_end, run_id=new_run_id())
        self.conn.execute("UPDATE wf_items SET status = 'running', run_id = ?, reserved = ?, started_at = ?, "
                          "error = NULL WHERE workflow_run_id = ? AND step = ? AND idx = ?",
                          (request.run_id, int(limits.get("max_tokens", 0)), utcnow(), wf_id, step.id, item["idx"]))

    def _item_ended(self, run_id: str, row: RunRow) -> str:
        item = self.conn.execute("SELECT * FROM wf_items WHERE run_id = ?", (run_id,)).fetchone()
        if item is None or item["status"] != "running":
            return ""
        wf_id = item["workflow_run_id"]
        run = self.conn.execute("SELECT * FROM wf_runs WHERE workflow_run_id = ?", (wf_id,)).fetchone()
        spec = self._spec(run)
        step = next(s for s in spec.steps if s.id == item["step"])
        status, error = row.status, row.error
        if status == "skipped":  # never ran: the daemon was stopping; it runs at the next start
            self.conn.execute("UPDATE wf_items SET status = 'pending', run_id = NULL, reserved = 0 WHERE run_id = ?",
                              (run_id,))
            return ""
        problem = too_long(status, row.extra.get("output_chars"))
        if problem:
            status, error = "failed", problem
        tokens = row.input_tokens + row.output_tokens
        retry = step.retry
        again = (retry is not None and status in retry.on and int(item["attempt"]) - 1 < retry.limit
                 and not run["closing"])
        with Transaction(self.conn) as tx:
            tx.execute("UPDATE wf_runs SET input_tokens = input_tokens + ?, output_tokens = output_tokens + ? "
                       "WHERE workflow_run_id = ?", (row.input_tokens, row.output_tokens, wf_id))
            if again:
                assert retry is not None
                log.info("workflow run %s: step %s run %s %s: retry %d of %d in %gs", wf_id, step.id, run_id, status,
                         item["attempt"], retry.limit, retry.backoff)
                tx.execute("""UPDATE wf_items SET status = 'pending', run_id = NULL, reserved = 0, retry_of = ?,
                                  attempt = attempt + 1, not_before = ?, tokens = tokens + ?, error = ?
                              WHERE workflow_run_id = ? AND step = ? AND idx = ?""",
                           (run_id, time.time() + retry.backoff, tokens, error, wf_id, step.id, item["idx"]))
            else:
                tx.execute("""UPDATE wf_items SET status = ?, reserved = 0, tokens = tokens + ?, output = ?, error = ?,
                                  ended_at = ? WHERE workflow_run_id = ? AND step = ? AND idx = ?""",
                           (status, tokens, row.output if status == "succeeded" else None, error, utcnow(), wf_id,
                            step.id, item["idx"]))
                if status in FAILED and not step.continue_on_error:  # the fan-out's other items do not start
                    tx.execute("UPDATE wf_items SET status = 'skipped', error = 'not run: an earlier item failed' "
                               "WHERE workflow_run_id = ? AND step = ? AND status = 'pending'", (wf_id, step.id))
        if not again:
            self._step_done(wf_id, step.id)
        return str(wf_id)

    def _item_lost(self, run_id: str) -> str:
        """A step run nobody follows after a restart: its end as the store knows it (interrupted by now)."""
        from runner.agent.recording import live_row

        progress = self.conn.execute("SELECT * FROM run_progress WHERE run_id = ?", (run_id,)).fetchone()
        status = progress["status"] if progress is not None else "interrupted"
        row = live_row(progress, status) if progress is not None else RunRow(run_id, self.client_id, "", None,
                                                                            "workflow", "interrupted")
        if status not in DONE or status == "stopped":  # stopped: by the daemon that stopped while it ran
            row.status, row.error = "interrupted", "the daemon stopped or died while the run was in flight"
        elif progress is not None and progress["row"]:
            data = json.loads(progress["row"])
            row.output, row.error = data.get("output"), data.get("error")
        return self._item_ended(run_id, row)

    def _step_done(self, wf_id: str, step_id: str) -> None:
        left = self.conn.execute(f"SELECT count(*) FROM wf_items WHERE workflow_run_id = ? AND step = ? AND status "
                                 f"NOT IN ({', '.join('?' * len(DONE))})", (wf_id, step_id, *DONE)).fetchone()[0]
        if left:
            return
        items = [dict(r) for r in self.conn.execute("SELECT idx, status, error FROM wf_items WHERE workflow_run_id = ? "
                                                    "AND step = ?", (wf_id, step_id))]
        outcome = step_outcome(items)
        if outcome is not None:
            self._set_step(wf_id, step_id, outcome[0], outcome[1], ended=True)

    def _failure(self, wf_id: str, spec: WorkflowSpec, steps: dict[str, dict[str, Any]]) -> str | None:
        """The workflow's end when a step failed that may not (after its retries), else None."""
        for step in spec.steps:
            state = steps[step.id]
            if state["status"] in FAILED and not step.continue_on_error:
                status = state["status"] if state["status"] in ("timed_out", "budget_exceeded") else "failed"
                error = self.conn.execute("SELECT error FROM wf_steps WHERE workflow_run_id = ? AND step = ?",
                                          (wf_id, step.id)).fetchone()[0]
                return self._close(wf_id, status, f"step '{step.id}' ended {state['status']}" + (f": {error}" if error
                                                                                                   else ""))
        return None

    # -- approvals ---------------------------------------------------------------------------------

    def _decide(self, wf_id: str, step: str, approve: bool, comment: str | None, by: str) -> bool:
        """Record a decision on a step that waits; False when it waits no more (decided, timed out, ended)."""
        comment = comment[:MAX_ERROR] if comment else comment
        with Transaction(self.conn) as tx:
            error = None if approve else f"rejected by {by}" + (f": {comment}" if comment else "")
            if not tx.execute("UPDATE wf_steps SET status = ?, error = ?, ended_at = ?, wait_until = NULL "
                              "WHERE workflow_run_id = ? AND step = ? AND status = 'waiting'",
                              ("succeeded" if approve else "failed", error, utcnow(), wf_id, step)).rowcount:
                return False
            journal_approval(tx, {"workflow_run_id": wf_id, "step": step, "approved": approve, "by": by,
                                  "at": utcnow(), "comment": comment})
        log.info("workflow run %s: step %s %s by %s", wf_id, step, "approved" if approve else "rejected", by)
        return True

    def _timeout_approval(self, wf_id: str, step: Any) -> str:
        """An approval nobody gave in time: ``on_timeout`` decides. Returns the step's status."""
        decision = step.approval.on_timeout
        why = f"no decision within {step.approval.timeout:g}s"
        if decision == "fail":
            self.conn.execute("UPDATE wf_steps SET status = 'timed_out', error = ?, ended_at = ?, wait_until = NULL "
                              "WHERE workflow_run_id = ? AND step = ? AND status = 'waiting'",
                              (why, utcnow(), wf_id, step.id))
        else:
            self._decide(wf_id, step.id, decision == "approve", why, "timeout")
        row = self.conn.execute("SELECT status FROM wf_steps WHERE workflow_run_id = ? AND step = ?",
                                (wf_id, step.id)).fetchone()
        return str(row[0])  # what it is now: a person's decision may have come first

    # -- rows --------------------------------------------------------------------------------------

    def _mine(self, wf_id: str) -> sqlite3.Row:
        row = self.conn.execute("SELECT * FROM wf_runs WHERE workflow_run_id = ? AND client_id = ?",
                                (wf_id, self.client_id)).fetchone()
        if row is None:
            raise NotFoundError(f"no workflow run {wf_id} for client '{self.client_id}'")
        found: sqlite3.Row = row
        return found

    def _set_step(self, wf_id: str, step: str, status: str, error: str | None, *, started: bool = False,
                  ended: bool = True) -> None:
        stamp, error = utcnow(), error[:MAX_ERROR] if error else error
        self.conn.execute("UPDATE wf_steps SET status = ?, error = ?, started_at = coalesce(started_at, ?), "
                          "ended_at = ?, wait_until = NULL WHERE workflow_run_id = ? AND step = ?",
                          (status, error, stamp if started or ended else None, stamp if ended else None, wf_id, step))
        if ended and self.on_step_end is not None:
            row = self.conn.execute("SELECT w.workflow, s.started_at FROM wf_steps s JOIN wf_runs w USING "
                                    "(workflow_run_id) WHERE s.workflow_run_id = ? AND s.step = ?",
                                    (wf_id, step)).fetchone()
            if row is not None and row["started_at"]:
                from runner.times import parse

                self.on_step_end(row["workflow"], (parse(stamp) - parse(row["started_at"])).total_seconds())

    def _close(self, wf_id: str, status: str, error: str) -> str:
        """Decide the run's end: nothing new starts; it ends once its runs in flight have. Returns the end decided
        (an earlier decision stands)."""
        self.conn.execute("UPDATE wf_runs SET closing = ?, error = ? WHERE workflow_run_id = ? AND closing IS NULL",
                          (status, error[:MAX_ERROR], wf_id))
        row = self.conn.execute("SELECT closing FROM wf_runs WHERE workflow_run_id = ?", (wf_id,)).fetchone()
        return str(row[0])

    def _finish(self, wf_id: str, status: str) -> None:
        with Transaction(self.conn) as tx:
            tx.execute("UPDATE wf_runs SET status = ?, closing = NULL, ended_at = ? WHERE workflow_run_id = ?",
                       (status, utcnow(), wf_id))
            if status != "succeeded":  # what waits for a person waits no more
                tx.execute("UPDATE wf_steps SET status = 'stopped', error = 'the workflow ended', ended_at = ?, "
                           "wait_until = NULL WHERE workflow_run_id = ? AND status = 'waiting'", (utcnow(), wf_id))
            row = run_row(tx, wf_id)
            journal_run(tx, row)
        log.info("workflow %s run %s %s%s", row["workflow"], wf_id, status, f": {row['error']}" if row["error"] else "")
        if self.on_end is not None:
            self.on_end(row, workflow_output(self.conn, wf_id))

    def _arm(self, wf_id: str, run: sqlite3.Row, steps: dict[str, dict[str, Any]], now: float) -> None:
        """A timer for the next moment this run must be looked at without an event: a backoff's end, an
        approval's timeout, the deadline."""
        moments = [run["deadline"]] if run["deadline"] else []
        moments += [s["wait_until"] for s in steps.values() if s["status"] == "waiting" and s["wait_until"]]
        backoff = self.conn.execute("SELECT min(not_before) FROM wf_items WHERE workflow_run_id = ? AND status = "
                                    "'pending' AND not_before > ?", (wf_id, now)).fetchone()[0]
        moments += [backoff] if backoff else []
        if moments and self._next_at.get(wf_id) != min(moments):
            self._next_at[wf_id] = min(moments)
            heapq.heappush(self.timers, (min(moments), wf_id))


