"""Every tool call is checked before it acts: file tricks, SQL, shell, HTTP hops and custom tools.

Each test runs a scripted agent through the real agentctl and reads the decisions back from the ledger.
A denied call is answered to the model as a tool error, so the runs here go on and succeed; what they
were refused never shows up in the output, the agent log or the ledger.
"""

from __future__ import annotations

import os
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import SpecRepo
from test_run import Cli, apply, call, expect, ledger, run, run_row, scripted_agent, tool_events, turn

PEEK = '''\
"""A custom tool: the first lines of a file."""

from langchain_core.tools import tool

PERMISSIONS = ["read"]


@tool
def peek(path: str, lines: int = 5) -> str:
    """Return the first `lines` lines of the text file at `path`."""
    with open(path, encoding="utf-8", errors="replace") as handle:
        return "".join(handle.readline() for _ in range(max(1, min(lines, 100))))
'''

BROKEN = '''\
"""A custom tool whose import fails when a run loads it (the validator never imports it)."""

import no_such_module_for_agent_tests  # noqa: F401
from langchain_core.tools import tool

PERMISSIONS = ["read"]


@tool
def broken(path: str) -> str:
    """Never gets this far."""
    return path
'''

PASSWD_LINE = "root:x:0:0"  # the start of /etc/passwd, which no run here may read


def by_path(tool_calls: list[dict[str, Any]], key: str = "path") -> dict[str, dict[str, Any]]:
    return {e["detail"]["args"][key]: e for e in tool_calls}


def hard_link(target_dir: Path, link: Path, marker: str) -> Path:
    """A hard link at ``link`` to a file outside; the file it links to, with ``marker`` in it."""
    for attempt in range(3):
        source = target_dir / f"linked-{attempt}.txt"
        source.write_text(f"hard-linked {marker}\n")
        try:
            os.link(source, link)
            return source
        except OSError:
            continue
    pytest.fail("this file system refuses hard links between two folders of tmp_path")


def assert_nowhere(home: Path, run_id: str, secrets: list[str], *also: str) -> None:
    """None of ``secrets`` in the given texts, the run's ledger rows, or any file under home."""
    for text in also:
        for secret in secrets:
            assert secret not in text
    for secret in secrets:
        like = f"%{secret}%"
        assert ledger(home, "SELECT count(*) FROM run_events WHERE detail::VARCHAR LIKE ?", [like]) == [(0,)]
        assert ledger(home, "SELECT count(*) FROM runs WHERE coalesce(output, '') LIKE ? OR "
                            "coalesce(error, '') LIKE ? OR coalesce(input, '') LIKE ?", [like, like, like]) == [(0,)]
    for path in home.rglob("*"):
        if path.is_file() and not path.is_symlink():
            data = path.read_bytes()
            for secret in secrets:
                assert secret.encode() not in data, f"{secret!r} found in {path}"
    assert run_row(home, run_id)["status"] == "succeeded"


# -- file access ----------------------------------------------------------------------------------------


def test_every_file_access_trick_is_denied_and_recorded(repo: SpecRepo, cli: Cli, home: Path, tmp_path: Path) -> None:
    marker = f"FORBIDDEN-{uuid.uuid4().hex}"
    allowed, readonly, writable, outside = (tmp_path / n for n in ("allowed", "readonly", "writable", "outside"))
    for folder in (allowed, readonly, writable, outside):
        folder.mkdir()
    (allowed / "ok.txt").write_text("fine to read\n")
    (outside / "secret.txt").write_text(f"{marker}\n")
    (outside / "victim.txt").write_text("unchanged\n")
    (allowed / "escape.txt").symlink_to(outside / "secret.txt")
    (allowed / "elsewhere").symlink_to(outside, target_is_directory=True)
    hard_link(outside, allowed / "hard.txt", marker)
    (writable / "out-link.txt").symlink_to(outside / "victim.txt")
    hard_link(outside, writable / "hard-w.txt", marker)

    reads = {
        "ok": str(allowed / "ok.txt"),
        "listing": str(allowed),
        "dotdot": f"{allowed}/../outside/secret.txt",
        "shadow": "/etc/shadow",
        "passwd": "/etc/passwd",
        "symlink": str(allowed / "escape.txt"),
        "dir-symlink": str(allowed / "elsewhere"),
        "through-dir-symlink": str(allowed / "elsewhere" / "secret.txt"),
        "proc-root": "/proc/self/root/etc/passwd",
        "proc-root-outside": f"/proc/self/root{outside}/secret.txt",
        "hard-link": str(allowed / "hard.txt"),
        "relative": "outside/secret.txt",
    }
    writes = {
        "reader-only": str(readonly / "new.txt"),
        "writable": str(writable / "new.txt"),
        "writer-symlink": str(writable / "out-link.txt"),
        "writer-hard-link": str(writable / "hard-w.txt"),
        "writer-dotdot": f"{writable}/../outside/victim.txt",
    }
    scripted_agent(repo, "prober", [
        turn(*(call("file_reader", path=p) for p in reads.values())),
        turn(*(call("file_writer", path=p, content="overwritten") for p in writes.values())),
        turn(content="Finished probing."),
    ], tools=[{"name": "file_reader", "paths": [str(allowed), str(readonly)]},
              {"name": "file_writer", "paths": [str(writable)]}])
    apply(repo, cli)

    result = run(cli, "prober", code=0)
    assert result["status"] == "succeeded" and result["output"] == "Finished probing."
    calls = tool_events(home, result["run_id"])
    got = by_path(calls)
    allowed_keys = {"ok", "listing", "writable"}
    for key, path in {**reads, **writes}.items():
        event = got[path]
        want = "allowed" if key in allowed_keys else "denied"
        assert event["decision"] == want, (key, event)
        if want == "denied":
            assert event["detail"]["reason"], (key, event)
            assert "result_bytes" not in event["detail"]
    assert got[reads["ok"]]["detail"]["result_bytes"] == len("fine to read\n")
    assert "hard links" in got[reads["hard-link"]]["detail"]["reason"]
    assert "hard links" in got[writes["writer-hard-link"]]["detail"]["reason"]
    assert "absolute" in got[reads["relative"]]["detail"]["reason"]
    for key in ("dotdot", "symlink", "dir-symlink", "through-dir-symlink", "proc-root-outside"):
        assert f"resolves to '{outside}" in got[reads[key]]["detail"]["reason"], key
    assert "resolves to '/etc/passwd'" in got[reads["proc-root"]]["detail"]["reason"]
    assert "outside the allowed paths" in got[writes["reader-only"]]["detail"]["reason"]

    # Only the allowed write happened.
    assert (writable / "new.txt").read_text() == "overwritten"
    assert not (readonly / "new.txt").exists()
    assert (outside / "victim.txt").read_text() == "unchanged\n"
    assert marker in (outside / "secret.txt").read_text()

    log = (home / "logs" / "agents" / "prober.log").read_text()
    assert log.count("DENIED") == len(reads) + len(writes) - len(allowed_keys)
    shown = expect(cli("logs", "prober", "--run", result["run_id"]), 0).stdout
    assert_nowhere(home, result["run_id"], [marker, PASSWD_LINE],
                   result["_stdout"], result["_stderr"], log, shown)


# -- data_analyzer --------------------------------------------------------------------------------------


def test_data_analyzer_reads_its_paths_and_nothing_else(repo: SpecRepo, cli: Cli, home: Path, tmp_path: Path) -> None:
    marker = f"FORBIDDEN-{uuid.uuid4().hex}"
    data, linked, outside = tmp_path / "data", tmp_path / "linked", tmp_path / "outside"
    for folder in (data, linked, outside):
        folder.mkdir()
    for folder in (data, linked):
        (folder / "nums.csv").write_text("n\n1\n2\n3\n")
    (outside / "secret.csv").write_text(f"s\n{marker}\n")
    (data / "link.csv").symlink_to(outside / "secret.csv")
    (data / "sub").symlink_to(outside, target_is_directory=True)
    hard_link(outside, linked / "hard.csv", marker)  # in a folder of its own: it changes how DuckDB is set up

    total = len("total\n6")
    queries = {
        "select": (data, f"SELECT sum(n) AS total FROM read_csv('{data}/nums.csv')"),
        "select-glob": (data, f"SELECT sum(n) AS total FROM read_csv('{data}/nums*.csv')"),
        "copy": (data, f"COPY (SELECT 42 AS x) TO '{data}/copied.csv'"),
        "attach": (data, f"ATTACH '{data}/other.duckdb' AS other"),
        "create": (data, "CREATE TABLE t AS SELECT 1 AS x"),
        "two": (data, "SELECT 1; SELECT 2"),
        "outside": (data, f"SELECT * FROM read_csv('{outside}/secret.csv')"),
        "passwd": (data, "SELECT * FROM read_text('/etc/passwd')"),
        "symlink": (data, f"SELECT * FROM read_csv('{data}/link.csv')"),
        "symlink-bare": (data, f"SELECT * FROM '{data}/link.csv'"),
        "dir-symlink": (data, f"SELECT * FROM read_csv('{data}/sub/secret.csv')"),
        "glob-with-symlink": (data, f"SELECT * FROM read_csv('{data}/*.csv')"),
        "built-symlink": (data, f"SELECT * FROM read_csv('{data}/' || 'link.csv')"),
        "built-dir-symlink": (data, f"SELECT * FROM read_csv(concat('{data}/', 'sub/secret.csv'))"),
        "linked-select": (linked, f"SELECT sum(n) AS total FROM read_csv('{linked}/nums.csv')"),
        "hard-link": (linked, f"SELECT * FROM read_csv('{linked}/hard.csv')"),
        "built-hard-link": (linked, f"SELECT * FROM read_csv('{linked}/' || 'hard.csv')"),
    }
    for name, folder in (("analyst", data), ("linked-analyst", linked)):
        scripted_agent(repo, name, [
            turn(*(call("data_analyzer", query=q) for f, q in queries.values() if f == folder)),
            turn(content="Analysis complete."),
        ], tools=[{"name": "data_analyzer", "permissions": ["read", "execute"], "paths": [str(folder)]}])
    apply(repo, cli)

    got: dict[str, dict[str, Any]] = {}
    for name in ("analyst", "linked-analyst"):
        result = run(cli, name, code=0)
        assert result["output"] == "Analysis complete."
        got |= by_path(tool_events(home, result["run_id"]), key="query")
        log = (home / "logs" / "agents" / f"{name}.log").read_text()
        assert_nowhere(home, result["run_id"], [marker, PASSWD_LINE], result["_stdout"], log)
    for key, (_folder, query) in queries.items():
        event = got[query]
        if key in ("select", "select-glob", "linked-select"):
            assert event["decision"] == "allowed" and "error" not in event["detail"], (key, event)
            assert event["detail"]["result_bytes"] == total, key
        else:
            assert event["decision"] == "denied", (key, event)
            assert event["detail"]["reason"], key
    assert "only one SELECT" in got[queries["copy"][1]]["detail"]["reason"]
    assert "only one SELECT" in got[queries["two"][1]]["detail"]["reason"]
    assert "hard links" in got[queries["hard-link"][1]]["detail"]["reason"]
    assert not (data / "copied.csv").exists()
    assert not (data / "other.duckdb").exists()


# -- shell ----------------------------------------------------------------------------------------------


def test_shell_runs_only_listed_programs_without_a_shell(repo: SpecRepo, cli: Cli, home: Path,
                                                         tmp_path: Path) -> None:
    impostor = tmp_path / "bin" / "echo"  # named like an allowed program, but not it
    impostor.parent.mkdir()
    pwned = tmp_path / "pwned"
    impostor.write_text(f"#!/bin/sh\ntouch {pwned}\n")
    impostor.chmod(0o755)
    commands = {
        "echo": "echo hi",
        "not-listed": "cat /etc/passwd",
        "chained": "echo hi; cat /etc/passwd",
        "substitution": "echo $(cat /etc/passwd)",
        "impostor": f"{impostor} hi",
        "empty": "   ",
    }
    scripted_agent(repo, "sheller", [
        turn(*(call("shell", command=c) for c in commands.values())),
        turn(content="Shell done."),
    ], tools=[{"name": "shell", "commands": ["echo"]}])
    apply(repo, cli)

    result = run(cli, "sheller", code=0)
    got = by_path(tool_events(home, result["run_id"]), key="command")
    assert got["echo hi"]["decision"] == "allowed"
    assert got["echo hi"]["detail"]["result_bytes"] == len("exit 0\nhi\n")
    # No shell: the ';' and '$(...)' are echo's arguments, and cat never runs.
    assert got["echo hi; cat /etc/passwd"]["decision"] == "allowed"
    assert got["echo hi; cat /etc/passwd"]["detail"]["result_bytes"] == len("exit 0\nhi; cat /etc/passwd\n")
    assert got["echo $(cat /etc/passwd)"]["detail"]["result_bytes"] == len("exit 0\n$(cat /etc/passwd)\n")
    for key in ("not-listed", "impostor", "empty"):
        event = got[commands[key]]
        assert event["decision"] == "denied", (key, event)
        assert event["detail"]["reason"]
    assert "not in the tool's commands" in got["cat /etc/passwd"]["detail"]["reason"]
    assert not pwned.exists(), "a program outside the allow-list ran because its name matched"
    assert_nowhere(home, result["run_id"], [PASSWD_LINE], result["_stdout"])


# -- http_get -------------------------------------------------------------------------------------------


def test_http_get_reaches_allowed_hosts_hop_by_hop(repo: SpecRepo, cli: Cli, home: Path,
                                                   site: tuple[str, list[str]]) -> None:
    url, served = site
    fetch = [{"name": "http_get", "permissions": ["network"]}]
    scripted_agent(repo, "local-web", [
        turn(call("http_get", url=f"{url}/"), call("http_get", url=f"{url}/hop"), call("http_get", url=f"{url}/away")),
        turn(content="Fetched."),
    ], tools=fetch, constraints={"allowed_domains": ["local"]})
    scripted_agent(repo, "remote-web", [turn(call("http_get", url=f"{url}/")), turn(content="Fetched.")],
                   tools=fetch, constraints={"allowed_domains": ["example.com"]})
    apply(repo, cli)

    result = run(cli, "local-web", code=0)
    got = by_path(tool_events(home, result["run_id"]), key="url")
    page = len("HTTP 200\nhello from the test server")
    assert got[f"{url}/"]["decision"] == "allowed" and got[f"{url}/"]["detail"]["result_bytes"] == page
    assert got[f"{url}/hop"]["decision"] == "allowed" and got[f"{url}/hop"]["detail"]["result_bytes"] == page
    away = got[f"{url}/away"]
    assert away["decision"] == "denied"
    assert "forbidden.test" in away["detail"]["reason"] and "allowed_domains" in away["detail"]["reason"]
    assert served == ["/", "/hop", "/", "/away"]

    result = run(cli, "remote-web", code=0)
    (denied,) = tool_events(home, result["run_id"])
    assert denied["decision"] == "denied"
    assert "127.0.0.1" in denied["detail"]["reason"]
    assert served == ["/", "/hop", "/", "/away"], "the denied request reached the server"


# -- custom tools ---------------------------------------------------------------------------------------


def test_custom_tool_is_checked_like_a_builtin(repo: SpecRepo, cli: Cli, home: Path, tmp_path: Path) -> None:
    marker = f"FORBIDDEN-{uuid.uuid4().hex}"
    data, outside = tmp_path / "data", tmp_path / "outside"
    data.mkdir()
    outside.mkdir()
    (data / "a.txt").write_text("first line\nsecond line\n")
    (outside / "secret.txt").write_text(f"{marker}\n")
    repo.write("specs/tools/peek.py", PEEK)
    repo.write("specs/tools/broken.py", BROKEN)
    scripted_agent(repo, "peeker", [
        turn(call("peek", path=str(data / "a.txt"), lines=1), call("peek", path=str(outside / "secret.txt")),
             call("peek", path=f"{data}/../outside/secret.txt")),
        turn(content="Peeked."),
    ], tools=[{"name": "peek", "permissions": ["read"], "paths": [str(data)]}])
    scripted_agent(repo, "breaker", [turn(call("broken", path=str(data / "a.txt"))), turn(content="never")],
                   tools=[{"name": "broken", "paths": [str(data)]}])
    repo.commit()
    applied = expect(cli("apply"), 1)  # the agent using the tool that cannot be imported is Invalid
    assert "invalid breaker:" in applied.stdout and "no_such_module_for_agent_tests" in applied.stdout
    listed = expect(cli("tools"), 0).stdout
    assert "peek" in listed

    result = run(cli, "peeker", code=0)
    got = by_path(tool_events(home, result["run_id"]))
    inside = got[str(data / "a.txt")]
    assert inside["decision"] == "allowed" and inside["detail"]["result_bytes"] == len("first line\n")
    for path in (str(outside / "secret.txt"), f"{data}/../outside/secret.txt"):
        assert got[path]["decision"] == "denied"
        assert "outside the allowed paths" in got[path]["detail"]["reason"]
    log = (home / "logs" / "agents" / "peeker.log").read_text()
    assert_nowhere(home, result["run_id"], [marker], result["_stdout"], log)

    refused = cli("run", "breaker")  # it never had a valid spec, so it cannot run at all
    assert refused.returncode == 2 and "never had a valid spec" in refused.stderr
    assert "no_such_module_for_agent_tests" in refused.stderr
