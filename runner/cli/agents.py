"""Commands on agents and their runs: status, start, stop, history, tools, serve."""

from __future__ import annotations

import json
import sys
from datetime import UTC, datetime, timedelta
from typing import Any

import click
from rich.console import Console
from rich.table import Table

from runner import tokens
from runner.cli.main import App, cli, pass_app
from runner.cli.runs import esc
from runner.errors import NotFoundError, TransientError, UsageError
from runner.ledger.reading import query, user_query
from runner.ledger.runs import STATUSES, list_runs
from runner.ledger.runs import last_runs as newest_runs
from runner.reconcile.applied import AppliedAgent, load_applied, set_suspended
from runner.settings import Settings
from runner.specs.catalog import BUILTIN_TOOLS
from runner.specs.checking import did_you_mean
from runner.supervise.scheduling import next_fire
from runner.times import stamp


@cli.command()
@click.argument("name", required=False)
@pass_app
def status(app: App, name: str | None) -> None:
    """Whether a daemon runs for the home, the source in force, and the agents with their state, revision,
    last and next run."""
    agents = load_applied(app.conn, app.settings.client_id, name)
    if name and not agents:
        raise NotFoundError(f"no agent named '{name}' for client '{app.settings.client_id}'")
    last = last_runs(app)
    record = app.conn.execute("SELECT * FROM sources WHERE client_id = ?", (app.settings.client_id,)).fetchone()
    rows = [agent_row(a, last.get(a.name)) for a in agents.values()]
    from runner.sandbox import capabilities

    daemon = daemon_of(app)
    cluster = daemon.pop("cluster", None)
    flows = load_applied(app.conn, app.settings.client_id, kind="workflow")
    for row in rows:  # a run that waits for a node says why on its agent (docs/scale-out.md)
        if cluster and row["name"] in cluster.get("waiting", {}):
            row["waiting"] = cluster["waiting"][row["name"]]
    data = {"daemon": daemon, "source": source_of(app, dict(record) if record else None), "agents": rows,
            "client_id": app.settings.client_id, "sandbox": {"mode": app.settings.sandbox, **capabilities.detect()},
            **({"cluster": cluster} if cluster else {}),
            "workflows": [] if name else [{"name": w.name, "state": w.state, "revision": w.applied_revision,
                                           "message": w.message} for w in flows.values()]}
    app.emit(data, lambda: _print_status(data))


def daemon_of(app: App) -> dict[str, Any]:
    """The daemon serving this home and client, or ``running: false``: who it is from the home's lock, and
    what it does (runs in flight, the settings it runs with) from its control socket."""
    from runner.supervise.control import call, socket_path
    from runner.supervise.owning import running_daemon

    holder = running_daemon(app.settings.home) or {}
    problem = None
    try:
        about = call(socket_path(app.settings.home, app.settings.client_id), {"op": "ping"}, timeout=10) or {}
    except (OSError, TransientError) as exc:
        about, problem = {}, exc.message if isinstance(exc, TransientError) else str(exc)
    if not holder and not about and problem is None:
        return {"running": False}
    found = {"running": True, "pid": holder.get("pid") or about.get("pid"),
             "version": holder.get("version") or about.get("version"), "api": holder.get("api") or about.get("api"),
             "started_at": holder.get("started_at"),
             "runs": {"running": about.get("running"), "queued": about.get("queued")},
             "settings": about.get("settings"), **({"cluster": about["cluster"]} if about.get("cluster") else {})}
    if problem is not None:
        found["error"] = f"its control socket does not answer: {problem}"
    return found


def source_of(app: App, record: dict[str, Any] | None) -> dict[str, Any]:
    """The source in force for this client, which level of INTERFACE.md's precedence gave each of its parts
    ("client section", "environment", "home", "checkout", "default"; ``status`` has no --source flag), and
    the record of the last reconcile (its revision, time, error and invalid files)."""
    from runner.reconcile.reconciling import location_of

    s = app.settings
    last = {k: v for k, v in (record or {}).items() if k != "client_id"}
    found: dict[str, Any] = {**last, "reconciled_location": last.get("location"),
                             "from": {"source": s.source_origin_of("source"), "ref": s.source_origin_of("source_ref"),
                                      "path": s.source_origin_of("source_path")}}
    try:
        found["location"] = location_of(s).describe()
    except UsageError as exc:  # no level names a source and the command runs outside a git checkout
        found |= {"location": None, "problem": exc.message}
    return found


def origin_text(origin: str) -> str:
    """A level of the source's precedence in words (as `plan` says it)."""
    return {"flag": "from --source", "client section": "from the client's section of the settings file",
            "environment": "from AGENT_ORCH_SOURCE", "home": "recorded in the home by apply --source",
            "checkout": "the git checkout here"}.get(origin, origin)


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
    return stamp(min(times)) if times else None


def last_runs(app: App) -> dict[str, dict[str, Any]]:
    """Each agent's newest run, from the live store and the ledger (runner.ledger.runs)."""
    found = newest_runs(app.conn, app.settings.ledger_path, app.settings.client_id)
    return {agent: {k: run[k] for k in ("run_id", "status", "started_at", "ended_at", "denied", "tool_errors")}
            for agent, run in found.items()}


def _print_cluster(console: Console, cluster: dict[str, Any]) -> None:
    live = [n for n in cluster["nodes"] if n["alive"]]
    console.print(f"executor ray at {cluster['address']}: {len(live)} live node(s), {cluster['pending']} run(s) "
                  "waiting for a node", highlight=False)
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("NODE", "NODE ID", "LABELS", "RUNS", "STATE"):
        table.add_column(col)
    for n in cluster["nodes"]:
        labels = ", ".join(f"{k}={v}" for k, v in sorted(n["labels"].items())) or "-"
        table.add_row(esc(n["node"]), esc(n["node_id"][:12]), esc(labels), str(n["runs"]),
                      "alive" if n["alive"] else "lost")
    console.print(table)


def _print_status(data: dict[str, Any]) -> None:
    console = Console(width=160 if not sys.stdout.isatty() else None)
    d = data["daemon"]
    if d.get("error"):
        console.print(f"[red]daemon[/red] pid {d['pid'] or '?'}: {d['error']}", highlight=False)
    elif d["running"]:
        runs = d["runs"]
        console.print(f"daemon pid {d['pid']}, version {d['version']}, API {d['api'] or 'address unknown'}; "
                      f"{runs['running'] or 0} run(s) running, {runs['queued'] or 0} queued", highlight=False)
    else:
        console.print("no daemon runs for this home: 'agentctl serve' starts one; runs start in the foreground",
                      highlight=False)
    src = data["source"]
    origin = origin_text(src["from"]["source"])
    if src["location"] is None:
        console.print(f"[red]no source:[/red] {src['problem']}", highlight=False)
    elif src.get("revision") or src.get("reconciled_at"):
        console.print(f"source {src['location']} ({origin}) at {(src['revision'] or '-')[:12]}, reconciled "
                      f"{src['reconciled_at']}", highlight=False)
        if src.get("reconciled_location") not in (None, src["location"]):
            console.print(f"  last reconciled from {src['reconciled_location']}", highlight=False)
    else:
        console.print(f"source {src['location']} ({origin}), not reconciled yet", highlight=False)
    if src.get("error"):
        console.print(f"[red]last source error:[/red] {src['error']}", highlight=False)
    sb = data["sandbox"]
    console.print(f"sandbox {sb['mode']}: files {sb['filesystem']}, network {sb['network']}, "
                  f"processes {sb['process_limit']}", highlight=False)
    if data.get("cluster"):
        _print_cluster(console, data["cluster"])
    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in ("NAME", "STATE", "REVISION", "LAST RUN", "NEXT RUN", "MESSAGE"):
        table.add_column(col, overflow="fold" if col == "MESSAGE" else "ellipsis", no_wrap=col != "MESSAGE")
    for row in data["agents"]:
        last = row["last_run"]
        last_text = f"{last['status']} {str(last['started_at'] or '')[:19]}" if last else "-"
        message = "; ".join(m for m in (row["message"], esc(row.get("waiting") or "")) if m)
        table.add_row(row["name"], row["state"], row["revision"] or "-", last_text, row["next_run"] or "-", message)
    if not data["agents"]:
        console.print("no agents applied yet: run 'agentctl apply'")
    else:
        console.print(table)
    if data.get("workflows"):
        shown = ", ".join(f"{w['name']} ({w['state']})" for w in data["workflows"])
        console.print(f"workflows: {shown}; 'agentctl workflow list --defined' has more", highlight=False)
    for bad in json.loads(src.get("invalid") or "[]"):
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
    from runner.agent.recording import request_stop

    if not set_suspended(app.conn, app.settings.client_id, name, suspended):
        raise NotFoundError(f"no agent named '{name}' for client '{app.settings.client_id}'")
    stopping = request_stop(app.conn, app.settings.client_id, name) if suspended else 0
    word = "suspended" if suspended else "resumed"
    extra = f", stopping {stopping} run(s)" if stopping else ""
    if not quiet:
        app.emit({"name": name, "suspended": suspended, "stopping_runs": stopping},
                  lambda: click.echo(f"{name} {word}{extra}"))


class RunState(click.Choice[str]):
    """A run state; a misspelt one is a usage error with the nearest state."""

    def __init__(self) -> None:
        super().__init__(list(STATUSES))

    def get_invalid_choice_message(self, value: Any, ctx: click.Context | None) -> str:
        return (f"'{value}' is not a run state ({', '.join(map(str, self.choices))})"
                f"{did_you_mean(str(value), map(str, self.choices))}")


@cli.command()
@click.option("--agent", help="Only this agent's runs.")
@click.option("--status", "status_", type=RunState(), metavar="STATE", help="Only runs in this state.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 100_000))
@click.option("--sql", help="Any read-only SQL over the ledger (tables runs, run_events, reconciles, audit).")
@click.option("--reconciles", is_flag=True, help="List reconciles instead of runs.")
@pass_app
def history(app: App, agent: str | None, status_: str | None, limit: int, sql: str | None,
            reconciles: bool) -> None:
    """Run history: runs newest first, from the live store and the ledger; or any SQL over the ledger."""
    if sql or reconciles:
        app.archive()  # what the query reads is the ledger alone: move the journal first (no daemon: ours to do)
    if sql:
        cols, rows = user_query(app.settings.ledger_path, sql)
        records = [{c: stamp(v) if isinstance(v, datetime) else v for c, v in zip(cols, r, strict=True)}
                   for r in rows]
    elif reconciles:
        cols, rows = query(app.settings.ledger_path,
                           "SELECT revision, started_at, created, updated, deleted, invalid, initiator, error "
                           "FROM reconciles WHERE client_id = ? ORDER BY started_at DESC LIMIT ?",
                           [app.settings.client_id, limit])
        records = [{c: stamp(v) if isinstance(v, datetime) else v for c, v in zip(cols, r, strict=True)}
                   for r in rows]
    else:
        runs, _next = list_runs(app.conn, app.settings.ledger_path, app.settings.client_id, agent=agent,
                                status=status_, limit=limit)
        cols = list(HISTORY_COLUMNS)
        records = [{c: run[c] for c in cols} for run in runs]
    app.emit(records, lambda: _print_rows(cols, [tuple(r.values()) for r in records]))


HISTORY_COLUMNS = ("run_id", "agent", "status", "trigger", "started_at", "ended_at", "input_tokens", "output_tokens",
                   "denied", "tool_errors", "error")


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
    from runner.supervise.daemon import Daemon, setup_logging

    settings = Settings.load(app.home, app.client_id, host=host, port=port)
    setup_logging(settings)
    Daemon(settings, app_factory=app.app_factory).run()


@cli.group()
def token() -> None:
    """API tokens: create, list, revoke."""


class Duration(click.ParamType[timedelta, "str | timedelta"]):
    """A token's lifetime, like 30m, 12h, 7d or 90d; a bad one is a usage error (exit 2) naming the option."""

    name = "duration"

    def convert(self, value: str | timedelta, param: click.Parameter | None, ctx: click.Context | None) -> timedelta:
        if isinstance(value, timedelta):
            return value
        try:
            return tokens.parse_duration(value)
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
    made = tokens.create(app.conn, app.settings.client_id, role, name or role, expires)  # type: ignore[arg-type]
    app.emit({"token": made.token, "id": made.id, "name": name or role, "role": role,
              "client_id": app.settings.client_id, "expires_at": made.expires_at},
             lambda: click.echo(made.token))


@token.command("list")
@pass_app
def token_list(app: App) -> None:
    """The client's tokens: id, name, role, created, expires, last used (never the token itself)."""
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
    if not tokens.revoke(app.conn, app.settings.client_id, token_id):
        raise NotFoundError(f"no token with id '{token_id}' for client '{app.settings.client_id}'")
    app.emit({"id": token_id, "revoked": True}, lambda: click.echo(f"revoked {token_id}"))
