"""How a workflow run looks on a terminal, and following one until it ends or waits for a person.

A workflow run is read from the state database (``runner.ledger.workflows.get_workflow_run``), whoever runs
it: the daemon writes, this process only reads, every ``EVERY`` seconds. Following ends when the run has a
final status, or when all it can do is wait for a person: a step waits for an approval, no step's run is in
flight, and no pending step is ready (every step it needs succeeded or was skipped). A step ready but not yet
submitted means the engine is about to start it, so following goes on: stopping there would say "waiting"
for a workflow that is still running.
"""

from __future__ import annotations

import json
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from typing import Any

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.table import Table
from rich.text import Text

from runner.cli.runs import esc
from runner.errors import OrchestratorError, TransientError
from runner.settings import Settings
from runner.times import parse, utcnow

# A workflow run's states (docs/workflows.md): `running`, then one of the final ones. "interrupted" is
# final for whoever follows it: the daemon died under it, and resumes it at its next start.
WORKFLOW_FINAL = ("succeeded", "failed", "timed_out", "budget_exceeded", "stopped", "interrupted")
WORKFLOW_STATUSES = ("running", *WORKFLOW_FINAL)
IN_FLIGHT = ("queued", "running")
DONE_FOR_NEEDS = ("succeeded", "skipped")  # what lets the steps that need it run

EVERY = 0.25  # seconds between two reads of a workflow run being followed
DAEMON_CHECK = 1.0  # seconds between two looks at whether the daemon still runs


# -- following ---------------------------------------------------------------------------------------------


def follow(settings: Settings, conn: sqlite3.Connection, workflow_run_id: str, *, live: bool,
           console: Console | None = None) -> dict[str, Any]:
    """The workflow run once it has ended or waits for a person (then its ``status`` says ``waiting`` and
    ``waiting_for`` names the steps). On a terminal (``live``) its steps are shown as they change.

    The daemon is the only one who moves it on: when it stops meanwhile, a TransientError says so (the run
    goes on at the daemon's next start), rather than a wait for ever."""
    console = console or Console(highlight=False)
    if not live:
        return _poll(settings, conn, workflow_run_id, lambda _run: None)
    with Live(console=console, auto_refresh=False, transient=False, redirect_stdout=False) as screen:
        def show(run: dict[str, Any] | None) -> None:
            starting = Text(f"workflow run {workflow_run_id}: starting")
            screen.update(render_run(run, max_items=8, hints=False) if run is not None else starting, refresh=True)

        return _poll(settings, conn, workflow_run_id, show)


def _poll(settings: Settings, conn: sqlite3.Connection, workflow_run_id: str,
          show: Callable[[dict[str, Any] | None], None]) -> dict[str, Any]:
    from runner.supervise.owning import running_daemon

    checked = time.monotonic()
    while True:
        run = read_run(settings, conn, workflow_run_id)
        if run is not None and (waiting := waiting_for_person(run)):
            run = {**run, "status": "waiting", "waiting_for": waiting}
        show(run)
        if run is not None and run["status"] in (*WORKFLOW_FINAL, "waiting"):
            return run
        if time.monotonic() - checked >= DAEMON_CHECK:
            checked = time.monotonic()
            if running_daemon(settings.home) is None:
                raise TransientError(f"the daemon stopped before workflow run {workflow_run_id} ended: it goes on "
                                     "when the daemon starts again ('agentctl serve'); 'agentctl workflow status "
                                     f"{workflow_run_id}' shows where it is")
        time.sleep(EVERY)


def read_run(settings: Settings, conn: sqlite3.Connection, workflow_run_id: str) -> dict[str, Any] | None:
    """The workflow run as the state database has it now, or None (not written yet, or the database was busy
    for a moment: the next read takes it)."""
    from runner.ledger.workflows import get_workflow_run

    try:
        return get_workflow_run(conn, settings.client_id, workflow_run_id)
    except (OrchestratorError, sqlite3.OperationalError):
        return None


def waiting_for_person(run: dict[str, Any]) -> list[str]:
    """The steps of a workflow run still running that wait for an approval, when nothing else can move it on;
    else [] (see the module's note)."""
    if run["status"] in WORKFLOW_FINAL or run.get("closing"):  # closing: its end is decided, it ends in a moment
        return []
    steps = run.get("steps") or []
    status = {s["step"]: s["status"] for s in steps}
    waiting = [s["step"] for s in steps if s["status"] == "waiting"]
    if not waiting or any(s["status"] in IN_FLIGHT for s in steps):
        return []
    ready = [s for s in steps if s["status"] == "pending"
             and all(status.get(need) in DONE_FOR_NEEDS for need in s.get("needs") or [])]
    return [] if ready else waiting


# -- rendering ---------------------------------------------------------------------------------------------


def render_run(run: dict[str, Any], *, max_items: int | None = None, hints: bool = True) -> RenderableType:
    """A workflow run for people: what it is and where it stands, a table of its steps (one row per step,
    one more per item of a fan-out, up to ``max_items``), its approvals, and (``hints``) how to approve what
    waits."""
    parts: list[RenderableType] = [Text.from_markup(line) for line in header_lines(run)]
    parts.append(steps_table(run, max_items))
    parts += [Text.from_markup(line) for line in approval_lines(run, hints)]
    return Group(*parts)


def header_lines(run: dict[str, Any]) -> list[str]:
    wid = run["workflow_run_id"]
    attempt = f", attempt {run['attempt']}" if (run.get("attempt") or 1) > 1 else ""
    lines = [f"[bold]workflow run {esc(wid)}[/bold] of {esc(run['workflow'])}: {status_markup(run['status'])}"
             f"{attempt}"]
    who = f" by {esc(run['requested_by'])}" if run.get("requested_by") else ""
    lines.append(f"  {esc(run.get('trigger') or 'manual')} run{who}, revision {(run.get('spec_revision') or '-')[:12]}"
                 f", {timings(run)}")
    tokens = (run.get("input_tokens") or 0) + (run.get("output_tokens") or 0)
    lines.append(f"  {tokens} tokens ({run.get('input_tokens') or 0} in, {run.get('output_tokens') or 0} out)"
                 + (f", deadline {run['deadline']}" if run.get("deadline") and run["status"] == "running" else ""))
    inputs = run.get("inputs") or {}
    if inputs:
        lines.append("  inputs: " + ", ".join(f"{esc(k)}={esc(short(v, 60))}" for k, v in inputs.items()))
    if run.get("error"):
        lines.append(f"  [red]error[/red]: {esc(run['error'])}")
    return lines


def timings(run: dict[str, Any]) -> str:
    """``started T, ended T (S s)``, or ``started T, S s so far`` while it runs."""
    started, ended = run.get("started_at"), run.get("ended_at")
    if not started:
        return "not started"
    seconds = _seconds(started, ended or utcnow())
    if ended:
        return f"started {started}, ended {ended}" + (f" ({duration(seconds)})" if seconds is not None else "")
    return f"started {started}" + (f", {duration(seconds)} so far" if seconds is not None else "")


def duration(seconds: float) -> str:
    """``4.2 s``, ``3 min 12 s``, ``2 h 05 min``: as precise as a person reads it."""
    if seconds < 60:
        return f"{max(seconds, 0):.1f} s"
    minutes, secs = divmod(int(seconds), 60)
    if minutes < 60:
        return f"{minutes} min {secs:02d} s"
    return f"{minutes // 60} h {minutes % 60:02d} min"


def steps_table(run: dict[str, Any], max_items: int | None = None) -> Table:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("STEP", "AGENT", "NEEDS", "STATE", "RUNS", "ERROR"):
        table.add_column(col, overflow="fold", no_wrap=col in ("STEP", "STATE"))
    approvals = {a["step"]: a for a in run.get("approvals") or []}
    for step in run.get("steps") or []:
        runs = step.get("runs") or []
        fan_out = len(runs) > 1 or any(r.get("item") is not None for r in runs)
        if step.get("approval") or step.get("agent") is None:
            what = approval_text(approvals.get(step["step"]), step["status"])
        elif fan_out:
            what = items_summary(runs)
        else:
            what = run_text(runs[0]) if runs else "-"
        error = step.get("error") or (runs[0].get("error") if len(runs) == 1 else None)
        table.add_row(esc(step["step"]), esc(step.get("agent") or "approval"),
                      esc(", ".join(step.get("needs") or []) or "-"), status_markup(step["status"]), what,
                      f"[red]{esc(short(error, 300))}[/red]" if error else "")
        if fan_out:
            shown = _items_shown(runs, max_items)
            for item in shown:
                label = f"  [{item.get('index', '?')}] {short(item.get('item'), 40)}"
                table.add_row(esc(label), "", "", status_markup(item.get("status") or "pending"), run_text(item),
                              f"[red]{esc(short(item['error'], 300))}[/red]" if item.get("error") else "")
            if len(shown) < len(runs):
                table.add_row(f"  ... {len(runs) - len(shown)} more", "", "", "", "", "")
    return table


def _items_shown(runs: list[dict[str, Any]], max_items: int | None) -> list[dict[str, Any]]:
    """The items of a fan-out to show a row for: all of them, or up to ``max_items``, those not succeeded first
    (what is running or went wrong is what a person following it looks for), in their order."""
    if max_items is None or len(runs) <= max_items:
        return runs
    first = [i for i, r in enumerate(runs) if r.get("status") != "succeeded"][:max_items]
    rest = [i for i, r in enumerate(runs) if r.get("status") == "succeeded"][:max_items - len(first)]
    return [runs[i] for i in sorted(first + rest)]


def approval_lines(run: dict[str, Any], hints: bool = True) -> list[str]:
    lines = []
    for a in run.get("approvals") or []:
        word = "[green]approved[/green]" if a.get("approved") else "[red]rejected[/red]"
        comment = f": {esc(a['comment'])}" if a.get("comment") else ""
        lines.append(f"  step {esc(a['step'])} {word} by {esc(a.get('by') or '-')} at {a.get('at') or '-'}{comment}")
    if lines:
        lines.insert(0, "approvals")
    if hints and run["status"] == "running":
        lines += [f"[yellow]step {esc(s['step'])} waits for a person[/yellow]"
                  + (f" ({esc(s['message'])})" if s.get("message") else "")
                  + f": {esc(approve_command(run['workflow_run_id'], s['step']))}"
                  for s in run.get("steps") or [] if s["status"] == "waiting"]
    return lines


def approve_command(workflow_run_id: str, step: str) -> str:
    return f"agentctl approve {workflow_run_id} {step} (or --reject, with --comment TEXT)"


def run_text(run: dict[str, Any]) -> str:
    """A step's run (or one item's): its id, and its attempt past the first."""
    if not run.get("run_id"):
        return "-"
    attempt = f" (attempt {run['attempt']})" if (run.get("attempt") or 1) > 1 else ""
    return esc(f"{run['run_id']}{attempt}")


def items_summary(runs: list[dict[str, Any]]) -> str:
    counts = Counter(r.get("status") or "pending" for r in runs)
    return esc(f"{len(runs)} item{'s' if len(runs) != 1 else ''}: "
               + ", ".join(f"{n} {status}" for status, n in counts.most_common()))


def approval_text(approval: dict[str, Any] | None, status: str) -> str:
    if approval is None:
        return "waiting for a person" if status == "waiting" else "-"
    word = "approved" if approval.get("approved") else "rejected"
    return esc(f"{word} by {approval.get('by') or '-'}")


def status_markup(status: str) -> str:
    colour = ("green" if status == "succeeded" else "yellow" if status in ("queued", "running", "waiting")
              else "dim" if status in ("pending", "skipped") else "red")
    return f"[{colour}]{esc(status)}[/{colour}]"


def short(value: Any, width: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False, default=str)
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[:width - 3] + "..."


def _seconds(start: str, end: str) -> float | None:
    try:
        return (parse(end) - parse(start)).total_seconds()
    except ValueError:
        return None


def tokens_of(run: dict[str, Any]) -> int:
    return int(run.get("input_tokens") or 0) + int(run.get("output_tokens") or 0)
