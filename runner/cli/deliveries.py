"""`agentctl deliveries list|replay ID`: the events that reached the daemon (webhooks, run ends) and what each
became (docs/events.md). `list` reads the state database, with or without a daemon; `replay` asks the daemon,
which starts the stored event again as a new delivery."""

from __future__ import annotations

import click

from runner.cli.main import App, cli, console, pass_app, table_of
from runner.cli.runs import esc
from runner.cli.workflow_views import short
from runner.cli.workflows import ask
from runner.ledger.deliveries import list_deliveries

DECISIONS = ("accepted", "started", "duplicate", "rejected")


@cli.group()
def deliveries() -> None:
    """Events received (webhooks, run_completed) and what each started."""


@deliveries.command("list")
@click.option("--trigger", metavar="NAME", help="Only this trigger's (webhook:NAME, run_completed:NAME) or this "
              "agent's or workflow's deliveries.")
@click.option("--decision", type=click.Choice(DECISIONS), help="Only deliveries with this decision.")
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 10_000))
@pass_app
def deliveries_list(app: App, trigger: str | None, decision: str | None, limit: int) -> None:
    """Deliveries, newest first."""
    found = [d.as_json() for d in list_deliveries(app.conn, app.settings.client_id, trigger=trigger,
                                                   decision=decision, limit=limit)]

    def text() -> None:
        if not found:
            click.echo("no deliveries yet: webhook and run_completed triggers record one per event", err=True)
            return
        table = table_of("DELIVERY", "TRIGGER", "RECEIVED", "DECISION", "RUN", "DEDUPE KEY", "REASON")
        for d in found:
            table.add_row(esc(d["delivery_id"]), esc(d["trigger"]), d["received_at"], d["decision"],
                          esc(d["run_id"] or d["workflow_run_id"] or "-"), esc(short(d["dedupe_key"] or "-", 40)),
                          esc(short(d["reason"] or "", 80)))
        console().print(table)

    app.emit(found, text)


@deliveries.command("replay")
@click.argument("delivery_id")
@pass_app
def deliveries_replay(app: App, delivery_id: str) -> None:
    """Start a delivery's event again (a new delivery; its dedupe key does not hold it back)."""
    answer = ask(app, {"op": "delivery.replay", "id": delivery_id, "requested_by": "cli"},
                 "a replay starts its run in the daemon")
    new = {k: v for k, v in answer.items() if k != "ok"}
    started = new.get("run_id") or new.get("workflow_run_id")
    app.emit(new, lambda: click.echo(f"delivery {delivery_id} replayed as {new['delivery_id']}: {new['decision']}"
                                     + (f", run {started}" if started else "")
                                     + (f" ({new['reason']})" if new.get("decision") == "rejected" else "")))
