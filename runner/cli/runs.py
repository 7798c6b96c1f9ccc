"""Commands on runs: run, logs, memory search."""

from __future__ import annotations

import os
import sys
import time
from typing import Any

import click

from runner.cli.main import App, cli, pass_app
from runner.errors import NotFoundError, UsageError
from runner.settings import Settings
from runner.supervise.control import MAX_INPUT, check_input, check_input_size


@cli.command()
@click.argument("name")
@click.option("--input", "input_text", help="Input text for the run.")
@click.option("--input-file", type=click.Path(exists=True, dir_okay=False),
              help="Read the input from a file (a run's input is at most 1 MiB of UTF-8).")
@pass_app
def run(app: App, name: str, input_text: str | None, input_file: str | None) -> None:
    """One run now; prints the run id and final status. Exit 0 succeeded, 1 not, 2 error."""
    from runner.agent.launching import run_foreground
    from runner.reconcile.reconciling import open_source

    if input_text is not None and input_file is not None:
        raise UsageError("give --input or --input-file, not both")
    if input_file is not None:
        input_text = read_input_file(input_file)
    if input_text is not None:  # argv may carry bytes that are not UTF-8 (lone surrogates): make it text
        input_text = input_text.encode("utf-8", "replace").decode("utf-8")
        check_input(input_text, "--input-file" if input_file is not None else "--input")
    answer = ask_daemon(app, {"op": "run", "agent": name, "input": input_text, "requested_by": "cli"})
    if answer is not None:
        data = {k: answer.get(k) for k in ("run_id", "status", "agent", "output", "error", "input_tokens",
                                           "output_tokens", "started_at", "ended_at")}
    else:
        row = run_foreground(app.settings, open_source(app.settings), name, input=input_text,
                             requested_by="cli")
        data = {"run_id": row.run_id, "status": row.status, "agent": row.agent, "output": row.output,
                "error": row.error, "input_tokens": row.input_tokens, "output_tokens": row.output_tokens,
                "started_at": row.started_at, "ended_at": row.ended_at}

    def text() -> None:
        click.echo(f"run {data['run_id']} {data['status']}")
        if data["output"]:
            click.echo(data["output"])
        if data["error"]:
            click.echo(f"error: {data['error']}", err=True)

    app.emit(data, text)
    sys.exit(0 if data["status"] == "succeeded" else 1)


def read_input_file(path: str) -> str:
    """The file's text; past MAX_INPUT bytes, a usage error before it is read whole."""
    with open(path, "rb") as handle:
        check_input_size(os.fstat(handle.fileno()).st_size, "--input-file")
        data = handle.read(MAX_INPUT + 1)  # a file that grows as it is read is cut here, and refused below
    check_input_size(len(data), "--input-file")
    return data.decode("utf-8", errors="replace")


def ask_daemon(app: App, request: dict[str, Any]) -> dict[str, Any] | None:
    """The daemon's answer, or None when no daemon runs for this home and client.

    The daemon's settings rule what it does: each setting this command was given (by its environment or
    the settings file) that a run depends on and that the daemon has another value for, gets a warning.
    """
    from runner.supervise.control import call, socket_path

    path = socket_path(app.settings.home, app.settings.client_id)
    about = call(path, {"op": "ping"})
    if about is None:
        return None
    for line in settings_not_applied(app.settings, about.get("settings")):
        click.echo(f"warning: {line}", err=True)
    answer = call(path, request)
    if answer is None:
        return None
    if not answer.get("ok"):
        error = NotFoundError if answer.get("code") == "not_found" else UsageError
        raise error(str(answer.get("error")))
    return answer


# Settings that change what a run (or the daemon's handling of it) does; a difference in the others
# (the log format, the API's port) does not change the outcome of `agentctl run`.
RUN_SETTINGS = (
    "AGENT_ORCH_SOURCE", "AGENT_ORCH_SOURCE_REF", "AGENT_ORCH_SOURCE_PATH", "OLLAMA_HOST", "LANGCHAIN_API_URL",
    "OPENAI_API_KEY", "MAX_AGENTS", "DEFAULT_AGENT_TIMEOUT", "ENABLE_REMOTE_TOOLS", "VECTOR_DB_URL",
    "AGENT_ORCH_EMBED_MODEL", "AGENT_ORCH_KILL_GRACE", "AGENT_ORCH_SANDBOX", "AGENT_ORCH_MAX_MEMORY_MB",
    "AGENT_ORCH_MAX_PROCESSES", "AGENT_ORCH_MAX_SCRATCH_MB", "AGENT_ORCH_MAX_FILE_MB",
)


def settings_not_applied(mine: Settings, daemons: Any) -> list[str]:
    """One line per run setting this command was given that the daemon runs with another value of.
    Secrets are compared as set or not, and never shown."""
    from runner.settings import environment, settings_file

    if not isinstance(daemons, dict):
        return []  # a daemon that does not say its settings
    top, clients = settings_file(mine.config_dir / "settings.json")
    given = {str(k).upper() for layer in (top, environment(), clients.get(mine.client_id, {})) for k in layer}
    ours = mine.public()
    lines = []
    for key in RUN_SETTINGS:
        if key not in given or key not in daemons or ours.get(key) == daemons[key]:
            continue
        lines.append(f"the daemon runs with {_shown(key, daemons[key])}; this command's {_shown(key, ours.get(key))} "
                     "does not apply (restart the daemon to change it)")
    return lines


def _shown(key: str, value: Any) -> str:
    if key in _secret_settings():  # public() says "(set)" or "": never the secret
        return f"{key} {'set' if value else 'unset'}"
    if isinstance(value, bool):
        text = str(value).lower()
    elif isinstance(value, float) and value.is_integer():
        text = str(int(value))  # as it was most likely typed: DEFAULT_AGENT_TIMEOUT=300
    else:
        text = str(value)
    return f"{key}={text}" if text else f"{key} empty"


def _secret_settings() -> set[str]:
    from pydantic import SecretStr

    return {str(f.json_schema_extra["env"]) for f in Settings.model_fields.values()
            if f.annotation is SecretStr and isinstance(f.json_schema_extra, dict)}


@cli.command()
@click.argument("name")
@click.option("--run", "run_id", help="Only the lines of this run.")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("-n", "--lines", default=200, show_default=True, help="Lines to show before following.")
@pass_app
def logs(app: App, name: str, run_id: str | None, follow: bool, lines: int) -> None:
    """The agent's log."""
    from runner.agent.recording import agent_log_path

    path = agent_log_path(app.settings.logs_dir, app.settings.client_id, name)
    if not path.exists() and not follow:
        from runner.reconcile.applied import load_applied

        if not load_applied(app.conn, app.settings.client_id, name):
            raise NotFoundError(f"no agent named '{name}' for client '{app.settings.client_id}'")
        return
    needle = f" run={run_id} " if run_id else None
    with open(path, "a+", encoding="utf-8", errors="replace") as handle:
        handle.seek(0)
        kept = [line for line in handle if needle is None or needle in line]
        for line in kept[-lines:]:
            click.echo(line, nl=False)
        while follow:
            line = handle.readline()
            if not line:
                time.sleep(0.2)
                continue
            if needle is None or needle in line:
                click.echo(line, nl=False)


@cli.group()
def memory() -> None:
    """An agent's memory."""


@memory.command("search")
@click.argument("name")
@click.argument("query")
@click.option("-k", default=5, show_default=True, type=click.IntRange(1, 100))
@pass_app
def memory_search(app: App, name: str, query: str, k: int) -> None:
    """Search an agent's memory."""
    from runner.agent.memory import MemoryStore, store_path
    from runner.agent.running import RunPlan, open_memory
    from runner.reconcile.applied import load_applied

    agent = load_applied(app.conn, app.settings.client_id, name).get(name)
    if agent is None or agent.spec is None:
        raise NotFoundError(f"no agent named '{name}' for client '{app.settings.client_id}'")
    spec = agent.spec
    if spec.memory is None or spec.memory.type == "none":
        raise UsageError(f"agent '{name}' has no memory")
    path = store_path(app.settings.memory_dir, app.settings.client_id, name, spec.memory.collection)
    found = []
    if path.exists():
        store: MemoryStore | None = open_memory(RunPlan("", app.settings.client_id, name, None, spec, app.settings))
        assert store is not None
        found = store.search(query, k)
        store.close()
    def text() -> None:
        for m in found:
            click.echo(f"{m.distance:.3f}  {m.created_at}  {m.text}")
        if not found:
            click.echo("nothing remembered yet", err=True)

    app.emit([m.as_json() for m in found], text)
