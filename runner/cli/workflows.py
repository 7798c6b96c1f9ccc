"""Commands on workflows: `workflow run|status|list|resume|cancel`, and `approve`.

Workflows run in the daemon only (docs/workflows.md): run, resume, cancel and approve ask it over the control
socket, and say to start it when none runs; status and list read the state database, with or without one.

`workflow list` lists workflow runs, as the API's `GET /workflow-runs` does; `workflow list --defined` lists
the applied workflows instead (`GET /workflows`), as `history --reconciles` switches what `history` lists.
"""

from __future__ import annotations

import getpass
import sys
from typing import Any

import click

from runner.cli.main import App, cli, console, pass_app, table_of
from runner.cli.runs import esc
from runner.cli.workflow_views import (
    WORKFLOW_STATUSES,
    approve_command,
    follow,
    render_run,
    short,
    status_markup,
    tokens_of,
)
from runner.errors import NotFoundError, UsageError
from runner.specs.checking import did_you_mean
from runner.supervise.control import check_input


@cli.group()
def workflow() -> None:
    """Workflows: DAGs of agent runs and approvals (`kind: workflow` specs), run by the daemon."""


@workflow.command("run")
@click.argument("name")
@click.option("--input", "inputs", multiple=True, metavar="KEY=VALUE",
              help="A workflow input, as text (repeat it for each input; KEY= gives an empty value).")
@click.option("--detach", is_flag=True, help="Return once the daemon has started it, without following it.")
@pass_app
def workflow_run(app: App, name: str, inputs: tuple[str, ...], detach: bool) -> None:
    """Start a workflow in the daemon and follow it until it ends or waits for an approval.

    On a terminal its steps are shown as they change (not with --output json, nor into a pipe). Exit 0 when it
    succeeded, waits for an approval, or with --detach; 1 when it ended otherwise; 2 on an error."""
    given = parse_inputs(inputs)
    answer = ask(app, {"op": "workflow.run", "workflow": name, "inputs": given, "requested_by": "cli"})
    workflow_run_id = str(answer["workflow_run_id"])
    if detach:
        started = {"workflow_run_id": workflow_run_id, "workflow": name, "status": answer.get("status") or "running"}
        app.emit(started, lambda: click.echo(f"workflow run {workflow_run_id} of {name} {started['status']}: "
                                             f"'agentctl workflow status {workflow_run_id}' shows it"))
        return
    ended = _followed(app, workflow_run_id)
    app.emit(ended, lambda: _print_outcome(ended))
    sys.exit(0 if ended["status"] in ("succeeded", "waiting") else 1)


def parse_inputs(given: tuple[str, ...]) -> dict[str, str]:
    """``--input KEY=VALUE`` options as a mapping; a malformed or repeated one is a usage error."""
    found: dict[str, str] = {}
    for text in given:
        key, sep, value = text.partition("=")
        key = key.strip()
        if not sep or not key:
            raise UsageError(f"--input {short(text, 60)!r}: give KEY=VALUE (KEY= for an empty value)")
        if key in found:
            raise UsageError(f"--input {key} is given twice")
        value = value.encode("utf-8", "replace").decode("utf-8")  # argv may carry bytes that are not UTF-8
        check_input(value, f"--input {key}")
        found[key] = value
    return found


def ask(app: App, request: dict[str, Any], why: str = "workflows run in the daemon only") -> dict[str, Any]:
    """The daemon's answer to ``request``; a refusal is raised as our error (exit 2), as is no daemon at all
    (``why`` says why the daemon is needed)."""
    from runner.cli.runs import ask_daemon

    answer = ask_daemon(app, request)
    if answer is None:
        raise UsageError(f"no daemon runs for this home ({app.settings.home}): {why}; start it with 'agentctl serve'")
    return answer


def _followed(app: App, workflow_run_id: str) -> dict[str, Any]:
    """The workflow run once it ended or waits for a person, shown live on a terminal; Ctrl-C stops following,
    not the workflow (and says so)."""
    live = not app.json and sys.stdout.isatty()
    try:
        return follow(app.settings, app.conn, workflow_run_id, live=live)
    except KeyboardInterrupt:
        click.echo(f"the workflow goes on in the daemon: 'agentctl workflow status {workflow_run_id}' shows it, "
                   f"'agentctl workflow cancel {workflow_run_id}' stops it", err=True)
        raise


def _print_outcome(run: dict[str, Any]) -> None:
    """After following: the run's steps (unless they were just shown live), then one line of outcome."""
    if not sys.stdout.isatty():
        console().print(render_run(run, hints=False))
    wid = run["workflow_run_id"]
    if run["status"] == "waiting":
        asks = {s["step"]: s.get("message") for s in run.get("steps") or []}
        for step in run.get("waiting_for") or []:
            what = f" ({asks[step]})" if asks.get(step) else ""
            click.echo(f"workflow run {wid} waits for an approval of step {step}{what}: {approve_command(wid, step)}")
        return
    click.echo(f"workflow run {wid} of {run['workflow']} {run['status']} ({tokens_of(run)} tokens)")
    if run.get("error") and run["status"] != "succeeded":
        click.echo(f"error: {run['error']}", err=True)


@workflow.command("status")
@click.argument("workflow_run_id", metavar="RUN_ID")
@click.option("--watch", "-w", is_flag=True,
              help="Keep showing it until it ends or waits for an approval (exit codes then as `workflow run`).")
@pass_app
def workflow_status(app: App, workflow_run_id: str, watch: bool) -> None:
    """A workflow run: its status, attempt, revision, tokens and timings, each step with its agent, needs,
    state, runs (one per item of a fan-out) and error, and its approvals."""
    from runner.cli.workflow_views import read_run

    found = read_run(app.settings, app.conn, workflow_run_id)
    if found is None:
        raise NotFoundError(f"no workflow run '{workflow_run_id}' for client '{app.settings.client_id}'")
    if not watch:
        app.emit(found, lambda: console().print(render_run(found)))
        return
    ended = _followed(app, workflow_run_id)
    app.emit(ended, lambda: _print_outcome(ended))
    sys.exit(0 if ended["status"] in ("succeeded", "waiting") else 1)


class WorkflowState(click.Choice[str]):
    """A workflow run's state; a misspelt one is a usage error with the nearest state."""

    def __init__(self) -> None:
        super().__init__(list(WORKFLOW_STATUSES))

    def get_invalid_choice_message(self, value: Any, ctx: click.Context | None) -> str:
        return (f"'{value}' is not a workflow run state ({', '.join(map(str, self.choices))})"
                f"{did_you_mean(str(value), map(str, self.choices))}")


@workflow.command("list")
@click.option("--workflow", "name", metavar="NAME", help="Only this workflow's runs (with --defined: only it).")
@click.option("--status", "status_", type=WorkflowState(), metavar="STATE", help="Only runs in this state.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--defined", is_flag=True, help="List the applied workflows instead of their runs.")
@pass_app
def workflow_list(app: App, name: str | None, status_: str | None, limit: int, defined: bool) -> None:
    """Workflow runs, newest first; or, with --defined, the applied workflows."""
    if defined:
        if status_ is not None:
            raise UsageError("--status filters runs: it does not go with --defined")
        _list_defined(app, name)
        return
    from runner.ledger.workflows import list_workflow_runs

    runs = list_workflow_runs(app.conn, app.settings.client_id, workflow=name, status=status_, limit=limit)

    def text() -> None:
        table = table_of("WORKFLOW RUN", "WORKFLOW", "STATUS", "ATTEMPT", "TRIGGER", "STARTED", "ENDED", "TOKENS",
                       "ERROR")
        for r in runs:
            table.add_row(esc(r["workflow_run_id"]), esc(r["workflow"]), status_markup(r["status"]),
                          str(r.get("attempt") or 1), esc(r.get("trigger") or "-"), r.get("started_at") or "-",
                          r.get("ended_at") or "-", str(tokens_of(r)),
                          esc(short(r["error"], 80)) if r.get("error") else "")
        if runs:
            console().print(table)
        else:
            click.echo("no workflow runs yet: 'agentctl workflow run NAME' starts one", err=True)

    app.emit(runs, text)


def _list_defined(app: App, name: str | None) -> None:
    from runner.ledger.workflows import list_workflow_runs
    from runner.reconcile.applied import load_applied

    applied = load_applied(app.conn, app.settings.client_id, name, kind="workflow")
    if name and not applied:
        raise NotFoundError(f"no workflow named '{name}' for client '{app.settings.client_id}'")
    rows: list[dict[str, Any]] = []
    for w in applied.values():
        spec = w.spec_dict or {}
        last = list_workflow_runs(app.conn, app.settings.client_id, workflow=w.name, limit=1)
        rows.append({"name": w.name, "state": w.state, "revision": (w.applied_revision or "")[:12],
                     "steps": [s.get("id") for s in spec.get("steps") or []],
                     "inputs": dict(spec.get("inputs") or {}),
                     "triggers": [t.get("type") for t in spec.get("triggers") or []],
                     "last_run": ({k: last[0][k] for k in ("workflow_run_id", "status", "started_at", "ended_at")}
                                  if last else None),
                     "message": w.message, "path": w.path})

    def text() -> None:
        table = table_of("NAME", "STATE", "REVISION", "STEPS", "INPUTS", "TRIGGERS", "LAST RUN", "MESSAGE")
        for r in rows:
            last = r["last_run"]
            table.add_row(esc(r["name"]), r["state"], r["revision"] or "-", str(len(r["steps"])),
                          esc(", ".join(r["inputs"]) or "-"), esc(", ".join(map(str, r["triggers"])) or "-"),
                          f"{last['status']} {str(last['started_at'] or '')[:19]}" if last else "-", esc(r["message"]))
        if rows:
            console().print(table)
        else:
            click.echo("no workflows applied yet: add a 'kind: workflow' spec and run 'agentctl apply'", err=True)

    app.emit(rows, text)


@workflow.command("resume")
@click.argument("workflow_run_id", metavar="RUN_ID")
@click.option("--from", "from_step", metavar="STEP", help="Run this step and every step after it again too.")
@click.option("--at-head", is_flag=True, help="Use the workflow's spec as applied now, not the revision it "
              "started with.")
@pass_app
def workflow_resume(app: App, workflow_run_id: str, from_step: str | None, at_head: bool) -> None:
    """Run a workflow run again under the same id (its attempt goes up): its failed, stopped, interrupted and
    never-run steps; succeeded steps are kept."""
    answer = ask(app, {"op": "workflow.resume", "id": workflow_run_id, "from": from_step, "at_head": at_head,
                       "requested_by": "cli"})
    data = _answered(answer, workflow_run_id)
    attempt = f" (attempt {data['attempt']})" if data.get("attempt") else ""
    app.emit(data, lambda: click.echo(f"workflow run {data['workflow_run_id']} resumed{attempt}: {data['status']}; "
                                      f"'agentctl workflow status {data['workflow_run_id']} --watch' follows it"))


@workflow.command("cancel")
@click.argument("workflow_run_id", metavar="RUN_ID")
@pass_app
def workflow_cancel(app: App, workflow_run_id: str) -> None:
    """Cancel a workflow run: its runs in flight are stopped, and it ends `stopped`."""
    answer = ask(app, {"op": "workflow.cancel", "id": workflow_run_id, "requested_by": "cli"})
    data = _answered(answer, workflow_run_id)
    stopping = int(data.get("stopping_runs") or 0)
    said = f"cancelled, stopping {stopping} run(s)" if stopping and data["status"] == "running" else data["status"]
    app.emit(data, lambda: click.echo(f"workflow run {data['workflow_run_id']} {said}"))


@cli.command()
@click.argument("workflow_run_id", metavar="WORKFLOW_RUN_ID")
@click.argument("step")
@click.option("--reject", is_flag=True, help="Reject instead of approve.")
@click.option("--comment", help="Why, recorded with the decision.")
@pass_app
def approve(app: App, workflow_run_id: str, step: str, reject: bool, comment: str | None) -> None:
    """Approve (or --reject) a workflow step that waits for a person."""
    answer = ask(app, {"op": "approve", "id": workflow_run_id, "step": step, "approve": not reject,
                       "comment": comment, "requested_by": _who()})
    data = {**_answered(answer, workflow_run_id), "step": step, "approved": not reject}
    word = "rejected" if reject else "approved"
    app.emit(data, lambda: click.echo(f"step {step} of workflow run {data['workflow_run_id']} {word}; the workflow "
                                      f"is {data['status']}"))


def _answered(answer: dict[str, Any], workflow_run_id: str) -> dict[str, Any]:
    """The daemon's answer without its ``ok``, with the run's id and status whatever else it says."""
    data = {k: v for k, v in answer.items() if k != "ok"}
    data.setdefault("workflow_run_id", workflow_run_id)
    data.setdefault("status", "running")
    return data


def _who() -> str:
    """Who approves, for the approvals' ``by``: the CLI and the user running it (the control socket is only
    open to the daemon's user, but several people may share it)."""
    try:
        return f"cli:{getpass.getuser()}"
    except (KeyError, OSError):  # no login name and no passwd entry (a bare container)
        return "cli"


