"""Commands on specs and their source: validate, plan, apply, hook."""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import click

from runner.cli.main import App, cli, pass_app
from runner.reconcile.planning import Plan
from runner.reconcile.reconciling import SourceOverride, open_source, plan, reconcile
from runner.settings import Settings, remember_source
from runner.source.git import is_remote
from runner.specs.graph_checking import check_refs
from runner.specs.problems import Problem
from runner.specs.validating import SPEC_SUFFIXES, check_unique_names, files_on_disk, validate_tree
from runner.supervise.owning import running_daemon

source_options = [
    click.option("--source", help="Git URL or local path of the spec repository (AGENT_ORCH_SOURCE). apply "
                 "records it in the home, with --ref and --path: plan, run and serve then follow it."),
    click.option("--ref", help="Branch, tag or commit (AGENT_ORCH_SOURCE_REF)."),
    click.option("--path", "path_", help="Folder in the repository (AGENT_ORCH_SOURCE_PATH)."),
]


F = TypeVar("F", bound=Callable[..., None])


def with_source_options(f: F) -> F:
    for option in reversed(source_options):
        f = option(f)
    return f


@cli.command()
@click.argument("paths", nargs=-1, required=True, type=click.Path(exists=True))
@pass_app
def validate(app: App, paths: tuple[str, ...]) -> None:
    """Validate spec files or folders (no git needed). Exit 0 all valid, 1 problems."""
    problems: list[Problem] = []
    client = app.client_id or "default"
    home = str(Path(app.home or "var").absolute())
    everything = []
    for root, files in files_on_disk(list(paths)):
        results, _ = validate_tree(files, client_id=client, home=home, file_exists=_exists_under(root), across=False)
        everything.extend(results)
    # A spec naming others (a workflow's steps, tools, triggers) validated alone is checked with the specs beside it
    # (its folder), as its repository would.
    beside = [r for raw in paths if Path(raw).is_file() for _, files in files_on_disk([str(Path(raw).parent)])
              for r in validate_tree(files, client_id=client, home=home, across=False)[0]] \
        if any(r.refs for r in everything) else []
    for raw in paths:  # a file named on purpose that is not a spec is a mistake worth saying
        if Path(raw).is_file() and not raw.endswith(SPEC_SUFFIXES):
            problems.append(Problem(raw, 1, 1, "", "not a spec file: specs end in .yaml or .yml"))
    check_unique_names(everything)  # across all the PATHs, as a repository would
    check_refs(everything, beside)
    checked = len(everything)
    for r in everything:
        problems.extend(r.problems)
    errors = [p for p in problems if p.severity == "error"]
    app.emit({"files": checked, "valid": not errors, "problems": [p.as_json() for p in problems]},
             lambda: _print_problems(problems, checked))
    sys.exit(1 if errors else 0)


def _exists_under(root: Path) -> Callable[[str], bool]:
    return lambda rel: (root / rel).is_file()


def _print_problems(problems: list[Problem], checked: int) -> None:
    for p in problems:
        click.echo(str(p))
    errors = sum(1 for p in problems if p.severity == "error")
    summary = f"{checked} spec file(s) checked: " + (f"{errors} error(s)" if errors else "all valid")
    warnings = len(problems) - errors
    click.echo(summary + (f", {warnings} warning(s)" if warnings else ""), err=True)


@cli.command("plan")
@with_source_options
@pass_app
def plan_cmd(app: App, source: str | None, ref: str | None, path_: str | None) -> None:
    """What apply would do. Exit 0 in sync, 1 changes, 2 error."""
    override = flags(app.settings, source, ref, path_)
    src = open_source(app.settings, override)
    p = plan(app.settings, app.conn, src)
    origin = "flag" if source else app.settings.source_origin
    app.emit({**p.as_json(), "source_origin": origin}, lambda: _print_plan(p, origin))
    sys.exit(0 if p.in_sync else 1)


def flags(settings: Settings, source: str | None, ref: str | None, path: str | None) -> SourceOverride:
    """The source flags as an override. A local path is made absolute (apply records it, for use from
    any folder). With --source, a ref or path that the home recorded for its own repository is not
    carried over to another one: the defaults (or the environment's) apply instead."""
    if source:
        source = source if is_remote(source) else os.path.abspath(os.path.expanduser(source))
        if ref is None and settings.source_origin_of("source_ref") == "home":
            ref = str(Settings.model_fields["source_ref"].default)
        if path is None and settings.source_origin_of("source_path") == "home":
            path = str(Settings.model_fields["source_path"].default)
    return SourceOverride(source, ref, path)


def _print_plan(p: Plan, origin: str) -> None:
    for change in p.changes:
        click.echo(str(change))
    if p.refused:
        click.echo(f"refused: {p.refused}", err=True)
    state = "in sync" if p.in_sync else f"{len(p.changes)} change(s)"
    click.echo(f"{p.location} ({_ORIGIN_TEXT[origin]}) at {p.revision[:12]}: {state}", err=True)


_ORIGIN_TEXT = {"flag": "from --source", "client section": "from the client's section of the settings file",
                "environment": "from AGENT_ORCH_SOURCE", "home": "recorded in the home by apply --source",
                "checkout": "the git checkout here"}


@cli.command()
@with_source_options
@click.option("--allow-empty", is_flag=True, help="Allow a revision that deletes every agent.")
@pass_app
def apply(app: App, source: str | None, ref: str | None, path_: str | None, allow_empty: bool) -> None:
    """Reconcile once. Exit 0 done, 1 some specs invalid (the rest applied), 2 error.

    With --source, the home records the source (and the ref and path used) for the client once it is
    applied: plan, run and serve follow it from then on without flags, from any folder."""
    settings = app.settings
    src = open_source(settings, flags(settings, source, ref, path_))
    p, outcome = reconcile(settings, app.conn, src, initiator="cli:apply", allow_empty=allow_empty,
                           archive=running_daemon(settings.home) is None)  # else the daemon's flusher moves it
    recorded = None
    if source and outcome is not None:
        loc = src.location
        recorded = remember_source(settings.home, settings.client_id, loc.url, loc.ref, loc.path)
    data = {**p.as_json(), "source_origin": "flag" if source else settings.source_origin,
            "source_recorded": str(recorded) if recorded else None,
            "applied": outcome.as_json() if outcome else None}
    app.emit(data, lambda: _print_apply(p, outcome is not None))
    if recorded is not None and not app.json:
        click.echo(f"recorded in the home: plan, run and serve follow {src.location.describe()} from now on", err=True)
        if settings.source and settings.source_origin in ("client section", "environment"):
            click.echo(f"note: {_ORIGIN_TEXT[settings.source_origin]}, {settings.source} wins over the recorded "
                       "source where it is set", err=True)
        _warn_running_daemon(settings, src.location.url)
    if outcome is None:
        sys.exit(2)
    sys.exit(1 if p.count("invalid") else 0)


def _print_apply(p: Plan, applied: bool) -> None:
    for change in p.changes:
        click.echo(str(change))
    if not applied:
        click.echo(f"error: {p.refused}", err=True)
        return
    click.echo(f"applied {p.revision[:12]}: {p.count('create')} created, {p.count('update')} updated, "
               f"{p.count('delete')} deleted, {p.count('invalid')} invalid", err=True)


def _warn_running_daemon(settings: Settings, recorded: str) -> None:
    """A daemon reads its source at start: one running for this home on another source keeps it, and its
    next sync applies that source again, until it is restarted. Say so rather than let it happen quietly."""
    from runner.errors import OrchestratorError
    from runner.supervise.control import call, socket_path

    try:
        about = call(socket_path(settings.home, settings.client_id), {"op": "ping"}, timeout=5) or {}
    except (OrchestratorError, OSError):
        return
    theirs = (about.get("settings") or {}).get("AGENT_ORCH_SOURCE") if isinstance(about, dict) else None
    if about and theirs != recorded:
        click.echo(f"warning: the daemon running for this home (pid {about.get('pid', '?')}) still follows "
                   f"{theirs or 'its own source'}, and its next sync applies that again: restart it to follow "
                   "the recorded source", err=True)


@cli.group()
def hook() -> None:
    """The push gate for a bare repository."""


@hook.command("install")
@click.argument("bare_repo", type=click.Path(exists=True, file_okay=False))
@click.option("--path", "path_", help="Spec folder inside the repository (default AGENT_ORCH_SOURCE_PATH).")
@pass_app
def hook_install(app: App, bare_repo: str, path_: str | None) -> None:
    """Install pre-receive (validate pushed specs) and post-receive (ask the daemon to reconcile)."""
    from runner.source.hooks import install

    installed = install(Path(bare_repo), settings=app.settings, spec_path=path_ or app.settings.source_path)
    def text() -> None:
        for p in installed:
            click.echo(f"installed {p}")

    app.emit({"installed": [str(p) for p in installed]}, text)


@hook.command("pre-receive", hidden=True)
@click.option("--path", "path_", required=True)
@pass_app
def hook_pre_receive(app: App, path_: str) -> None:
    from runner.source.hooks import pre_receive

    sys.exit(pre_receive(sys.stdin, sys.stdout, spec_path=path_, client_id=app.client_id or "default",
                         home=str(Path(app.home or "var").absolute())))


@hook.command("post-receive", hidden=True)
@pass_app
def hook_post_receive(app: App) -> None:
    from runner.source.hooks import post_receive

    post_receive(app.settings, sys.stdin.read(), sys.stdout)
