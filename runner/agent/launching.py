"""Plan a run, and run one in this process's care (`agentctl run` without a daemon).

``prepare`` reads what a run needs at the agent's applied revision: its spec, its scripted model
file, its custom tools, and the folders it must not touch. ``run_foreground`` hands the plan to an
executor (the local one by default) and records the run through a ``RunRecord``, exactly as the
daemon's process table does.
"""

from __future__ import annotations

import functools
import os
import signal
import sqlite3
import threading
from collections.abc import Callable
from pathlib import PurePosixPath
from typing import Any

from runner.agent.asking import Asks
from runner.agent.executor import Executor
from runner.agent.local import LocalExecutor
from runner.agent.recording import NO_LINKS, Links, LiveWriter, RunRecord, RunRow, new_run_id, stops_requested
from runner.errors import NotFoundError, OrchestratorError, SpecError
from runner.ledger.ingesting import flush
from runner.plan import RunPlan
from runner.reconcile.applied import load_applied
from runner.sandbox.confining import check_paths, runtime_overlaps
from runner.settings import Settings
from runner.source.git import GitSource
from runner.specs.checking import private_folders, protected_folders
from runner.specs.models import AgentSpec
from runner.state import connect
from runner.times import utcnow

MAX_SCRIPT = 1 << 20  # bytes of a scripted model file, as of a spec file


def prepare(settings: Settings, conn: sqlite3.Connection, source: GitSource, name: str, *,
            input: str | None = None, trigger: str = "manual", run_id: str | None = None,
            allow_suspended: bool = False, spec: AgentSpec | None = None) -> RunPlan:
    """The plan of a run of agent ``name`` at its applied revision; ``spec`` stands for the applied spec
    when given (an agent asked as a tool runs with its spec narrowed to its caller's)."""
    agents = load_applied(conn, settings.client_id, name)
    agent = agents.get(name)
    if agent is None:
        raise no_agent(conn, settings.client_id, name, " (run 'agentctl apply')")
    if agent.spec is None:
        raise SpecError(f"agent '{name}' has never had a valid spec: {agent.message}")
    spec = spec or agent.spec
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
        if tool.name not in BUILTIN_TOOLS and not (tool.agent or tool.remote_agent) and agent.applied_revision:
            path = str(PurePosixPath(folder) / "tools" / f"{tool.name}.py")
            custom[tool.name] = source.read_file(agent.applied_revision, path, limit=MAX_SCRIPT).decode(
                "utf-8", "replace")
    plan = RunPlan(run_id=run_id or new_run_id(), client_id=settings.client_id, agent=name,
                   revision=agent.applied_revision, spec=spec, settings=settings, trigger=trigger, input=input,
                   script=script, custom_sources=custom, private=list(_folders(settings)[1]))
    check_paths(plan, list(_folders(settings)[0]))
    return plan


def no_agent(conn: sqlite3.Connection, client_id: str, name: str, hint: str = "") -> NotFoundError:
    """The error for a name that is no agent of the client: a workflow's name says how to run it."""
    if load_applied(conn, client_id, name, kind="workflow"):
        return NotFoundError(f"'{name}' is a workflow, not an agent: 'agentctl workflow run {name}' runs it")
    return NotFoundError(f"no agent named '{name}' for client '{client_id}'{hint}")


@functools.lru_cache(maxsize=32)
def _folders(settings: Settings) -> tuple[tuple[tuple[str, str], ...], tuple[tuple[str, str], ...]]:
    """The folders no spec path may overlap, and those of them a runtime path overlaps: worked out once
    per settings (a few milliseconds of settings files and realpaths; a daemon restarts for new ones)."""
    return protected_folders(settings), tuple(runtime_overlaps(list(private_folders(settings))))


def start(plan: RunPlan, executor: Executor, asks: Asks, writer: LiveWriter, conn: sqlite3.Connection, *,
          queued_at: str, requested_by: str | None = None, retry_of: str | None = None, attempt: int = 1,
          on_end: Callable[[RunRow], None] | None = None,
          on_message: Callable[[dict[str, Any]], None] | None = None,
          step: tuple[str | None, str | None] = (None, None), links: Links = NO_LINKS) -> RunRecord:
    """Record the run as running (durably, first), then hand it to ``executor``: the one way a run starts,
    for the daemon's process table and a foreground run alike. A run its executor refuses ends failed.
    ``step``: the workflow run and step this run is, if it is one."""
    row = RunRow(plan.run_id, plan.client_id, plan.agent, plan.revision, plan.trigger, "queued", queued_at=queued_at,
                 input=plan.input, requested_by=requested_by, retry_of=retry_of, attempt=attempt,
                 workflow_run_id=step[0], step=step[1], **links.fields())
    record = RunRecord(writer, row, plan.settings.logs_dir, on_end=on_end, on_message=on_message)
    record.on_ask = functools.partial(asks.take, plan, record=record)
    record.begin(conn, getattr(executor, "name", "local"))
    try:
        executor.submit(plan, record)
    except OrchestratorError as exc:
        record.fail(f"the run could not start: {exc.message}")
    return record


def run_foreground(settings: Settings, source: GitSource, name: str, *, input: str | None = None,
                   trigger: str = "manual", requested_by: str | None = None, run_id: str | None = None,
                   executor: Executor | None = None, archive: bool = True,
                   on_message: Callable[[dict[str, Any]], None] | None = None) -> RunRow:
    """One run now, in this process's care. Ctrl-C (or SIGTERM, or `agentctl stop` from elsewhere)
    stops it. With ``archive``, the ledger is flushed after it (the CLI's job when no daemon runs)."""
    conn = connect(settings.state_path)
    interrupted = threading.Event()

    def on_signal(_signum: int, _frame: Any) -> None:
        interrupted.set()

    main = threading.current_thread() is threading.main_thread()  # signals reach the main thread only
    previous = {s: signal.signal(s, on_signal) for s in (signal.SIGINT, signal.SIGTERM)} if main else {}
    own = executor is None
    writer: LiveWriter | None = None
    asks: Asks | None = None
    try:
        plan = prepare(settings, conn, source, name, input=input, trigger=trigger, run_id=run_id)
        executor = executor or LocalExecutor(settings.kill_grace)
        writer = LiveWriter(settings.state_path)
        done: list[RunRow] = []
        ended = threading.Event()

        def on_end(row: RunRow) -> None:
            done.append(row)
            ended.set()

        asks = Asks(executor)
        start(plan, executor, asks, writer, conn, queued_at=utcnow(), requested_by=requested_by, on_end=on_end,
              on_message=on_message)
        stopping = False
        while not ended.wait(0.2):
            if not stopping and (interrupted.is_set() or plan.run_id in stops_requested(conn, plan.client_id)):
                executor.stop(plan.run_id)
                stopping = True
        writer.settle()
        if archive:
            flush(conn, settings.ledger_path)
        return done[0]
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
        if writer is not None:
            writer.close()
        if asks is not None:
            asks.close()
        if own and executor is not None:
            executor.close()
        conn.close()
