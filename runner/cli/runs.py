"""Commands on runs: run (with its steps live on a terminal), show (a transcript), logs, memory search."""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import sys
import threading
import time
from pathlib import Path
from typing import IO, Any

import click
from rich.console import Console
from rich.markup import escape

from runner.agent.channel import printable
from runner.cli.main import App, cli, pass_app
from runner.errors import NotFoundError, OrchestratorError, TransientError, UsageError
from runner.ledger.runs import TERMINAL, get_run, run_events, step_of, transcript
from runner.settings import Settings
from runner.state import connect
from runner.supervise.control import MAX_INPUT, check_input, check_input_size


@cli.command()
@click.argument("name")
@click.option("--input", "input_text", help="Input text for the run.")
@click.option("--input-file", type=click.Path(exists=True, dir_okay=False),
              help="Read the input from a file (a run's input is at most 1 MiB of UTF-8).")
@pass_app
def run(app: App, name: str, input_text: str | None, input_file: str | None) -> None:
    """One run now; prints the run id and final status. Exit 0 succeeded, 1 not, 2 error.

    On a terminal, the run's steps are shown as they happen (not with --output json, nor into a pipe)."""
    if input_text is not None and input_file is not None:
        raise UsageError("give --input or --input-file, not both")
    if input_file is not None:
        input_text = read_input_file(input_file)
    if input_text is not None:  # argv may carry bytes that are not UTF-8 (lone surrogates): make it text
        input_text = input_text.encode("utf-8", "replace").decode("utf-8")
        check_input(input_text, "--input-file" if input_file is not None else "--input")
    live = not app.json and sys.stdout.isatty()
    data = _run_live(app, name, input_text) if live else _run_quiet(app, name, input_text)

    def text() -> None:
        click.echo(f"run {data['run_id']} {data['status']}{counts_text(data)}")
        if data["output"]:
            click.echo(shown(data["output"]))
        if data["error"]:
            click.echo(f"error: {shown(data['error'])}", err=True)

    app.emit(data, text)
    sys.exit(0 if data["status"] == "succeeded" else 1)


STARTING_WAIT = 60.0  # seconds `agentctl run` waits for a daemon that is starting
RUN_FIELDS = ("run_id", "status", "agent", "output", "error", "input_tokens", "output_tokens", "started_at",
              "ended_at", "denied", "tool_errors")


def _run_quiet(app: App, name: str, input_text: str | None) -> dict[str, Any]:
    from runner.agent.launching import run_foreground
    from runner.reconcile.reconciling import open_source

    answer = ask_daemon(app, {"op": "run", "agent": name, "input": input_text, "requested_by": "cli"})
    if answer is not None:
        return {k: answer.get(k) for k in RUN_FIELDS}
    row = run_foreground(app.settings, open_source(app.settings), name, input=input_text, requested_by="cli")
    return {k: getattr(row, k, None) for k in RUN_FIELDS}


def _run_live(app: App, name: str, input_text: str | None) -> dict[str, Any]:
    """The run, with a line per step as it happens and a spinner between them. The steps are read from
    the stores (runner.ledger.runs) every 0.1 s, whoever runs the run: the daemon, or this process."""
    from runner.agent.launching import run_foreground
    from runner.agent.recording import new_run_id
    from runner.reconcile.reconciling import open_source

    console = Console(highlight=False, soft_wrap=True)
    answer = ask_daemon(app, {"op": "run", "agent": name, "input": input_text, "requested_by": "cli",
                              "wait": False})
    run_id = str(answer["run_id"]) if answer is not None else new_run_id()
    watch = Watch(app.settings, run_id, console)
    with console.status(f"run {run_id} of {name}", spinner="dots") as spinner:
        watch.spinner = spinner
        watch.start()
        try:
            if answer is None:
                row = run_foreground(app.settings, open_source(app.settings), name, input=input_text,
                                     requested_by="cli", run_id=run_id)
                watch.stop()
                return {k: getattr(row, k, None) for k in RUN_FIELDS}
            ended = watch.wait_end(app.conn)
            watch.stop()
        except KeyboardInterrupt:
            watch.stop()
            if answer is not None:
                click.echo(f"the run goes on in the daemon: 'agentctl show {run_id}' shows it, "
                           f"'agentctl stop {name}' stops it", err=True)
            raise
    return {k: ended.get(k) for k in RUN_FIELDS}


class Watch:
    """A run's steps on a terminal, as they reach the stores: a thread reads the events after the last
    one shown every 0.1 s (on its own connection) and prints a line for each."""

    EVERY = 0.1

    def __init__(self, settings: Settings, run_id: str, console: Console) -> None:
        self.settings, self.run_id, self.console = settings, run_id, console
        self.after = 0
        self.spinner: Any = None
        self.ended = threading.Event()  # the final status event was shown
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._loop, name="watch", daemon=True)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        """Show what is left, then stop."""
        self.stopping.set()
        self.thread.join(timeout=10)

    def wait_end(self, conn: sqlite3.Connection) -> dict[str, Any]:
        """The run's row once it is over (its final status event is shown a moment later at most)."""
        while True:
            run = get_run(conn, self.settings.ledger_path, self.settings.client_id, self.run_id)
            if run is not None and run["status"] in TERMINAL:
                self.ended.wait(1.0)  # a run that never started has no status event to wait for
                return run
            self.ended.wait(0.2)

    def _loop(self) -> None:
        conn = connect(self.settings.state_path)
        try:
            while True:
                last = self.stopping.is_set()
                try:
                    events = run_events(conn, self.settings.ledger_path, self.run_id, after=self.after)
                except OrchestratorError:
                    events = []  # the ledger is busy for a moment: the next read takes them
                for event in events:
                    self.after = event["seq"]
                    step = step_of(event)
                    self.console.print(step_line(step))
                    if self.spinner is not None:
                        self.spinner.update(f"run {self.run_id}: {_doing(step)}")
                    if step["type"] == "status":
                        self.ended.set()
                if last:
                    return
                self.stopping.wait(self.EVERY)
        finally:
            conn.close()


def _doing(step: dict[str, Any]) -> str:
    """What the run is most likely doing after ``step``, for the spinner."""
    if step["type"] == "model_call":
        return f"calling {', '.join(step.get('tool_calls') or [])}" if step.get("tool_calls") else "answering"
    if step["type"] == "tool_call":
        return "waiting for the model"
    return "running"


def counts_text(run: dict[str, Any]) -> str:
    """`` (2 denied, 1 tool error)`` for a run whose tool calls were denied or failed; else nothing."""
    parts = []
    if run.get("denied"):
        parts.append(f"{run['denied']} denied")
    if run.get("tool_errors"):
        parts.append(f"{run['tool_errors']} tool error{'s' if run['tool_errors'] != 1 else ''}")
    return f" ({', '.join(parts)})" if parts else ""


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
    waited = time.monotonic() + STARTING_WAIT
    while about is None and _starting(app) and time.monotonic() < waited:
        time.sleep(0.2)  # a daemon holds the home and is starting (joining a cluster takes seconds): its runs are its
        about = call(path, {"op": "ping"})
    if about is None:
        if _starting(app):
            raise TransientError(f"the daemon holding this home has not finished starting after {STARTING_WAIT:.0f}s: "
                                 "see its log")
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


def _starting(app: App) -> bool:
    """A daemon holds the home but has not finished starting (it records that it is ready last)."""
    from runner.supervise.owning import running_daemon

    holder = running_daemon(app.settings.home)
    return holder is not None and not holder.get("ready")


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
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines as they come, until Ctrl-C.")
@click.option("-n", "--lines", default=200, show_default=True, help="Lines to show before following.")
@pass_app
def logs(app: App, name: str, run_id: str | None, follow: bool, lines: int) -> None:
    """The agent's log."""
    from runner.agent.recording import agent_log_path
    from runner.reconcile.applied import load_applied

    path = agent_log_path(app.settings.logs_dir, app.settings.client_id, name)
    if not path.exists() and not load_applied(app.conn, app.settings.client_id, name):
        raise NotFoundError(f"no agent named '{name}' for client '{app.settings.client_id}'")
    needle = f" run={run_id} " if run_id else None
    tail = LogTail(path)
    kept = [line for line in tail.read() if needle is None or needle in line]
    for line in kept[-lines:] if lines > 0 else []:
        click.echo(line, nl=False)
    if not follow:
        return
    sys.stdout.flush()
    # Ctrl-C is how following ends: at once, whatever it interrupts (a write to a reader that went away too).
    signal.signal(signal.SIGINT, lambda *_: os._exit(0))
    try:
        while True:
            for line in tail.read():
                if needle is None or needle in line:
                    click.echo(line, nl=False)
            time.sleep(0.2)
    except KeyboardInterrupt:
        return  # Ctrl-C is how following ends


class LogTail:
    """The whole lines added to a log since the last ``read``, across rotations: the log is renamed to
    NAME.log.1 when it grows past its size (runner.agent.recording.AgentLog) and a new one begins. A
    rotation is seen as a new file at the path (another inode) or a shorter one (truncated); the old
    file is read to its end first. Nothing is created: a log that does not exist yet is waited for."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.handle: IO[bytes] | None = None
        self.partial = b""

    def read(self) -> list[str]:
        out = self._drain()
        try:
            now = os.stat(self.path)
        except FileNotFoundError:
            return out
        if self.handle is not None:
            mine = os.fstat(self.handle.fileno())
            if now.st_ino == mine.st_ino and now.st_size >= self.handle.tell():
                return out
            out += self._drain()  # written to the old file before it was renamed
            self.handle.close()
            self.handle, self.partial = None, b""
        try:
            self.handle = open(self.path, "rb")  # noqa: SIM115 (kept open between reads)
        except FileNotFoundError:
            return out
        return out + self._drain()

    def _drain(self) -> list[str]:
        if self.handle is None:
            return []
        lines = []
        for line in self.handle.readlines():
            line, self.partial = self.partial + line, b""
            if line.endswith(b"\n"):
                lines.append(line.decode("utf-8", "replace"))
            else:
                self.partial = line  # a line being written: the rest comes at the next read
        return lines


@cli.command()
@click.argument("run_id")
@pass_app
def show(app: App, run_id: str) -> None:
    """A run's transcript: its input, each step in order (model calls and their text, tool calls with their
    decision and result, egress, memory), its answer, and what it cost. --output json gives the same
    document as GET /agents/v1/runs/{id}/transcript."""
    found = transcript(app.conn, app.settings.ledger_path, app.settings.client_id, run_id)
    if found is None:
        raise NotFoundError(f"no run '{run_id}' for client '{app.settings.client_id}'")
    app.emit(found, lambda: print_transcript(found))


def print_transcript(t: dict[str, Any]) -> None:
    console = Console(highlight=False, soft_wrap=True)
    s = t["summary"]
    console.print(f"[bold]run {t['run_id']}[/bold] of {esc(t['agent'])}: {_status(t['status'])}"
                  f"{esc(counts_text(s))}{'' if t['complete'] else ' (in flight)'}")
    duration = f", {s['duration_seconds']:g} s" if s["duration_seconds"] is not None else ""
    console.print(f"  {esc(t['trigger'] or '-')} run, requested by {esc(t['requested_by'] or '-')}, revision "
                  f"{(t['spec_revision'] or '-')[:12]}, started {s['started_at'] or '-'}{duration}")
    console.print(f"  {s['tokens']} tokens ({s['input_tokens']} in, {s['output_tokens']} out) in "
                  f"{s['model_calls'] or 0} model call(s); {s['tool_calls'] or 0} tool call(s), "
                  f"{s['denied'] or 0} denied, {s['tool_errors'] or 0} failed")
    cost = [f"CPU {s['cpu_seconds']:.2f} s" if s["cpu_seconds"] is not None else None,
            f"peak memory {s['max_rss_mb']:.1f} MB" if s["max_rss_mb"] is not None else None,
            f"{_bytes(s['bytes_written'])} written" if s["bytes_written"] is not None else None,
            f"attempt {s['attempt']}" if s["attempt"] else None,
            f"on node {esc(s['node'])}" if s.get("node") else None,
            f"retry of {s['retry_of']}" if s["retry_of"] else None,
            f"asked by run {s['parent_run_id']}" if s.get("parent_run_id") else None,
            f"triggered by the end of {s['trigger_run_id']} (chain depth {s['chain_depth']})"
            if s.get("trigger_run_id") else None]
    if any(cost):
        console.print("  " + ", ".join(c for c in cost if c))
    console.print("\n[bold]input[/bold]")
    console.print(_indented(t["input"] or "(none)"))
    console.print("")
    for step in t["steps"]:
        console.print(step_line(step))
        for line in step_details(step):
            console.print(line)
    console.print("\n[bold]answer[/bold]")
    console.print(_indented(t["output"] or "(none)"))
    if t["error"]:
        console.print(f"\n[red]error[/red]: {esc(t['error'])}")
    if t["truncated"]:
        console.print(f"\n(the first {len(t['steps'])} steps only)")


def step_line(step: dict[str, Any]) -> str:
    """One line for a step (rich markup): what it was, and its decision, cost or outcome."""
    kind, seq = step["type"], f"{step['seq']:>3}"
    if kind == "model_call":
        tokens = f"{step.get('input_tokens', 0)}+{step.get('output_tokens', 0)} tokens"
        latency = f", {step['latency_ms']} ms" if step.get("latency_ms") is not None else ""
        calls = step.get("tool_calls") or []
        then = f" -> {', '.join(map(str, calls))}" if calls else " -> answer"
        return f"{seq}  [cyan]model[/cyan]   {esc(step['model'] or '-')}  {tokens}{latency}{esc(then)}"
    if kind == "tool_call":
        args = esc(_short(step.get("args")))
        if step["decision"] == "denied":
            return f"{seq}  [cyan]tool[/cyan]    {esc(step['tool'])} [bold red]DENIED[/bold red] {args}"
        outcome = "[red]failed[/red]" if step.get("error") else "[green]ok[/green]"
        took = f", {step['duration_ms']} ms" if step.get("duration_ms") is not None else ""
        return f"{seq}  [cyan]tool[/cyan]    {esc(step['tool'])} {outcome}{took} {args}"
    if kind == "egress":
        where = f"{step.get('method') or ''} {step.get('host') or '?'}:{step.get('port') or '?'}".strip()
        mark = "[bold red]DENIED[/bold red]" if step["decision"] == "denied" else "[green]allowed[/green]"
        reason = f": {step['reason']}" if step.get("reason") else ""
        return f"{seq}  [cyan]egress[/cyan]  {mark} {esc(where + reason)}"
    if kind == "memory_recall":
        return f"{seq}  [cyan]memory[/cyan]  recalled {step.get('found') or 0}"
    if kind == "memory_save":
        return f"{seq}  [cyan]memory[/cyan]  saved {esc(_short(step.get('text'), 100))}"
    if kind == "status":
        return f"{seq}  [cyan]status[/cyan]  {_status(step['status'])}"
    return f"{seq}  [cyan]{esc(kind)}[/cyan]     {esc(step.get('name') or '')} {esc(_short(step.get('detail')))}"


def step_details(step: dict[str, Any]) -> list[str]:
    """The lines under a step's line in a transcript: text, arguments, results, reasons, errors."""
    out = []
    if step["type"] == "model_call" and step.get("text"):
        out.append(_indented(step["text"], 7) + _cut(step.get("text_chars"), len(step["text"]), "chars"))
    elif step["type"] == "tool_call":
        args = json.dumps(step.get("args"), ensure_ascii=False)
        if _short(step.get("args")) != args.replace("\n", " "):  # cut short on the step's line: in full here
            out.append(f"       args    {esc(args)}")
        if step["decision"] == "denied":
            out.append(f"       [red]reason[/red]  {esc(str(step.get('reason') or '-'))}")
        elif step.get("error"):
            out.append(f"       [red]error[/red]   {esc(str(step['error']))}")
        elif step.get("result") is not None:
            size = step.get("result_bytes")
            shown = len(str(step["result"]).encode())
            out.append(f"       result{f' ({size} bytes)' if size is not None else ''}{_cut(size, shown, 'bytes')}")
            out.append(_indented(str(step["result"]), 9))
    elif step["type"] == "memory_recall":
        out += [f"       - {esc(_short(text, 300))}" for text in step.get("texts") or []]
    elif step["type"] == "status" and step.get("error"):
        out.append(f"       [red]error[/red]   {esc(str(step['error']))}")
    return out


def _status(status: str) -> str:
    colour = "green" if status == "succeeded" else "yellow" if status in ("queued", "running") else "red"
    return f"[{colour}]{esc(status)}[/{colour}]"


def _short(value: Any, width: int = 120) -> str:
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    text = text.replace("\n", " ")
    return text if len(text) <= width else text[:width - 3] + "..."


def shown(text: Any) -> str:
    """What a run, a model or a tool said, for a terminal: control characters shown, not obeyed (an escape
    sequence could set the clipboard, the title or clear the screen), line breaks kept."""
    return "\n".join(printable(line) for line in str(text).split("\n"))


def esc(text: Any) -> str:
    """``shown``, with rich's markup escaped too."""
    return escape(shown(text))


def _indented(text: str, by: int = 2) -> str:
    return "\n".join(" " * by + esc(line) for line in str(text).splitlines() or [""])


def _cut(full: Any, shown: int, unit: str) -> str:
    return f"\n{' ' * 7}(the first {shown} of {full} {unit})" if isinstance(full, int) and full > shown else ""


def _bytes(n: int) -> str:
    size = float(n)
    for unit in ("B", "kB", "MB"):
        if size < 1000:
            return f"{size:.0f} B" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1000
    return f"{size:.1f} GB"


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
    from runner.agent.memory import MemoryStore, open_memory, store_path
    from runner.plan import RunPlan
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
            click.echo(f"{m.distance:.3f}  {m.created_at}  {shown(m.text)}")
        if not found:
            click.echo("nothing remembered yet", err=True)

    app.emit([m.as_json() for m in found], text)
