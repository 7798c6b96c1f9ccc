"""Commands on agents and their runs: status, start, stop, history, tools, serve."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from runner.cli.main import App, cli, pass_app
from runner.errors import NotFoundError
from runner.ledger.ingesting import flush
from runner.ledger.reading import query
from runner.reconcile.applied import AppliedAgent, load_applied, set_suspended
from runner.specs.catalog import BUILTIN_TOOLS
from runner.supervise.scheduling import next_fire


@cli.command()
@click.argument("name", required=False)
@pass_app
def status(app: App, name: str | None) -> None:
    """Agents with their state, revision, last and next run."""
    agents = load_applied(app.conn, app.settings.client_id, name)
    if name and not agents:
        raise NotFoundError(f"no agent named '{name}' for client '{app.settings.client_id}'")
    last = last_runs(app)
    source = app.conn.execute("SELECT * FROM sources WHERE client_id = ?", (app.settings.client_id,)).fetchone()
    rows = [agent_row(a, last.get(a.name)) for a in agents.values()]
    from runner.sandbox import capabilities

    data = {"client_id": app.settings.client_id, "source": dict(source) if source else None, "agents": rows,
            "sandbox": {"mode": app.settings.sandbox, **capabilities.detect()}}
    app.emit(data, lambda: _print_status(data))


def agent_row(a: AppliedAgent, last: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "name": a.name, "state": a.state, "revision": (a.applied_revision or "")[:12],
        "generation": a.generation, "last_run": last, "next_run": next_run(a), "message": a.message,
        "conditions": a.conditions, "path": a.path, "suspended": a.suspended,
    }


def next_run(a: AppliedAgent) -> str | None:
    spec = a.spec_dict
    if not spec or a.suspended or not spec.get("enabled", True):
        return None
    now = datetime.now(UTC)
    times = [next_fire(t["cron"], t.get("timezone", "UTC"), now)
             for t in spec.get("triggers", []) if t.get("type") == "schedule"]
    return min(times).isoformat(timespec="seconds") if times else None


def last_runs(app: App) -> dict[str, dict[str, Any]]:
    flush(app.conn, app.settings.ledger_path)
    cols, rows = query(app.settings.ledger_path,
                       "SELECT agent, run_id, status, started_at, ended_at FROM runs WHERE client_id = ? "
                       "QUALIFY row_number() OVER (PARTITION BY agent ORDER BY coalesce(started_at, queued_at) "
                       "DESC) = 1", [app.settings.client_id])
    return {r[0]: dict(zip(cols[1:], r[1:], strict=True)) for r in rows}


def _print_status(data: dict[str, Any]) -> None:
    console = Console(width=160 if not sys.stdout.isatty() else None)
    src = data["source"]
    if src:
        line = f"source {src['location']} at {(src['revision'] or '-')[:12]}, reconciled {src['reconciled_at']}"
        console.print(line, highlight=False)
        if src.get("error"):
            console.print(f"[red]last source error:[/red] {src['error']}", highlight=False)
    sb = data["sandbox"]
    console.print(f"sandbox {sb['mode']}: files {sb['filesystem']}, network {sb['network']}, "
                  f"processes {sb['process_limit']}", highlight=False)
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("NAME", "STATE", "REVISION", "LAST RUN", "NEXT RUN", "MESSAGE"):
        table.add_column(col, overflow="fold" if col == "MESSAGE" else "ellipsis", no_wrap=col != "MESSAGE")
    for row in data["agents"]:
        last = row["last_run"]
        last_text = f"{last['status']} {str(last['started_at'] or '')[:19]}" if last else "-"
        table.add_row(row["name"], row["state"], row["revision"] or "-", last_text, row["next_run"] or "-",
                      row["message"])
    if not data["agents"]:
        console.print("no agents applied yet: run 'agentctl apply'")
    else:
        console.print(table)
    for bad in json.loads(src["invalid"] or "[]") if src else []:
        console.print(f"[red]invalid file[/red] {bad['file']}: {'; '.join(bad['problems'][:1])}", highlight=False)


@cli.command()
@click.argument("name")
@pass_app
def start(app: App, name: str) -> None:
    """Resume an agent and run it now (through the daemon when one runs, else here)."""
    from runner.agent.launching import run_foreground
    from runner.cli.runs import ask_daemon
    from runner.reconcile.reconciling import open_source

    answer = ask_daemon(app, {"op": "start", "agent": name, "requested_by": "cli:start", "wait": False})
    if answer is not None:
        app.emit({"name": name, "suspended": False, "run_id": answer["run_id"]},
                 lambda: click.echo(f"{name} resumed; run {answer['run_id']} queued"))
        return
    _suspend(app, name, False, quiet=True)
    row = run_foreground(app.settings, open_source(app.settings), name, requested_by="cli:start")
    app.emit({"name": name, "suspended": False, "run_id": row.run_id, "status": row.status},
             lambda: click.echo(f"{name} resumed; run {row.run_id} {row.status}"))


@cli.command()
@click.argument("name")
@pass_app
def stop(app: App, name: str) -> None:
    """Suspend an agent (its triggers stop firing) and stop its runs."""
    from runner.cli.runs import ask_daemon

    answer = ask_daemon(app, {"op": "stop", "agent": name})
    if answer is not None:
        stopping = int(answer.get("stopping_runs", 0))
        app.emit({"name": name, "suspended": True, "stopping_runs": stopping},
                 lambda: click.echo(f"{name} suspended" + (f", stopping {stopping} run(s)" if stopping else "")))
        return
    _suspend(app, name, True)


def _suspend(app: App, name: str, suspended: bool, quiet: bool = False) -> None:
    from runner.agent.launching import request_stop

    if not set_suspended(app.conn, app.settings.client_id, name, suspended):
        raise NotFoundError(f"no agent named '{name}' for client '{app.settings.client_id}'")
    stopping = request_stop(app.conn, app.settings.client_id, name) if suspended else 0
    word = "suspended" if suspended else "resumed"
    extra = f", stopping {stopping} run(s)" if stopping else ""
    if not quiet:
        app.emit({"name": name, "suspended": suspended, "stopping_runs": stopping},
                  lambda: click.echo(f"{name} {word}{extra}"))


@cli.command()
@click.option("--agent", help="Only this agent's runs.")
@click.option("--status", "status_", help="Only runs with this status.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--sql", help="Any read-only SQL over the ledger (tables runs, run_events, reconciles, audit).")
@click.option("--reconciles", is_flag=True, help="List reconciles instead of runs.")
@pass_app
def history(app: App, agent: str | None, status_: str | None, limit: int, sql: str | None,
            reconciles: bool) -> None:
    """Run history from the DuckDB ledger."""
    flush(app.conn, app.settings.ledger_path)
    if sql:
        cols, rows = query(app.settings.ledger_path, sql)
    elif reconciles:
        cols, rows = query(app.settings.ledger_path,
                           "SELECT revision, started_at, created, updated, deleted, invalid, initiator, error "
                           "FROM reconciles WHERE client_id = ? ORDER BY started_at DESC LIMIT ?",
                           [app.settings.client_id, limit])
    else:
        where, params = ["client_id = ?"], [app.settings.client_id]
        if agent:
            where.append("agent = ?")
            params.append(agent)
        if status_:
            where.append("status = ?")
            params.append(status_)
        cols, rows = query(app.settings.ledger_path,
                           "SELECT run_id, agent, status, trigger, started_at, ended_at, input_tokens, "
                           "output_tokens, error FROM runs WHERE " + " AND ".join(where)
                           + " ORDER BY coalesce(started_at, queued_at) DESC LIMIT ?", [*params, limit])
    records = [dict(zip(cols, r, strict=True)) for r in rows]
    app.emit(records, lambda: _print_rows(cols, rows))


def _print_rows(cols: list[str], rows: list[tuple[Any, ...]]) -> None:
    table = Table(box=None, pad_edge=False, header_style="bold")
    for c in cols:
        table.add_column(c.upper())
    for r in rows:
        table.add_row(*("-" if v is None else str(v) for v in r))
    Console(width=200 if not sys.stdout.isatty() else None).print(table)


@cli.command()
@pass_app
def tools(app: App) -> None:
    """Builtin and custom tools with their permissions."""
    rows: list[dict[str, Any]] = [
        {"name": t.name, "kind": "builtin", "permissions": sorted(t.allowed), "needs": sorted(t.needs),
         "summary": t.summary} for t in BUILTIN_TOOLS.values()]
    rows.extend(custom_tool_rows(app))

    def text() -> None:
        table = Table(box=None, pad_edge=False, header_style="bold")
        for c in ("NAME", "KIND", "PERMISSIONS", "SUMMARY"):
            table.add_column(c)
        for r in rows:
            table.add_row(r["name"], r["kind"], ",".join(r["permissions"]) or "-", r["summary"])
        Console().print(table)
    app.emit(rows, text)


def custom_tool_rows(app: App) -> list[dict[str, Any]]:
    from runner.errors import OrchestratorError
    from runner.reconcile.reconciling import open_source
    from runner.specs.validating import custom_tools_of

    try:
        src = open_source(app.settings)
        files = src.files(src.revision(fetch=False))
    except OrchestratorError:
        return []
    return [{"name": t.name, "kind": "custom", "permissions": sorted(t.allowed), "needs": sorted(t.needs),
             "summary": t.error or "custom tool (tools/" + t.name + ".py)"} for t in custom_tools_of(files).values()]


@cli.command()
@click.option("--host", help="Address to listen on (AGENT_ORCH_HOST).")
@click.option("--port", type=int, help="Port to listen on (AGENT_ORCH_PORT).")
@pass_app
def serve(app: App, host: str | None, port: int | None) -> None:
    """The daemon: follows the spec source and keeps the applied state in step."""
    from runner.api.app import create_app
    from runner.settings import Settings
    from runner.supervise.daemon import Daemon, setup_logging

    settings = Settings.load(app.home, app.client_id, host=host, port=port)
    setup_logging(settings)
    Daemon(settings, app_factory=create_app).run()


@cli.group()
def token() -> None:
    """API tokens: create, list, revoke."""


class Duration(click.ParamType[timedelta, "str | timedelta"]):
    """A token's lifetime, like 30m, 12h, 7d or 90d; a bad one is a usage error (exit 2) naming the option."""

    name = "duration"

    def convert(self, value: str | timedelta, param: click.Parameter | None, ctx: click.Context | None) -> timedelta:
        from runner.api.tokens import parse_duration

        if isinstance(value, timedelta):
            return value
        try:
            return parse_duration(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


@token.command("create")
@click.option("--role", type=click.Choice(["viewer", "operator", "admin"]), required=True)
@click.option("--name", help="Who or what uses it (the author of commits it makes); default: the role.")
@click.option("--expires", type=Duration(), metavar="DURATION",
              help="Lifetime: 30m, 12h, 7d, 2w (minutes, hours, days, weeks). Default: it never expires.")
@pass_app
def token_create(app: App, role: str, name: str | None, expires: timedelta | None) -> None:
    """Create an API token for the client; it is shown once."""
    from runner.api import tokens

    made = tokens.create(app.conn, app.settings.client_id, role, name or role, expires)  # type: ignore[arg-type]
    app.emit({"token": made.token, "id": made.id, "name": name or role, "role": role,
              "client_id": app.settings.client_id, "expires_at": made.expires_at},
             lambda: click.echo(made.token))


@token.command("list")
@pass_app
def token_list(app: App) -> None:
    """The client's tokens: id, name, role, created, expires, last used (never the token itself)."""
    from runner.api import tokens

    rows = tokens.listed(app.conn, app.settings.client_id)

    def text() -> None:
        table = Table(box=None, pad_edge=False, header_style="bold")
        for c in ("ID", "NAME", "ROLE", "CREATED", "EXPIRES", "LAST USED"):
            table.add_column(c, no_wrap=True)
        for r in rows:
            expires = (r["expires_at"] or "never") + (" (expired)" if r["expired"] else "")
            table.add_row(r["id"], r["name"], r["role"], r["created_at"], expires, r["last_used_at"] or "-")
        if rows:
            Console(width=200 if not sys.stdout.isatty() else None).print(table)
        else:
            click.echo(f"no tokens for client '{app.settings.client_id}': agentctl token create --role ...")

    app.emit(rows, text)


@token.command("revoke")
@click.argument("token_id", metavar="ID")
@pass_app
def token_revoke(app: App, token_id: str) -> None:
    """Revoke a token by its id (from `agentctl token list`): it is refused from its next request on."""
    from runner.api import tokens

    if not tokens.revoke(app.conn, app.settings.client_id, token_id):
        raise NotFoundError(f"no token with id '{token_id}' for client '{app.settings.client_id}'")
    app.emit({"id": token_id, "revoked": True}, lambda: click.echo(f"revoked {token_id}"))
