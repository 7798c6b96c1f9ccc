"""Spec paths cannot reach the runner's own files, and Landlock rules cannot be steered by a symlink.

Two holes an attack found: ``paths: [${AGENT_ORCH_HOME}]`` validated, and a run then read the settings
and the state database; and a run swapped a folder under its write path for a symlink to /etc, which
the next run's Landlock rule followed. Validation now refuses a tool path that is in, or holds, the
home, the log folder or the memory folder (``forbidden_overlap`` says the same at run time), and
``Ruleset.allow_path(..., follow=False)`` refuses a path with any symbolic link in it. The Landlock
tests fork: enforcing is for good, so only a child may do it.
"""

from __future__ import annotations

import json
import os
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from conftest import agentctl

from runner.errors import DeniedError
from runner.sandbox import landlock
from runner.settings import Settings
from runner.specs.checking import Context, check_document, forbidden_overlap
from runner.specs.loading import load_document
from runner.specs.problems import Problem

WHY = "a run sees nothing of the runner's own files or the system's"


def _spec(root: Path, name: str, tool: str, paths: list[str]) -> None:
    items = "".join(f"      - {json.dumps(p)}\n" for p in paths)
    (root / f"{name}.yaml").write_text(
        f"name: {name}\nmodel: llama2\ndescription: x\ntools:\n  - name: {tool}\n    paths:\n{items}")


# -- validation: the real `agentctl validate` ----------------------------------------------------------


def test_validate_refuses_tool_paths_on_the_runners_own_folders(tmp_path: Path) -> None:
    home, logs, vectors = tmp_path / "home", tmp_path / "logs", tmp_path / "vectors"
    outside = tmp_path / "data"
    (home / "config").mkdir(parents=True)
    (home / "config" / "settings.json").write_text(json.dumps({"VECTOR_DB_URL": f"file://{vectors}"}))
    alias = tmp_path / "alias"
    alias.symlink_to(home)  # outside the home by name, inside it for the kernel
    specs = tmp_path / "specs"
    specs.mkdir()
    _spec(specs, "home-itself", "file_reader", [f"{outside}/in", "${AGENT_ORCH_HOME}"])
    _spec(specs, "home-sub", "file_writer", ["${AGENT_ORCH_HOME}/config/"])
    _spec(specs, "root", "data_analyzer", ["/"])
    _spec(specs, "logs", "file_reader", [f"{logs}/agents/${{AGENT_NAME}}.log"])
    _spec(specs, "memory", "file_writer", [str(vectors)])
    _spec(specs, "aliased", "file_reader", [f"{alias}/config"])
    _spec(specs, "outside", "file_reader", [f"{outside}/${{CLIENT_ID}}/${{AGENT_NAME}}", "/srv/agents"])

    # The log folder from the environment, the memory folder from the home's settings file: as the
    # daemon on that home would see them.
    proc = agentctl("validate", str(specs), home=home, env={"AGENT_ORCH_LOG_DIR": str(logs)})
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert sorted(proc.stdout.splitlines()) == sorted([
        f"{specs}/aliased.yaml:7:9: error: tools[0].paths[0]: '{alias}/config' (really {home}/config) is in "
        f"{home}, the home (AGENT_ORCH_HOME): {WHY}; name a folder outside it",
        f"{specs}/home-itself.yaml:8:9: error: tools[0].paths[1]: '{home}' is the home (AGENT_ORCH_HOME): "
        f"{WHY}; name a folder outside it",
        f"{specs}/home-sub.yaml:7:9: error: tools[0].paths[0]: '{home}/config/' is in {home}, the home "
        f"(AGENT_ORCH_HOME): {WHY}; name a folder outside it",
        f"{specs}/logs.yaml:7:9: error: tools[0].paths[0]: '{logs}/agents/logs.log' is in {logs}, the log folder "
        f"(AGENT_ORCH_LOG_DIR): {WHY}; name a folder outside it",
        f"{specs}/memory.yaml:7:9: error: tools[0].paths[0]: '{vectors}' is the memory folder (VECTOR_DB_URL): "
        f"{WHY}; name a folder outside it",
        f"{specs}/root.yaml:7:9: error: tools[0].paths[0]: '/' contains {home}, the home (AGENT_ORCH_HOME): "
        f"{WHY}; name a narrower folder outside it",
    ]), proc.stdout
    assert "7 spec file(s) checked: 6 error(s)" in proc.stderr  # outside.yaml is valid


def test_validate_without_a_home_checks_against_the_default_home(tmp_path: Path) -> None:
    specs = tmp_path / "specs"
    specs.mkdir()
    _spec(specs, "into-var", "file_reader", [f"{tmp_path}/var/data/inbox"])
    proc = agentctl("validate", str(specs), cwd=tmp_path)  # no --home, no AGENT_ORCH_HOME: ./var
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert proc.stdout.splitlines() == [
        f"{specs}/into-var.yaml:7:9: error: tools[0].paths[0]: '{tmp_path}/var/data/inbox' is in {tmp_path}/var, "
        f"the home (AGENT_ORCH_HOME): {WHY}; name a folder outside it"]


# -- validation: the functions behind it ---------------------------------------------------------------


def _problems(text: str, ctx: Context) -> list[Problem]:
    doc, problems = load_document(textwrap.dedent(text).lstrip("\n").encode(), "x.yaml")
    assert doc is not None, problems
    return check_document(doc, ctx, "x.yaml")[1]


def test_tool_and_watched_paths_are_checked_against_the_folders_the_context_names() -> None:
    ctx = Context(home="/srv/agents/var", protected=(("the vault", "/srv/vault"),))
    problems = _problems("""
        name: a
        model: m
        description: x
        tools:
          - name: file_reader
            paths: ["/srv/vault/x", "/srv/agents/var/data"]
        triggers:
          - type: file_change
            path: /srv/vault/inbox
        """, ctx)
    # Given explicitly, the protected folders replace the home's; a watched folder is checked too (the
    # names of its files become a run's input).
    assert [(p.line, p.field, p.message) for p in problems] == [
        (6, "tools[0].paths[0]", f"'/srv/vault/x' is in /srv/vault, the vault: {WHY}; name a folder outside it"),
        (9, "triggers[0].path", f"'/srv/vault/inbox' is in /srv/vault, the vault: {WHY}; name a folder outside it")]


def test_forbidden_overlap_for_the_run_time_check(tmp_path: Path) -> None:
    home = tmp_path / "srv" / "agents" / "var"
    settings = Settings.load(home=home, log_dir="/var/log/agency_stack/components")
    assert forbidden_overlap(str(home) + "x", settings) is None  # a sibling whose name starts alike
    assert forbidden_overlap(str(tmp_path / "srv" / "data"), settings) is None
    assert forbidden_overlap("/opt/agency_stack/clients/default/data", settings) is None
    assert forbidden_overlap(str(tmp_path / "srv"), settings) == (
        f"'{tmp_path}/srv' contains {home}, the home (AGENT_ORCH_HOME): {WHY}; name a narrower folder outside it")
    assert forbidden_overlap(f"{home}/state.sqlite", settings) == (
        f"'{home}/state.sqlite' is the state database: {WHY}; name a folder outside it")
    assert forbidden_overlap(f"{home}/sources/default", settings) == (
        f"'{home}/sources/default' is in {home}/sources, the source mirrors: {WHY}; name a folder outside it")
    assert forbidden_overlap(f"{tmp_path}/elsewhere/../srv/agents/var/memory/default", settings) == (
        f"'{tmp_path}/elsewhere/../srv/agents/var/memory/default' is in {home}/memory, the memory folder "
        f"(VECTOR_DB_URL): {WHY}; name a folder outside it")
    assert forbidden_overlap("/var/log", settings) == f"'/var/log' is a system folder: {WHY}; name a folder outside it"
    logs = Settings.load(home=home, log_dir=str(tmp_path / "logs" / "agents"))
    assert forbidden_overlap(str(tmp_path / "logs"), logs) == (
        f"'{tmp_path}/logs' contains {tmp_path}/logs/agents, the log folder (AGENT_ORCH_LOG_DIR): "
        f"{WHY}; name a narrower folder outside it")
    # The home reached through a symlink is still the home (and the other way round).
    home.mkdir(parents=True)
    (tmp_path / "door").symlink_to(home)
    assert forbidden_overlap(f"{tmp_path}/door/config", settings) == (
        f"'{tmp_path}/door/config' (really {home}/config) is in {home}, the home (AGENT_ORCH_HOME): {WHY}; "
        "name a folder outside it")
    via_link = Settings.load(home=tmp_path / "door")
    assert forbidden_overlap(f"{home}/runs.duckdb", via_link) is not None


# -- Landlock rules that do not follow symbolic links ---------------------------------------------------


def _in_child(work: Callable[[], object]) -> Any:
    """``work()`` in a forked child (which may enforce Landlock for good); its result, or what it raised."""
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        code = 0
        try:
            os.close(read)
            try:
                out: object = work()
            except Exception as exc:
                out = {"raised": type(exc).__name__, "denied": isinstance(exc, DeniedError), "message": str(exc)}
            os.write(write, json.dumps(out).encode())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(write)
    with os.fdopen(read, "rb") as pipe:
        data = pipe.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0, data
    return json.loads(data)


@pytest.fixture
def base(tmp_path: Path) -> Path:
    return Path(os.path.realpath(tmp_path))  # so the only links in these paths are the tests' own


def test_a_path_through_a_symlink_is_refused(base: Path) -> None:
    (base / "real" / "inner").mkdir(parents=True)
    (base / "link").symlink_to(base / "real")
    got = _in_child(lambda: landlock.Ruleset().allow_path(str(base / "link" / "inner"), landlock.READ,
                                                            follow=False))
    assert got == {"raised": "SymlinkError", "denied": True,
                   "message": f"path {base}/link/inner contains a symbolic link ({base}/link -> {base}/real); "
                              "name the real folder"}
    # The last component a link: refused too. Followed (the runtime's own paths), it is allowed as before.
    assert _in_child(lambda: landlock.Ruleset().allow_path(str(base / "link"), landlock.READ,
                                                           follow=False))["raised"] == "SymlinkError"
    assert _in_child(lambda: landlock.Ruleset().allow_path(str(base / "link" / "inner"), landlock.READ)) is True


def test_a_real_folder_is_allowed_and_enforced(base: Path) -> None:
    allowed = base / "allowed"
    allowed.mkdir()
    (allowed / "in.txt").write_text("inside\n")
    (base / "one.txt").write_text("a file rule\n")
    (base / "secret.txt").write_text("SECRET\n")

    def work() -> dict[str, object]:
        rules = landlock.Ruleset()
        added = [rules.allow_path(str(allowed), landlock.READ, follow=False),
                 rules.allow_path(str(base / "one.txt"), landlock.READ, follow=False),
                 rules.allow_path(str(base / "missing"), landlock.READ, follow=False)]
        rules.enforce()
        out: dict[str, object] = {"added": added, "in": (allowed / "in.txt").read_text(),
                                  "file": (base / "one.txt").read_text()}
        try:
            out["secret"] = (base / "secret.txt").read_text()
        except PermissionError:
            out["secret"] = "denied"
        return out

    assert _in_child(work) == {"added": [True, True, False], "in": "inside\n", "file": "a file rule\n",
                               "secret": "denied"}


def test_a_folder_swapped_for_a_symlink_is_refused_next_time(base: Path) -> None:
    sub = base / "A" / "sub"
    sub.mkdir(parents=True)
    assert _in_child(lambda: landlock.Ruleset().allow_path(str(sub), landlock.READ | landlock.WRITE,
                                                           follow=False)) is True
    sub.rmdir()  # what a run with A as its write path can do between runs
    sub.symlink_to("/etc")
    got = _in_child(lambda: landlock.Ruleset().allow_path(str(sub), landlock.READ | landlock.WRITE, follow=False))
    assert got == {"raised": "SymlinkError", "denied": True,
                   "message": f"path {sub} contains a symbolic link ({sub} -> /etc); name the real folder"}


def test_the_component_walk_without_openat2(base: Path) -> None:
    """The fallback for kernels without openat2, called directly: this kernel has openat2."""
    (base / "real" / "inner").mkdir(parents=True)
    (base / "real" / "file.txt").write_text("x")
    (base / "link").symlink_to(base / "real")
    fd = landlock.walk_no_symlinks(str(base / "real" / "./inner/"))
    assert fd is not None
    try:
        assert os.fstat(fd).st_ino == os.stat(base / "real" / "inner").st_ino
    finally:
        os.close(fd)
    for missing in (base / "nope", base / "real" / "file.txt" / "x"):
        assert landlock.walk_no_symlinks(str(missing)) is None
    with pytest.raises(landlock.SymlinkError) as refused:
        landlock.walk_no_symlinks(str(base / "link" / "inner"))
    assert refused.value.link == str(base / "link") and refused.value.target == str(base / "real")
    with pytest.raises(landlock.SymlinkError):
        landlock.walk_no_symlinks("/proc/self/fd/0")  # magic links are links too
