"""agentctl: the group, its global options, and the one place errors become exit codes.

Exit codes (INTERFACE.md): 0 success, 1 "not what you hoped" (problems found, changes pending, run
failed), 2 error (usage, unreadable source, internal). No command prints a traceback unless
AGENT_ORCH_LOG_LEVEL=debug.
"""

from __future__ import annotations

import json
import os
import sqlite3
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import click

from runner.errors import OrchestratorError, StorageFullError
from runner.settings import Settings

if TYPE_CHECKING:
    from runner.supervise.daemon import AppFactory


@dataclass
class App:
    """What every command gets: settings, the output mode, and the state database on demand; and for
    `agentctl serve`, what builds the REST API (the CLI never imports the API: see ``main``)."""

    home: str | None
    client_id: str | None
    output: str
    app_factory: AppFactory | None = None
    _settings: Settings | None = None
    _conn: sqlite3.Connection | None = field(default=None, repr=False)

    @property
    def settings(self) -> Settings:
        if self._settings is None:
            self._settings = Settings.load(self.home, self.client_id)
        return self._settings

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            from runner.state import connect

            self._conn = connect(self.settings.state_path)
        return self._conn

    @property
    def json(self) -> bool:
        return self.output == "json"

    def archive(self) -> None:
        """Move the journal into the ledger, for a command that reads the ledger itself (SQL, reconciles).
        Only when no daemon runs for the home: then this process is the one writer; when one runs, its
        flusher is, and the command reads what it has moved (a second or so behind)."""
        from runner.ledger.ingesting import flush
        from runner.supervise.owning import running_daemon

        if running_daemon(self.settings.home) is None:
            flush(self.conn, self.settings.ledger_path)

    def emit(self, data: Any, text: Callable[[], None]) -> None:
        """Print ``data`` as one JSON document, or call ``text`` to print it for people."""
        if self.json:
            click.echo(json.dumps(data, indent=2, default=str))
        else:
            text()


pass_app = click.make_pass_decorator(App)

GLOBAL_OPTIONS = ("--home", "--client-id", "--output")


class Agentctl(click.Group):
    """The root group. Its options may also come after the subcommand, as kubectl's and argocd's do
    (`agentctl status --output json`): they are moved in front of it before click parses anything."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        return super().parse_args(ctx, hoist_global_options(self, ctx, args))


def hoist_global_options(root: click.Group, ctx: click.Context, args: list[str]) -> list[str]:
    """``args`` with every global option, and its value, moved to the front in the order given: the last one
    given wins, as for any repeated option. The walk follows the subcommands and steps over their options'
    values (so `run x --input --home` runs x with the input '--home'); a subcommand's own option of the same
    name stays its own, and everything from `--` on stays where it is."""
    hoisted: list[str] = []
    kept: list[str] = []
    command: click.Command = root
    i = 0
    while i < len(args):
        token = args[i]
        if token == "--":
            kept.extend(args[i:])
            break
        name, has_value = token.split("=", 1)[0], "=" in token
        option = _option_named(command, ctx, name) if token.startswith("-") else None
        if name in GLOBAL_OPTIONS and (command is root or option is None):
            if not has_value and i + 1 >= len(args):
                raise click.BadOptionUsage(name, f"Option '{name}' requires an argument.")
            take = 1 if has_value else 2
            hoisted.extend(args[i:i + take])
            i += take
            continue
        kept.append(token)
        i += 1
        if option is not None and not has_value and not option.is_flag and not option.count:
            kept.extend(args[i:i + option.nargs])
            i += option.nargs
        elif not token.startswith("-") and isinstance(command, click.Group):
            command = command.get_command(ctx, token) or command
    return hoisted + kept


def _option_named(command: click.Command, ctx: click.Context, name: str) -> click.Option | None:
    for param in command.get_params(ctx):
        if isinstance(param, click.Option) and name in (*param.opts, *param.secondary_opts):
            return param
    return None


@click.group(cls=Agentctl, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--home", envvar="AGENT_ORCH_HOME", help="State folder (default ./var). Like --client-id and --output, "
              "it may also follow the subcommand.")
@click.option("--client-id", envvar="AGENT_ORCH_CLIENT_ID", help="Client (tenant) to act for (default 'default').")
@click.option("--output", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="Output format.")
@click.version_option(package_name="agent-orchestrator")
@click.pass_context
def cli(ctx: click.Context, home: str | None, client_id: str | None, output: str) -> None:
    """Run AI agents from specs in git, audit every run in DuckDB."""
    ctx.obj = App(home, client_id, output, app_factory=ctx.obj)  # ctx.obj comes in as main() was given it


def main(app_factory: AppFactory) -> None:
    """agentctl. ``app_factory`` builds the REST API that `agentctl serve` serves: the entry point
    (``runner.__main__``) hands in the API's, as the CLI and the API are siblings that never import each other."""
    from runner.cli import agents, deliveries, runs, specs, workflows  # noqa: F401  (registers the commands)

    try:
        cli.main(standalone_mode=False, obj=app_factory)
    except click.exceptions.Abort:
        click.echo("aborted", err=True)
        sys.exit(130)
    except click.ClickException as exc:
        exc.show()
        sys.exit(exc.exit_code)
    except click.exceptions.Exit as exc:
        sys.exit(exc.exit_code)
    except OrchestratorError as exc:
        click.echo(f"error: {exc.message}", err=True)
        for line in exc.details:
            click.echo(f"  {line}", err=True)
        sys.exit(2)
    except KeyboardInterrupt:
        sys.exit(130)
    except BrokenPipeError:
        sys.exit(0)
    except Exception as exc:  # the last line of defence: a message, never a traceback
        full = StorageFullError.of(exc)  # SQLite, DuckDB or the OS out of space: said as our own errors are
        if full is not None:
            click.echo(f"error: {full.message}\n  {full.details[0]}", err=True)
            sys.exit(2)
        if os.environ.get("AGENT_ORCH_LOG_LEVEL", "").lower() == "debug":
            traceback.print_exc()
        click.echo(f"internal error: {type(exc).__name__}: {exc} (AGENT_ORCH_LOG_LEVEL=debug shows more)",
                   err=True)
        sys.exit(2)


def table_of(*columns: str) -> Any:
    """A listing's table: no box; ERROR and MESSAGE wrap, the other columns are cut with an ellipsis."""
    from rich.table import Table

    table = Table(box=None, pad_edge=False, header_style="bold")
    for col in columns:
        table.add_column(col, overflow="fold" if col in ("ERROR", "MESSAGE", "REASON") else "ellipsis",
                         no_wrap=col not in ("ERROR", "MESSAGE", "REASON"))
    return table


def console() -> Any:
    """Where listings go: the terminal's width, or 200 columns into a pipe (so ids are not cut)."""
    from rich.console import Console

    return Console(highlight=False, width=200 if not sys.stdout.isatty() else None)
