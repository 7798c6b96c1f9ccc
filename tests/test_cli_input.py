"""The command line takes input the way users type it (issue 11), through the real agentctl in a subprocess:

- the global options (--home, --client-id, --output) before or after the subcommand, as kubectl's are;
- a bad input is exit 2 naming the option (a misspelt run state gets the nearest one), a user's SQL error is
  a SQL error;
- one limit of a run's input (1 MiB of UTF-8), the same without a daemon and through one, said before
  anything runs;
- `status` says whether a daemon runs for the home, and which source is in force and where it came from;
- a setting given to agentctl that the running daemon has another value for is named on stderr.

Daemons are real `agentctl serve` processes (the ``daemons`` fixture); every wait is a bounded poll.
"""

from __future__ import annotations

import json
import re
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import pytest
from conftest import SpecRepo, agentctl, poll
from daemon_helpers import wait_ledger
from test_daemon import MakeDaemon, daemons  # noqa: F401 (the fixture)
from test_run import expect, ledger, scripted_agent, turn

from runner import __version__
from runner.cli.main import cli as root
from runner.cli.main import hoist_global_options
from runner.supervise.control import MAX_INPUT, call

Cli = Callable[..., subprocess.CompletedProcess[str]]
OVER = "bytes is over the 1 MiB limit of a run's input"


@pytest.fixture
def echo(repo: SpecRepo, cli: Cli) -> str:
    """An applied agent whose scripted model answers at once."""
    scripted_agent(repo, "echo", [turn(content="done")])
    repo.commit()
    expect(cli("apply"), 0)
    return "echo"


def as_json(done: subprocess.CompletedProcess[str]) -> Any:
    return json.loads(expect(done, 0).stdout)


# -- global options after the subcommand ------------------------------------------------------------------


def test_global_options_follow_any_subcommand(repo: SpecRepo, home: Path, cli: Cli, echo: str) -> None:
    status = as_json(cli("status", "--output", "json"))
    assert {"daemon", "source", "agents"} <= set(status)
    assert [a["name"] for a in status["agents"]] == ["echo"]

    checked = as_json(agentctl("validate", "--output", "json", str(repo.path / "specs")))
    assert checked["valid"] is True and checked["files"] == 1

    assert as_json(cli("history", "--output=json", "--limit", "5")) == []
    assert as_json(cli("token", "list", "--output", "json")) == []
    made = as_json(cli("token", "create", "--role", "viewer", "--output", "json"))
    assert [t["id"] for t in as_json(cli("token", "list", "--output", "json"))] == [made["id"]]

    # --home and --client-id after the subcommand (the cli fixture gives --home before it: the later one wins)
    elsewhere = home.parent / "elsewhere"
    moved = as_json(cli("status", "--home", str(elsewhere), "--output", "json"))
    assert moved["agents"] == [] and (elsewhere / "state.sqlite").exists()
    assert as_json(cli("token", "list", "--client-id=acme", "--output", "json")) == []
    assert as_json(cli("--output", "json", "status", "--output", "text", "--output=json"))["agents"]
    assert expect(cli("--output", "json", "status", "--output", "text"), 0).stdout.startswith("no daemon")

    missing = expect(cli("status", "--output"), 2)
    assert "Option '--output' requires an argument" in missing.stderr
    bad = expect(cli("status", "--output", "yaml"), 2)
    assert "'yaml' is not one of 'text', 'json'" in bad.stderr


def test_hoisting_steps_over_the_values_of_a_subcommands_options() -> None:
    """The walk that moves global options knows the subcommands' options: a value that looks like a global
    option stays the value it was given to, and `--` ends the walk."""
    from runner.cli import agents, runs, specs  # noqa: F401  (registers the commands, as main() does)

    ctx = click.Context(root)
    assert hoist_global_options(root, ctx, ["run", "x", "--input", "--home", "--output", "json"]) == [
        "--output", "json", "run", "x", "--input", "--home"]
    assert hoist_global_options(root, ctx, ["token", "create", "--name", "--output", "--role", "admin"]) == [
        "token", "create", "--name", "--output", "--role", "admin"]
    assert hoist_global_options(root, ctx, ["--home", "a", "status", "--home=b", "--", "--home"]) == [
        "--home", "a", "--home=b", "status", "--", "--home"]


# -- bad input names the field ------------------------------------------------------------------------------


def test_a_misspelt_run_state_is_a_usage_error_with_the_nearest_state(cli: Cli, echo: str) -> None:
    done = expect(cli("history", "--status", "succeded"), 2)
    assert "'--status'" in done.stderr
    assert "did you mean 'succeeded'?" in done.stderr
    assert "queued, running, succeeded" in done.stderr
    expect(cli("run", echo), 0)
    rows = as_json(cli("history", "--status", "succeeded", "--output", "json"))
    assert [r["status"] for r in rows] == ["succeeded"]


def test_a_users_sql_error_is_a_sql_error(cli: Cli, echo: str) -> None:
    done = expect(cli("history", "--sql", "selec run_id from runs"), 2)
    assert done.stderr.startswith('error: SQL: Parser Error: syntax error at or near "selec"'), done.stderr
    assert "internal error" not in done.stderr

    done = expect(cli("history", "--sql", "select * from nosuch"), 2)
    assert done.stderr.startswith("error: SQL: Catalog Error: Table with name nosuch does not exist"), done.stderr

    done = expect(cli("history", "--sql", "delete from runs"), 2)  # the ledger is opened read-only
    assert done.stderr.startswith("error: SQL: ") and "read-only" in done.stderr, done.stderr

    rows = as_json(cli("history", "--sql", "select count(*) as n from runs", "--output", "json"))
    assert rows == [{"n": 0}]


# -- one limit of a run's input -----------------------------------------------------------------------------


def input_files(tmp_path: Path, unit: str) -> tuple[Path, Path]:
    """A file of exactly MAX_INPUT bytes of UTF-8 made of ``unit``, and one a byte longer."""
    size = len(unit.encode())
    assert MAX_INPUT % size == 0
    at, over = tmp_path / "at-limit.txt", tmp_path / "over-limit.txt"
    at.write_bytes((unit * (MAX_INPUT // size)).encode())
    over.write_bytes(at.read_bytes() + b"x")
    return at, over


def recorded_input_size(home: Path, run_id: str) -> int:
    rows = ledger(home, "SELECT octet_length(encode(input)) FROM runs WHERE run_id = ?", [run_id])
    return int(rows[0][0])


def test_the_input_limit_without_a_daemon(tmp_path: Path, home: Path, cli: Cli, echo: str) -> None:
    at, over = input_files(tmp_path, "é")  # two bytes a character: the limit counts bytes, not characters
    done = as_json(cli("--output", "json", "run", echo, "--input-file", str(at)))
    assert done["status"] == "succeeded"
    assert recorded_input_size(home, done["run_id"]) == MAX_INPUT

    refused = expect(cli("run", echo, "--input-file", str(over)), 2)
    assert refused.stderr == f"error: --input-file: {MAX_INPUT + 1} {OVER}\n"
    assert refused.stdout == ""
    assert ledger(home, "SELECT count(*) FROM runs") == [(1,)]  # nothing ran


def test_the_input_limit_through_the_daemon(tmp_path: Path, home: Path, cli: Cli, echo: str,
                                            daemons: MakeDaemon) -> None:  # noqa: F811
    daemon = daemons()
    # The costliest input to carry: every byte a control character, six bytes each on the control socket.
    at, over = input_files(tmp_path, "\x01")
    done = as_json(cli("--output", "json", "run", echo, "--input-file", str(at)))
    assert done["status"] == "succeeded"
    assert f"run {done['run_id']} of echo ended: succeeded" in daemon.log()  # the daemon ran it
    wait_ledger(home, "SELECT octet_length(encode(input)) AS n FROM runs WHERE run_id = ?", [done["run_id"]],
                until=lambda rows: rows == [{"n": MAX_INPUT}], what="the run's whole input in the ledger")

    refused = expect(cli("run", echo, "--input-file", str(over)), 2)
    assert refused.stderr == f"error: --input-file: {MAX_INPUT + 1} {OVER}\n"
    assert refused.stdout == ""

    # Another caller of the control socket meets the same limit, said the same way.
    answer = daemon.call({"op": "ping"})
    assert answer["pid"] == daemon.pid
    big = call(daemon.socket, {"op": "run", "agent": echo, "input": "y" * (MAX_INPUT + 1)}, timeout=60)
    assert big == {"ok": False, "code": "too_large", "error": f"input: {MAX_INPUT + 1} {OVER}"}


# -- status: the daemon and the source ------------------------------------------------------------------------


def test_status_says_whether_a_daemon_runs(home: Path, cli: Cli, echo: str,
                                           daemons: MakeDaemon) -> None:  # noqa: F811
    alone = as_json(cli("status", "--output", "json"))
    assert alone["daemon"] == {"running": False}
    assert "no daemon runs for this home" in expect(cli("status"), 0).stdout

    daemon = daemons()
    # The daemon records its API address in the home once the port is bound, which may follow its first ping.
    served = poll(lambda: (d := as_json(cli("status", "--output", "json"))["daemon"])["api"] and d,
                  "status to show the daemon's API address")
    assert served["running"] is True
    assert (served["pid"], served["version"]) == (daemon.pid, __version__)
    assert re.fullmatch(r"127\.0\.0\.1:\d+", served["api"]), served
    assert served["runs"] == {"running": 0, "queued": 0}
    assert served["settings"]["AGENT_ORCH_SANDBOX"] == "strict"
    assert served["settings"]["OPENAI_API_KEY"] == ""  # public settings: a secret is only ever "(set)" or ""
    text = expect(cli("status"), 0).stdout
    assert re.search(rf"^daemon pid {daemon.pid}, version {re.escape(__version__)}, API {served['api']}; ", text,
                     re.M), text

    daemon.terminate()
    poll(lambda: as_json(cli("status", "--output", "json"))["daemon"] == {"running": False},
         "status to see the daemon gone")


def test_status_says_where_the_source_comes_from(repo: SpecRepo, home: Path, cli: Cli, echo: str,
                                                 tmp_path: Path) -> None:
    source = as_json(cli("status", "--output", "json"))["source"]
    assert source["location"] == f"{repo.path}@HEAD:specs"
    assert source["from"] == {"source": "environment", "ref": "default", "path": "default"}
    assert source["revision"] and source["reconciled_at"]
    assert f"source {repo.path}@HEAD:specs (from AGENT_ORCH_SOURCE) at " in expect(cli("status"), 0).stdout

    other = SpecRepo(tmp_path / "other")
    other.spec("other")
    other.commit("one agent")
    settings = home / "config" / "settings.json"
    settings.parent.mkdir(parents=True, exist_ok=True)
    settings.write_text(json.dumps({"AGENT_ORCH_SOURCE_REF": "main",
                                    "clients": {"default": {"AGENT_ORCH_SOURCE": str(other.path)}}}))
    source = as_json(cli("status", "--output", "json"))["source"]
    assert source["location"] == f"{other.path}@main:specs"
    assert source["from"] == {"source": "client section", "ref": "environment", "path": "default"}
    assert source["reconciled_location"] == f"{repo.path}@HEAD:specs"  # what the last apply read
    assert "last reconciled from" in expect(cli("status"), 0).stdout
    settings.unlink()

    # Outside any checkout and with no AGENT_ORCH_SOURCE: the home's record of the last apply --source.
    expect(agentctl("apply", "--source", str(other.path), home=home, cwd=tmp_path), 0)
    source = as_json(agentctl("status", "--output", "json", home=home, cwd=tmp_path))["source"]
    assert (source["location"], source["from"]["source"]) == (f"{other.path}@HEAD:specs", "home")

    # A home with no record: the checkout, and there is none here.
    source = as_json(agentctl("status", "--output", "json", home=tmp_path / "new-home", cwd=tmp_path))["source"]
    assert (source["location"], source["from"]["source"]) == (None, "checkout")
    assert "no spec source" in source["problem"]
    assert "no source:" in expect(agentctl("status", home=tmp_path / "new-home", cwd=tmp_path), 0).stdout


# -- settings the daemon does not share -----------------------------------------------------------------------


def test_a_setting_the_daemon_does_not_share_is_named(cli: Cli, echo: str,
                                                      daemons: MakeDaemon) -> None:  # noqa: F811
    daemons(env={"DEFAULT_AGENT_TIMEOUT": "77"})

    quiet = expect(cli("run", echo), 0)  # nothing given to agentctl: the daemon's 77 is no surprise
    assert quiet.stderr == ""

    given = expect(cli("run", echo, env={"ENABLE_REMOTE_TOOLS": "true", "OPENAI_API_KEY": "sk-not-shown-4c1d",
                                         "AGENT_ORCH_LOG_FORMAT": "json"}), 0)
    assert given.stderr.splitlines() == [
        "warning: the daemon runs with OPENAI_API_KEY unset; this command's OPENAI_API_KEY set does not apply "
        "(restart the daemon to change it)",
        "warning: the daemon runs with ENABLE_REMOTE_TOOLS=false; this command's ENABLE_REMOTE_TOOLS=true does not "
        "apply (restart the daemon to change it)",
    ]
    assert "sk-not-shown-4c1d" not in given.stderr + given.stdout

    same = expect(cli("stop", echo, env={"DEFAULT_AGENT_TIMEOUT": "77", "ENABLE_REMOTE_TOOLS": "false"}), 0)
    assert same.stderr == ""
    other = expect(cli("start", echo, env={"DEFAULT_AGENT_TIMEOUT": "5"}), 0)
    assert other.stderr == ("warning: the daemon runs with DEFAULT_AGENT_TIMEOUT=77; this command's "
                            "DEFAULT_AGENT_TIMEOUT=5 does not apply (restart the daemon to change it)\n")
