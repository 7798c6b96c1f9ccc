"""The exception tree: every exception lives in runner/errors.py, a source error is permanent or transient,
and the daemon waits what a transient one asks and backs off from a permanent one.

Real git repositories (local, and mirrored over file://), the real CLI in a subprocess, the real
``ClientDaemon`` in this process (its returned wait is the figure under test, so nothing sleeps for it)
and a real `agentctl serve` whose log says which kind it met. Every wait is a bounded poll.
"""

from __future__ import annotations

import ast
import builtins
import logging
import subprocess
import threading
from collections.abc import Callable
from pathlib import Path

import pytest
from conftest import ROOT, SpecRepo, git, poll
from daemon_helpers import Daemon, state_rows

import runner.errors
from runner.errors import (
    FileTooLarge,
    FolderMissing,
    PermanentError,
    SourceError,
    SourceMissing,
    SourceUnavailable,
    StorageFullError,
    TransientError,
)
from runner.settings import Settings
from runner.source.git import FETCH_RETRY, GitSource, Location
from runner.supervise.daemon import MAX_BACKOFF, ClientDaemon

Cli = Callable[..., subprocess.CompletedProcess[str]]
RUNNER = ROOT / "runner"


def expect(done: subprocess.CompletedProcess[str], code: int) -> subprocess.CompletedProcess[str]:
    assert done.returncode == code, f"exit {done.returncode}, wanted {code}\nstdout:\n{done.stdout}\n" \
                                    f"stderr:\n{done.stderr}"
    assert "Traceback" not in done.stderr, done.stderr
    return done


# -- every exception in one place ---------------------------------------------------------------------------

# What may stay beside the code that raises it: a module's own control-flow sentinels, raised and caught
# there (named private, with a leading underscore), and the API's HTTP answers, which are responses with a
# status rather than errors of ours.
HTTP_ANSWERS = "api/errors.py"


def exception_classes() -> list[tuple[str, str, int]]:
    """(file under runner/, class, line) of every class that derives from an exception, followed through
    the bases the package defines itself; a base from elsewhere counts when its name says it is one."""
    defined: list[tuple[str, str, int, list[str]]] = []
    for path in sorted(RUNNER.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.ClassDef):
                bases = [ast.unparse(b).rsplit(".", 1)[-1] for b in node.bases]
                defined.append((str(path.relative_to(RUNNER)), node.name, node.lineno, bases))
    known = {name for name, value in vars(builtins).items()
             if isinstance(value, type) and issubclass(value, BaseException)}
    growing = True
    while growing:
        growing = False
        for _file, name, _line, bases in defined:
            if name not in known and any(b in known or b.endswith(("Error", "Exception")) for b in bases):
                known.add(name)
                growing = True
    return [(file, name, line) for file, name, line, _bases in defined if name in known]


def test_every_exception_class_lives_in_errors_py() -> None:
    found = exception_classes()
    assert {name for file, name, _ in found if file == "errors.py"} >= {
        "OrchestratorError", "PermanentError", "TransientError", "SourceError", "SourceUnavailable", "SourceMissing",
        "FolderMissing", "FileTooLarge", "StorageFullError", "LandlockError", "SymlinkError", "DaemonRunningError",
        "ModelUnavailable", "MemoryError_", "ChannelError", "LedgerError", "SqlError"}
    elsewhere = [f"runner/{file}:{line}: {name}" for file, name, line in found
                 if file not in ("errors.py", HTTP_ANSWERS) and not name.startswith("_")]
    assert not elsewhere, "define these in runner/errors.py (a module may import and re-export them):\n" + \
        "\n".join(elsewhere)


def test_a_sentinel_left_in_its_module_is_private_to_it() -> None:
    """The sentinels that stay where they are are imported by no other module: else they belong in errors.py."""
    sentinels = [(file, name) for file, name, _ in exception_classes()
                 if file not in ("errors.py", HTTP_ANSWERS)]
    assert sentinels, "the walk found no sentinel at all: it is broken"
    for file, name in sentinels:
        module = "runner." + file.removesuffix(".py").replace("/", ".")
        for path in RUNNER.rglob("*.py"):
            if path == RUNNER / file:
                continue
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and node.module == module:
                    assert name not in {a.name for a in node.names}, f"{path} imports {name} from {module}"
                if isinstance(node, ast.Attribute) and node.attr == name:
                    raise AssertionError(f"{path}:{node.lineno} reaches {name} in another module")


def test_the_tree_is_documented_and_no_error_is_both_kinds() -> None:
    doc = runner.errors.__doc__ or ""
    classes = [value for value in vars(runner.errors).values()
               if isinstance(value, type) and issubclass(value, BaseException) and value.__module__ == "runner.errors"]
    assert len(classes) >= 17
    for cls in classes:
        assert cls.__name__ in doc, f"{cls.__name__} is missing from the tree in runner/errors.py's docstring"
        assert not (issubclass(cls, PermanentError) and issubclass(cls, TransientError)), cls
        if issubclass(cls, SourceError) and cls is not SourceError:
            assert issubclass(cls, (PermanentError, TransientError)), f"{cls.__name__} says neither kind"
    assert issubclass(StorageFullError, TransientError) and not issubclass(StorageFullError, SourceError)


def test_the_old_import_paths_name_the_same_classes() -> None:
    from runner.agent import channel, memory, providers
    from runner.ledger import reading
    from runner.sandbox import landlock
    from runner.supervise import owning

    assert landlock.SymlinkError is runner.errors.SymlinkError
    assert landlock.LandlockError is runner.errors.LandlockError
    assert channel.ChannelError is runner.errors.ChannelError
    assert memory.MemoryError_ is runner.errors.MemoryError_
    assert providers.ModelUnavailable is runner.errors.ModelUnavailable
    assert reading.SqlError is runner.errors.SqlError and reading.LedgerError is runner.errors.LedgerError
    assert owning.DaemonRunningError is runner.errors.DaemonRunningError
    assert issubclass(runner.errors.LandlockError, OSError) and issubclass(runner.errors.ChannelError, ValueError)


# -- which source errors are permanent, which transient -------------------------------------------------------


def read(url: str, mirrors: Path, *, ref: str = "main", path: str = "specs") -> GitSource:
    return GitSource(Location(url, ref, path), mirrors)


def test_what_a_source_names_and_lacks_is_permanent(repo: SpecRepo, tmp_path: Path) -> None:
    repo.spec("a")
    head = repo.commit()
    mirrors = tmp_path / "mirrors"
    plain = tmp_path / "plain"
    plain.mkdir()

    failures: dict[str, SourceError] = {}
    for what, call in {
        "ref": lambda: read(str(repo.path), mirrors, ref="no-such-branch").revision(),
        "not a repository": lambda: read(str(plain), mirrors).revision(),
        "no such source": lambda: read(str(tmp_path / "nowhere"), mirrors).revision(),
        "folder": lambda: read(str(repo.path), mirrors, path="elsewhere").files(head),
        "file": lambda: read(str(repo.path), mirrors).read_file(head, "specs/missing.yaml"),
        "size": lambda: read(str(repo.path), mirrors).read_file(head, "specs/a.yaml", limit=8),
    }.items():
        with pytest.raises(SourceError) as raised:
            call()
        failures[what] = raised.value

    assert {what: type(exc) for what, exc in failures.items()} == {
        "ref": SourceMissing, "not a repository": SourceMissing, "no such source": SourceMissing,
        "folder": FolderMissing, "file": SourceMissing, "size": FileTooLarge}
    for what, exc in failures.items():
        assert isinstance(exc, PermanentError) and not isinstance(exc, TransientError), what
    assert failures["ref"].message == f"ref 'no-such-branch' not found in {repo.path}"
    assert failures["not a repository"].message == f"{plain} is not a git repository"
    assert failures["folder"].message == f"folder 'elsewhere' not found in {repo.path} at {head[:12]}"
    size = failures["size"].message
    assert size.startswith("specs/a.yaml is ") and size.endswith("bytes, over the 8 byte limit of such a file"), size


def test_a_remote_that_cannot_be_reached_is_transient_with_its_delay(repo: SpecRepo, tmp_path: Path) -> None:
    repo.spec("a")
    repo.commit()
    with pytest.raises(SourceUnavailable) as never_there:  # the first clone: nothing to clone from
        read(f"file://{tmp_path / 'nowhere'}", tmp_path / "m1").revision()
    assert never_there.value.delay == FETCH_RETRY and never_there.value.message.startswith("cannot clone file://")

    mirrored = read(f"file://{repo.path}", tmp_path / "m2")
    mirrored.revision()  # cloned
    moved = repo.path.rename(tmp_path / "moved")
    try:
        with pytest.raises(SourceUnavailable) as gone:  # a later fetch
            mirrored.revision()
    finally:
        moved.rename(repo.path)
        mirrored.close()
    assert isinstance(gone.value, TransientError) and not isinstance(gone.value, PermanentError)
    assert gone.value.delay == FETCH_RETRY and gone.value.code == "source_unavailable"
    assert gone.value.message.startswith(f"cannot fetch file://{repo.path}: ")


def test_apply_says_a_permanent_source_error_and_exits_2(repo: SpecRepo, cli: Cli, tmp_path: Path) -> None:
    """The documented exit code of `agentctl plan` and `apply` for an error is 2, with one line, no traceback."""
    repo.spec("a")
    repo.commit()
    plain = tmp_path / "plain"
    plain.mkdir()
    for args, message in [
        (("apply", "--ref", "no-such-branch"), f"error: ref 'no-such-branch' not found in {repo.path}"),
        (("apply", "--source", str(plain)), f"error: {plain} is not a git repository"),
        (("apply", "--source", str(tmp_path / "nowhere")), f"error: spec source {tmp_path / 'nowhere'} does not exist"),
        (("apply", "--path", "elsewhere"), "error: folder 'elsewhere' not found in"),
        (("plan", "--ref", "no-such-branch"), "error: ref 'no-such-branch' not found"),
    ]:
        done = expect(cli(*args), 2)
        assert done.stderr.startswith(message), (args, done.stderr)
        assert done.stdout == "", (args, done.stdout)
    expect(cli("apply"), 0)  # and the good source still applies


# -- the daemon: the error's class decides the wait -------------------------------------------------------------


def client_daemon(home: Path, source: str) -> ClientDaemon:
    return ClientDaemon(Settings.load(home, source=source, source_ref="main", sync_interval=300.0), threading.Event())


def test_the_daemon_waits_what_a_transient_error_asks_and_backs_off_a_permanent_one(
        repo: SpecRepo, home: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    repo.spec("a")
    repo.commit()
    url = f"file://{repo.path}"
    daemon = client_daemon(home, url)
    caplog.set_level(logging.WARNING, logger="runner.daemon")

    def warned() -> str:
        line = caplog.records[-1].getMessage()
        caplog.clear()
        return line

    assert 300.0 <= daemon.reconcile_once("test") <= 330.0  # in sync: the poll interval, with its jitter
    assert caplog.records == []

    moved = repo.path.rename(tmp_path / "moved")  # the remote is gone: each fetch fails, and asks for its delay
    assert [daemon.reconcile_once("test") for _ in range(3)] == [FETCH_RETRY] * 3
    line = warned()
    assert line.startswith(f"transient: cannot fetch {url}: ") and \
        line.endswith(f"; keeping the last good state, retry in {FETCH_RETRY:g}s"), line

    moved.rename(repo.path)
    git(repo.path, "branch", "-m", "main", "renamed")  # fetched fine, but the ref the daemon follows is gone
    waits = [daemon.reconcile_once("test") for _ in range(3)]
    assert waits == [16.0, 32.0, 64.0]  # its own backoff: the three transient failures counted too
    assert warned() == (f"permanent: ref 'main' not found in {url}; keeping the last good state: fix the source; "
                        "next try in 64s")
    assert [daemon.reconcile_once("test") for _ in range(3)][-1] == MAX_BACKOFF  # never past it

    git(repo.path, "branch", "-m", "renamed", "main")
    assert 300.0 <= daemon.reconcile_once("test") <= 330.0  # fixed: back to polling, and the count starts over
    git(repo.path, "branch", "-m", "main", "renamed")
    assert daemon.reconcile_once("test") == 2.0
    assert {r["name"] for r in state_rows(home, "SELECT name FROM agents WHERE spec IS NOT NULL")} == {"a"}
    daemon.source.close()


def test_a_full_disk_waits_its_own_delay(repo: SpecRepo, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """StorageFullError carries 30 s: the daemon waits that, not its backoff. The home is a small tmpfs
    filled until the kernel says ENOSPC (we are root here and in CI), as in tests/test_disk_full.py."""
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=16m,mode=0755", "tmpfs", str(disk)], check=True)
    try:
        repo.spec("a")
        repo.commit()
        daemon = client_daemon(disk / "home", str(repo.path))
        assert daemon.reconcile_once("test") >= 300.0
        caplog.set_level(logging.WARNING, logger="runner.daemon")
        _fill(disk / "filler")
        repo.spec("b")
        repo.commit()
        wait = daemon.reconcile_once("test")
        assert wait == 30.0, caplog.text
        line = caplog.records[-1].getMessage()
        assert line.startswith("transient: reconcile failed, the disk holding the home is full (") and \
            line.endswith("; keeping the last good state, retry in 30s"), line
        (disk / "filler").unlink()
        assert daemon.reconcile_once("test") >= 300.0  # space again: applied, back to polling
        daemon.source.close()
        daemon.conn.close()
    finally:
        subprocess.run(["umount", "-l", str(disk)], check=True)


def _fill(path: Path) -> None:
    with open(path, "ab", buffering=0) as out:
        for size in (1 << 20, 1 << 12, 1):
            try:
                while True:
                    out.write(b"\0" * size)
            except OSError:
                continue


def test_the_served_daemon_says_which_kind_and_waits_for_it(repo: SpecRepo, home: Path, tmp_path: Path) -> None:
    """A real `agentctl serve` following a mirrored source: its log names the kind and the wait, the
    permanent one backs off on its own, and a reconcile request still wakes it at once."""
    repo.spec("a")
    repo.commit()
    url = f"file://{repo.path}"
    daemon = Daemon(home, repo.path, tmp_path / "daemon.log", {"AGENT_ORCH_SOURCE": url,
                                                                "AGENT_ORCH_SOURCE_REF": "main"}).start()
    try:
        git(repo.path, "branch", "-m", "main", "renamed")
        daemon.call({"op": "reconcile"})
        permanent = f"permanent: ref 'main' not found in {url}; keeping the last good state: fix the source; next try"
        poll(lambda: f"{permanent} in 2s" in daemon.log(), "the permanent error's first backoff")
        poll(lambda: f"{permanent} in 4s" in daemon.log(), "the daemon's own retry, backed off further")

        moved = repo.path.rename(tmp_path / "moved")
        daemon.call({"op": "reconcile"})
        poll(lambda: f"; keeping the last good state, retry in {FETCH_RETRY:g}s" in daemon.log(),
             "the transient error's own delay")
        assert f"transient: cannot fetch {url}: " in daemon.log()

        moved.rename(repo.path)
        git(repo.path, "branch", "-m", "renamed", "main")
        repo.spec("b")
        repo.commit()
        daemon.call({"op": "reconcile"})  # the 30 s wait is for polls: a request is served at once
        poll(lambda: {r["name"] for r in state_rows(home, "SELECT name FROM agents WHERE spec IS NOT NULL")}
             == {"a", "b"}, "the fixed source to be applied")
        assert "Traceback" not in daemon.log(), daemon.log()
    finally:
        assert daemon.terminate() == 0, daemon.log()
        poll(lambda: not daemon.processes(), "the daemon's processes to end", timeout=10)
