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
from typing import Any

import click

from runner.errors import OrchestratorError, StorageFullError
from runner.settings import Settings


@dataclass
class App:
    """What every command gets: settings, the output mode, and the state database on demand."""

    home: str | None
    client_id: str | None
    output: str
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

    def emit(self, data: Any, text: Callable[[], None]) -> None:
        """Print ``data`` as one JSON document, or call ``text`` to print it for people."""
        if self.json:
            click.echo(json.dumps(data, indent=2, default=str))
        else:
            text()


pass_app = click.make_pass_decorator(App)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 110})
@click.option("--home", envvar="AGENT_ORCH_HOME", help="State folder (default ./var).")
@click.option("--client-id", envvar="AGENT_ORCH_CLIENT_ID", help="Client (tenant) to act for (default 'default').")
@click.option("--output", type=click.Choice(["text", "json"]), default="text", show_default=True,
              help="Output format.")
@click.version_option(package_name="agent-orchestrator")
@click.pass_context
def cli(ctx: click.Context, home: str | None, client_id: str | None, output: str) -> None:
    """Run AI agents from specs in git, audit every run in DuckDB."""
    ctx.obj = App(home, client_id, output)


def main() -> None:
    from runner.cli import agents, runs, specs  # noqa: F401  (registers the commands)

    try:
        cli.main(standalone_mode=False)
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
