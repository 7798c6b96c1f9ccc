"""The git source, plan/apply, the applied state and the ledger's reconciles, through the real agentctl.

Every test builds a real git repository in tmp_path and runs the CLI in a subprocess against a fresh
home; the applied state (state.sqlite) and the ledger (runs.duckdb) are opened as files afterwards.
"""

from __future__ import annotations

import json
import re
import shutil
import sqlite3
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

import duckdb
from conftest import SpecRepo, agentctl, git

Cli = Callable[..., subprocess.CompletedProcess[str]]

BOGUS = "bogus: 1\n"  # an unknown field: line 4, column 1 of a spec written by SpecRepo.spec
BOGUS_PROBLEM = "error: bogus: unknown field 'bogus'"


def expect(done: subprocess.CompletedProcess[str], code: int) -> subprocess.CompletedProcess[str]:
    assert done.returncode == code, f"exit {done.returncode}, wanted {code}\nstdout:\n{done.stdout}\n" \
                                    f"stderr:\n{done.stderr}"
    return done


def lines(done: subprocess.CompletedProcess[str]) -> list[str]:
    return done.stdout.splitlines()


def split_invalid(out: list[str]) -> tuple[list[str], list[str]]:
    """The `invalid ...` lines, and the other change lines sorted (their order is not part of the contract)."""
    return [o for o in out if o.startswith("invalid ")], sorted(o for o in out if not o.startswith("invalid "))


def status_of(cli: Cli) -> dict[str, Any]:
    """`agentctl --output json status` as a dict, agents by name."""
    data = json.loads(expect(cli("--output", "json", "status"), 0).stdout)
    data["agents"] = {a["name"]: a for a in data["agents"]}
    return data


def applied_rows(home: Path) -> dict[str, dict[str, Any]]:
    """The agents table of the state database, read after the CLI has exited."""
    conn = sqlite3.connect(home / "state.sqlite")
    conn.row_factory = sqlite3.Row
    try:
        return {r["name"]: dict(r) for r in conn.execute("SELECT * FROM agents")}
    finally:
        conn.close()


def condition(agent: dict[str, Any], kind: str) -> dict[str, Any]:
    return next(c for c in agent["conditions"] if c["type"] == kind)


# -- plan ------------------------------------------------------------------------------------------


def test_plan_lists_each_change_and_exits_by_state(repo: SpecRepo, cli: Cli) -> None:
    repo.spec("a", extra="constraints:\n  max_tokens: 100\n")
    repo.spec("b")
    repo.commit()
    assert sorted(lines(expect(cli("plan"), 1))) == ["create a", "create b"]
    expect(cli("apply"), 0)
    assert lines(expect(cli("plan"), 0)) == []

    repo.spec("a", model="mistral", extra="constraints:\n  max_tokens: 200\n")
    repo.remove("specs/b.yaml")
    repo.spec("c", extra=BOGUS)
    head = repo.commit()
    invalid, others = split_invalid(lines(expect(cli("plan"), 1)))
    assert len(invalid) == 1 and invalid[0].startswith(f"invalid c: specs/c.yaml:4:1: {BOGUS_PROBLEM}")
    assert others == ["delete b", "update a (constraints.max_tokens, model)"]

    doc = json.loads(expect(cli("--output", "json", "plan"), 1).stdout)  # one JSON document, nothing else
    assert doc["revision"] == head
    assert doc["in_sync"] is False
    changes = {c["name"]: c for c in doc["changes"]}
    assert {n: c["action"] for n, c in changes.items()} == {"a": "update", "b": "delete", "c": "invalid"}
    assert changes["a"]["fields"] == ["constraints.max_tokens", "model"]
    assert [(p["line"], p["col"], p["field"]) for p in changes["c"]["problems"]] == [(4, 1, "bogus")]


def test_plan_errors_exit_2(repo: SpecRepo, cli: Cli, tmp_path: Path) -> None:
    repo.spec("a")
    repo.commit()
    git(repo.path, "tag", "old")
    repo.write("more/x.yaml", "name: x\nmodel: llama2\ndescription: elsewhere\n")
    repo.commit()

    plain = tmp_path / "plain"
    plain.mkdir()
    not_repo = expect(cli("plan", "--source", str(plain)), 2)
    assert "is not a git repository" in not_repo.stderr
    no_ref = expect(cli("plan", "--ref", "no-such-branch"), 2)
    assert "ref 'no-such-branch' not found" in no_ref.stderr
    # `more/` exists at HEAD but not at the tag
    assert lines(expect(cli("plan", "--path", "more"), 1)) == ["create x"]
    no_folder = expect(cli("plan", "--ref", "old", "--path", "more"), 2)
    assert "folder 'more' not found" in no_folder.stderr
    assert "Traceback" not in not_repo.stderr + no_ref.stderr + no_folder.stderr


def test_path_is_normalized(repo: SpecRepo, cli: Cli, home: Path, tmp_path: Path) -> None:
    repo.spec("a")
    repo.write("top.yaml", "name: top\nmodel: llama2\ndescription: at the root\n")
    repo.commit()
    assert lines(expect(cli("apply", "--path", "./specs/"), 0)) == ["create a"]
    assert applied_rows(home)["a"]["path"] == "a.yaml"

    other = tmp_path / "other-home"
    expect(agentctl("apply", "--source", str(repo.path), "--path", ".", home=other), 0)
    assert {n: r["path"] for n, r in applied_rows(other).items()} == {"a": "specs/a.yaml", "top": "top.yaml"}


# -- apply and the applied state -------------------------------------------------------------------


def test_invalid_spec_keeps_last_good_version_and_recovers(repo: SpecRepo, cli: Cli, home: Path) -> None:
    repo.spec("a")
    repo.spec("b")
    first = repo.commit()
    expect(cli("apply"), 0)

    repo.spec("a", model="mistral")
    repo.spec("b", description="changed", extra=BOGUS)
    second = repo.commit()
    invalid, others = split_invalid(lines(expect(cli("apply"), 1)))  # b is invalid, a is applied anyway
    assert len(invalid) == 1 and invalid[0].startswith(f"invalid b: specs/b.yaml:4:1: {BOGUS_PROBLEM}")
    assert others == ["update a (model)"]

    text = expect(cli("status"), 0).stdout
    assert re.search(rf"^b\s+Invalid\s+{first[:12]}\s.*specs/b\.yaml:4:1: {BOGUS_PROBLEM}", text, re.M), text
    assert re.search(rf"^a\s+Ready\s+{second[:12]}\s", text, re.M), text

    st = status_of(cli)
    a, b = st["agents"]["a"], st["agents"]["b"]
    assert (a["state"], a["generation"], a["revision"]) == ("Ready", 2, second[:12])
    assert (b["state"], b["generation"], b["revision"]) == ("Invalid", 1, first[:12])
    assert BOGUS_PROBLEM in b["message"]
    assert condition(b, "Synced")["status"] == "False"
    assert condition(b, "Synced")["reason"] == "Invalid"
    assert condition(b, "Ready") | {"since": None} == {
        "type": "Ready", "status": "True", "reason": "LastGoodSpec", "message": "running its last valid spec",
        "since": None}
    assert st["source"]["revision"] == second
    rows = applied_rows(home)
    assert json.loads(rows["b"]["spec"])["description"] == "agent b"  # the last good spec, not "changed"
    assert (rows["b"]["applied_revision"], rows["b"]["attempted_revision"]) == (first, second)

    repo.spec("b", description="changed")
    third = repo.commit()
    assert lines(expect(cli("apply"), 0)) == ["update b (description)"]
    b = status_of(cli)["agents"]["b"]
    assert (b["state"], b["generation"], b["revision"]) == ("Ready", 2, third[:12])
    assert condition(b, "Synced")["status"] == "True"


def test_yaml_syntax_error_at_an_applied_path_does_not_delete_the_agent(repo: SpecRepo, cli: Cli) -> None:
    repo.spec("a")
    repo.spec("b")
    repo.commit()
    expect(cli("apply"), 0)

    repo.write("specs/a.yaml", "name: a\nmodel: [llama2\n")
    repo.commit()
    out = lines(expect(cli("plan"), 1))
    assert len(out) == 1 and re.match(r"invalid a: specs/a\.yaml:\d+:\d+: error: ", out[0]), out
    expect(cli("apply"), 1)
    agents = status_of(cli)["agents"]
    assert set(agents) == {"a", "b"}
    assert (agents["a"]["state"], agents["a"]["generation"]) == ("Invalid", 1)
    assert condition(agents["a"], "Ready")["reason"] == "LastGoodSpec"
    assert agents["b"]["state"] == "Ready"


def test_removing_every_spec_is_refused_unless_allowed(repo: SpecRepo, cli: Cli, home: Path) -> None:
    repo.spec("a")
    repo.spec("b")
    repo.commit()
    expect(cli("apply"), 0)

    repo.remove("specs/a.yaml")
    repo.remove("specs/b.yaml")
    repo.write("specs/README.md", "no agents for now\n")
    repo.commit()
    refused = expect(cli("apply"), 2)
    assert "would delete every agent" in refused.stderr
    assert set(applied_rows(home)) == {"a", "b"}

    repo.remove("specs/README.md")  # now the folder itself is gone from the commit
    repo.commit()
    expect(cli("apply"), 2)
    assert set(applied_rows(home)) == {"a", "b"}
    allowed = expect(cli("apply", "--allow-empty"), 0)
    assert sorted(lines(allowed)) == ["delete a", "delete b"]
    assert applied_rows(home) == {}


def test_an_agent_deleted_by_an_apply_takes_its_fired_slots_along(repo: SpecRepo, cli: Cli, home: Path) -> None:
    """The slots an agent's schedules fired (``trigger_state``, the daemon's table) go with the agent, whichever
    process deletes it: here agentctl apply, which loads none of the daemon's code."""
    import runner.supervise.triggers  # noqa: F401  (the table's owner: its tables come with connect, as in a daemon)
    from runner.state import connect

    repo.spec("a")
    repo.spec("b")
    repo.commit()
    expect(cli("apply"), 0)
    conn = connect(home / "state.sqlite")
    try:
        conn.executemany("INSERT INTO trigger_state (client_id, agent, trigger_key, last_slot) "
                         "VALUES ('default', ?, '0|* * * * *|UTC', '2026-01-01T00:00:00+00:00')", [("a",), ("b",)])
        repo.remove("specs/b.yaml")
        repo.commit()
        expect(cli("apply"), 0)
        assert [r[0] for r in conn.execute("SELECT agent FROM trigger_state")] == ["a"]
    finally:
        conn.close()


def test_generation_counts_applied_changes_and_revisions_are_tracked(repo: SpecRepo, cli: Cli, home: Path) -> None:
    repo.spec("a")
    first = repo.commit()
    expect(cli("apply"), 0)
    expect(cli("apply"), 0)  # nothing changed
    repo.write("README.md", "not a spec\n")
    second = repo.commit()
    assert lines(expect(cli("apply"), 0)) == []
    row = applied_rows(home)["a"]
    assert (row["generation"], row["applied_revision"], row["attempted_revision"]) == (1, first, second)

    repo.spec("a", model="mistral")
    third = repo.commit()
    assert lines(expect(cli("apply"), 0)) == ["update a (model)"]
    row = applied_rows(home)["a"]
    assert (row["generation"], row["applied_revision"], row["attempted_revision"]) == (2, third, third)


def test_specs_come_from_commits_not_the_work_tree(repo: SpecRepo, cli: Cli) -> None:
    repo.spec("a")
    repo.commit()
    expect(cli("apply"), 0)
    repo.spec("a", model="mistral")  # edited, not committed
    repo.spec("staged")
    git(repo.path, "add", "specs/staged.yaml")  # staged, not committed
    repo.spec("loose")
    assert lines(expect(cli("plan"), 0)) == []
    repo.commit()
    assert sorted(lines(expect(cli("plan"), 1))) == ["create loose", "create staged", "update a (model)"]


def test_renaming_a_spec_file_keeps_the_agent(repo: SpecRepo, cli: Cli, home: Path) -> None:
    repo.spec("a")
    repo.commit()
    expect(cli("apply"), 0)
    repo.path.joinpath("specs", "team").mkdir()
    git(repo.path, "mv", "specs/a.yaml", "specs/team/renamed.yaml")
    repo.commit()
    assert lines(expect(cli("plan"), 0)) == []
    assert lines(expect(cli("apply"), 0)) == []
    row = applied_rows(home)["a"]
    assert (row["generation"], row["path"]) == (1, "team/renamed.yaml")

    # a broken file at the old path is not the renamed agent
    repo.write("specs/a.yaml", "name: [oops\n")
    repo.commit()
    out = lines(expect(cli("plan"), 1))
    assert len(out) == 1 and out[0].startswith("invalid specs/a.yaml: "), out


def test_ref_picks_a_branch_or_a_tag(repo: SpecRepo, cli: Cli, home: Path) -> None:
    repo.spec("a")
    first = repo.commit()
    git(repo.path, "tag", "v1")
    git(repo.path, "checkout", "-q", "-b", "feature")
    repo.spec("b")
    repo.commit()
    git(repo.path, "checkout", "-q", "main")
    repo.spec("a", model="mistral")
    repo.commit()

    assert sorted(lines(expect(cli("plan", "--ref", "feature"), 1))) == ["create a", "create b"]
    assert lines(expect(cli("apply", "--ref", "v1"), 0)) == ["create a"]
    assert applied_rows(home)["a"]["applied_revision"] == first
    assert lines(expect(cli("plan"), 1)) == ["update a (model)"]


def test_remote_source_is_mirrored_under_home_and_follows_new_commits(repo: SpecRepo, cli: Cli,
                                                                      home: Path) -> None:
    url = repo.path.as_uri()
    repo.spec("a")
    repo.commit()
    git(repo.path, "branch", "feature")
    assert lines(expect(cli("apply", "--source", url), 0)) == ["create a"]
    mirrors = [p for p in (home / "sources").rglob("*.git") if (p / "HEAD").is_file()]
    assert len(mirrors) == 1, mirrors
    assert git(mirrors[0], "rev-parse", "--is-bare-repository") == "true"

    repo.spec("b")
    head = repo.commit()
    assert lines(expect(cli("plan", "--source", url), 1)) == ["create b"]
    assert git(mirrors[0], "rev-parse", "main") == head  # fetched into the mirror
    assert lines(expect(cli("plan", "--source", url, "--ref", "feature"), 0)) == []

    # a clone killed half-way leaves its temporary folder behind; the next clone must not trip over it
    shutil.rmtree(mirrors[0])
    leftover = mirrors[0].with_suffix(".tmp")
    leftover.mkdir()
    (leftover / "HEAD").write_text("half a clone\n")
    assert lines(expect(cli("plan", "--source", url), 1)) == ["create b"]
    assert git(mirrors[0], "rev-parse", "main") == head


# -- the ledger ------------------------------------------------------------------------------------


def test_each_apply_and_failed_read_is_a_reconciles_row(repo: SpecRepo, cli: Cli, home: Path,
                                                         tmp_path: Path) -> None:
    repo.spec("a")
    repo.spec("b")
    first = repo.commit()
    expect(cli("apply"), 0)
    missing = expect(cli("apply", "--ref", "missing"), 2)
    assert "ref 'missing' not found" in missing.stderr
    (tmp_path / "plain").mkdir()
    expect(cli("apply", "--source", str(tmp_path / "plain")), 2)
    assert set(applied_rows(home)) == {"a", "b"}  # nothing deleted by sources that cannot be read

    repo.spec("a", model="mistral")
    repo.remove("specs/b.yaml")
    repo.spec("c", extra=BOGUS)
    second = repo.commit()
    expect(cli("apply"), 1)
    expect(cli("apply"), 1)  # c is still invalid; nothing else to do

    expected = [  # oldest first: revision, created, updated, deleted, invalid, initiator
        (first, 2, 0, 0, 0, "cli:apply"),
        (None, 0, 0, 0, 0, "cli:apply"),
        (None, 0, 0, 0, 0, "cli:apply"),
        (second, 0, 1, 1, 1, "cli:apply"),
        (second, 0, 0, 0, 1, "cli:apply"),
    ]
    history = json.loads(expect(cli("--output", "json", "history", "--reconciles"), 0).stdout)
    assert [(h["revision"], h["created"], h["updated"], h["deleted"], h["invalid"], h["initiator"])
            for h in reversed(history)] == expected
    errors = [h["error"] for h in reversed(history)]
    assert errors[0] is None and errors[3] is None
    assert "ref 'missing' not found" in errors[1]
    assert "not a git repository" in errors[2]

    con = duckdb.connect(str(home / "runs.duckdb"), read_only=True)
    try:
        rows = con.execute("SELECT revision, created, updated, deleted, invalid, initiator, client_id, "
                           "started_at <= ended_at FROM reconciles ORDER BY started_at").fetchall()
    finally:
        con.close()
    assert [r[:6] for r in rows] == expected
    assert all(r[6] == "default" and r[7] for r in rows)


# -- start and stop --------------------------------------------------------------------------------


def test_start_and_stop_toggle_suspended(repo: SpecRepo, cli: Cli) -> None:
    repo.spec("a")
    repo.spec("b")
    repo.commit()
    expect(cli("apply"), 0)
    assert expect(cli("stop", "a"), 0).stdout.strip() == "a suspended"
    repo.spec("a", model="mistral")
    repo.commit()
    expect(cli("apply"), 0)  # a new spec does not resume a suspended agent
    agents = status_of(cli)["agents"]
    assert (agents["a"]["state"], agents["a"]["suspended"], agents["a"]["generation"]) == ("Suspended", True, 2)
    assert agents["b"]["state"] == "Ready"

    assert expect(cli("start", "a"), 0).stdout.strip().startswith("a resumed; run ")  # resume and run now
    assert re.search(r"^a\s+Ready\s", expect(cli("status", "a"), 0).stdout, re.M)
    for command in ("start", "stop"):
        done = expect(cli(command, "nope"), 2)
        assert "no agent named 'nope'" in done.stderr
        assert "Traceback" not in done.stderr
