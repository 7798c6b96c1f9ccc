"""Agents asked as tools: a run's ``agent.ask``, answered with a run of the agent it names.

``Calls.ask`` is the handler the process table gives its ``Asks`` (the agent layer knows it only as a
callable). For one ask of a run (the caller) it:

1. finds the caller's tool (its ``agent:``), and refuses (a ``denied`` tool call the model is told of)
   when the callee would run deeper than AGENT_ORCH_MAX_TOOL_DEPTH, or when the caller's ``max_tokens``
   has nothing left;
2. prepares the callee's plan at its applied revision and narrows its spec to what the caller may do
   (``runner.supervise.narrowing``), its ``max_tokens`` capped at what the caller has left and its
   ``max_runtime`` at the tool's ``timeout``: the callee's deadline is the caller's wait;
3. submits it to the process table (trigger ``agent``, ``parent_run_id`` = the caller), which hands it
   off at once: the caller holds a MAX_AGENTS slot and waits, and the one-run-per-agent rule does not
   apply to it;
4. answers when it ends (``on_end``): its output, or its status and error, and always its tokens (its own,
   and those its own callees used: ``borrowed``, so a grandchild's count on the top caller's budget too),
   which the caller's side adds to its budget count. They are kept here too (``borrowed``): the next callee
   of the same caller is capped at what is left after both.

A caller that ends or is stopped stops its callees in flight (``caller_ended``, ``stop_callees``); a
callee's own callees go the same way. Depth is counted here, from the callees this daemon started: a
run started otherwise is at depth 0.
"""

from __future__ import annotations

import logging
import threading
from typing import TYPE_CHECKING, Any

from runner.agent.asking import Journal, Reply
from runner.agent.launching import prepare
from runner.agent.recording import Links, RunRow, new_run_id
from runner.errors import DeniedError, OrchestratorError
from runner.plan import RunPlan
from runner.supervise.narrowing import narrow

if TYPE_CHECKING:
    from runner.supervise.table import ProcessTable, Request

log = logging.getLogger("runner.supervise")


class Calls:
    def __init__(self, table: ProcessTable) -> None:
        self.table = table
        self._lock = threading.Lock()
        self._depth: dict[str, int] = {}  # a callee in flight: its depth (1: asked by a run started otherwise)
        self._caller: dict[str, str] = {}  # a callee in flight: its caller
        self._borrowed: dict[str, int] = {}  # a caller: tokens its callees used, on its budget
        self._lent: dict[str, int] = {}  # a callee just ended: what its own callees used, for its answer

    def ask(self, plan: RunPlan, ask: dict[str, Any], _record: Journal | None, reply: Reply) -> None:
        """Start the callee of ``ask`` for ``plan``'s run, and ``reply`` when it ends; raises
        OrchestratorError (DeniedError: refused by policy) when it cannot start."""
        tool = next((t for t in plan.spec.tools if t.name == ask.get("tool") and t.agent), None)
        if tool is None or tool.agent is None:
            raise DeniedError(f"'{ask.get('tool')}' is not an agent tool of this agent")
        settings, caller = self.table.settings, plan.run_id
        with self._lock:
            depth = self._depth.get(caller, 0) + 1
            borrowed = self._borrowed.get(caller, 0)
        if depth > settings.max_tool_depth:
            raise DeniedError(f"asking agent '{tool.agent}' would start a run at depth {depth}, past "
                              f"AGENT_ORCH_MAX_TOOL_DEPTH ({settings.max_tool_depth}): answer without it")
        budget = plan.spec.constraints.max_tokens
        left = None if budget is None else budget - self._own_tokens(caller) - borrowed
        if left is not None and left <= 0:
            raise DeniedError(f"no tokens are left of this run's max_tokens ({budget}) for agent '{tool.agent}'")
        callee = prepare(settings, self.table.conn, self.table.source, tool.agent, input=ask["text"],
                         trigger="agent")
        spec = narrow(callee.spec, plan.spec, callee_vars=callee.variables, caller_vars=plan.variables,
                      callee_sources=callee.custom_sources, caller_sources=plan.custom_sources,
                      deeper=depth < settings.max_tool_depth)
        c = spec.constraints
        limits: dict[str, Any] = {}
        if left is not None:
            limits["max_tokens"] = min(c.max_tokens or left, left)
        if tool.timeout is not None:
            limits["max_runtime"] = min(c.max_runtime or settings.default_agent_timeout, tool.timeout)
        spec = spec.model_copy(update={"constraints": c.model_copy(update=limits)})
        run_id = new_run_id()

        def ended(_request: Request, row: RunRow) -> None:
            with self._lock:
                tokens = row.input_tokens + row.output_tokens + self._lent.pop(run_id, 0)
                self._depth.pop(run_id, None)
                self._caller.pop(run_id, None)
                if caller in self._borrowed:
                    self._borrowed[caller] += tokens
            reply({"run_id": run_id, "status": row.status, "tokens": tokens,
                   "output": row.output if row.status == "succeeded" else None,
                   "reason": None if row.status == "succeeded" else row.error})

        with self._lock:
            self._depth[run_id], self._caller[run_id] = depth, caller
            self._borrowed.setdefault(caller, 0)
        log.info("run %s asks agent %s (tool %s, depth %d): run %s", caller, tool.agent, tool.name, depth, run_id)
        self.table.submit(tool.agent, trigger="agent", input=ask["text"], requested_by=f"run:{caller}",
                          links=Links(parent_run_id=caller), spec=spec, on_end=ended, run_id=run_id)
        if not self.table.is_running(caller):  # it ended (or was stopped) while its callee was being started
            self.caller_ended(caller)

    def _own_tokens(self, run_id: str) -> int:
        record = self.table.record_of(run_id)
        if record is None:
            raise OrchestratorError(f"run {run_id} is not in this daemon's care: it cannot ask an agent")
        return record.row.input_tokens + record.row.output_tokens

    def stop_callees(self, caller: str, reason: str) -> None:
        """Stop the runs ``caller`` asked that are still in flight (their own callees follow)."""
        with self._lock:
            callees = [run_id for run_id, by in self._caller.items() if by == caller]
        for run_id in callees:
            log.info("stopping run %s: %s", run_id, reason)
            self.table.stop_run(run_id, reason)

    def caller_ended(self, run_id: str) -> None:
        """A run ended: stop what it asked and still runs, and forget what it borrowed (a callee's is kept
        for its answer: its caller's budget covers its callees' tokens too)."""
        self.stop_callees(run_id, f"its caller, run {run_id}, ended")
        with self._lock:
            borrowed = self._borrowed.pop(run_id, 0)
            if run_id in self._caller:
                self._lent[run_id] = borrowed
