"""Settings that are checked, and the source the home remembers.

- ``VECTOR_DB_URL`` takes what memory is (sqlite-vec files: a folder or a file:// URL) and refuses a server
  URL at start, with the fix, before anything is created; choices such as the log level take any case.
- After ``agentctl apply --source S --ref R --path P``, plan, run and the daemon follow S, R and P without
  flags, from any folder, including another git checkout; the levels above it still win, in INTERFACE.md's
  order (flags, the client's section, AGENT_ORCH_SOURCE*), and the checkout comes last.

Everything goes through the real agentctl (a subprocess) on real git repositories; the daemon is a real
`agentctl serve` waited for by polling /healthz.
"""

from __future__ import annotations

import json
from pathlib import Path

import yaml
from api_helpers import Served, free_port
from conftest import SpecRepo, agentctl, git
from test_run import Cli, apply, call, expect, run, scripted_agent, turn

REFUSAL = ("VECTOR_DB_URL=http://vector_db:8000: a vector database server is not supported; memory is sqlite-vec "
           "files: leave it empty or give a folder path or file:// URL")


# -- VECTOR_DB_URL and the other checked settings -----------------------------------------------------------


def test_a_vector_database_server_is_refused_at_start_with_the_fix(tmp_path: Path) -> None:
    work, home = tmp_path / "work", tmp_path / "home"
    work.mkdir()
    env = {"VECTOR_DB_URL": "http://vector_db:8000"}
    for args in (("status",), ("memory", "search", "hello", "anything"), ("serve", "--port", str(free_port()))):
        done = expect(agentctl(*args, home=home, cwd=work, env=env, timeout=60), 2)
        assert done.stderr.strip() == f"error: {REFUSAL}", (args, done.stderr)
    assert not (work / "http:").exists() and not list(work.iterdir()), "a refused setting still made folders"

    # The settings file is checked the same way, at its top level and in a client's section.
    (home / "config").mkdir(parents=True, exist_ok=True)
    for content in ({"VECTOR_DB_URL": "https://memory.example.com"},
                    {"clients": {"acme": {"VECTOR_DB_URL": "grpc://qdrant:6334"}}}):
        (home / "config" / "settings.json").write_text(json.dumps(content))
        done = expect(agentctl("--client-id", "acme", "status", home=home, cwd=work), 2)
        assert "a vector database server is not supported" in done.stderr and "VECTOR_DB_URL=" in done.stderr
    assert not (work / "https:").exists() and not (work / "grpc:").exists()


def test_memory_lives_where_vector_db_url_says(repo: SpecRepo, cli: Cli, home: Path, tmp_path: Path) -> None:
    scripted_agent(repo, "keeper", [turn(call("memory_save", text="a note")), turn(content="Noted.")],
                   tools=[{"name": "memory_save"}], memory={"type": "vector_db"})
    apply(repo, cli)
    by_url, by_path = tmp_path / "by url", tmp_path / "by-path"
    url = "file://" + str(by_url).replace(" ", "%20")
    assert run(cli, "keeper", env={"VECTOR_DB_URL": url})["status"] == "succeeded"
    assert (by_url / "default" / "keeper" / "keeper.sqlite").is_file()
    assert run(cli, "keeper", env={"VECTOR_DB_URL": str(by_path)})["status"] == "succeeded"
    assert (by_path / "default" / "keeper" / "keeper.sqlite").is_file()
    assert not (home / "memory" / "default" / "keeper").exists()


def test_choices_take_any_case_and_a_bad_one_names_its_variable(cli: Cli) -> None:
    for level in ("INFO", "Warning", "debug"):
        expect(cli("status", env={"AGENT_ORCH_LOG_LEVEL": level, "AGENT_ORCH_SANDBOX": "Permissive"}), 0)
    done = expect(cli("status", env={"AGENT_ORCH_LOG_LEVEL": "loud"}), 2)
    assert "AGENT_ORCH_LOG_LEVEL=loud" in done.stderr and "'info'" in done.stderr, done.stderr


# -- the source the home remembers --------------------------------------------------------------------------


def agents_repo(path: Path) -> Path:
    """A spec repository with its specs in agents/ and two branches: main holds greeter; release adds helper."""
    repo = SpecRepo(path)
    for name in ("greeter", "helper"):
        repo.write(f"agents/_scripts/{name}.yaml", yaml.safe_dump({"turns": [{"content": f"hello from {name}"}]}))
        repo.write(f"agents/{name}.yaml", yaml.safe_dump(
            {"name": name, "description": f"agent {name}", "model": f"scripted:_scripts/{name}.yaml"}))
        repo.commit(f"add {name}")
        if name == "greeter":
            git(path, "branch", "release")
            git(path, "checkout", "-q", "release")
    git(path, "checkout", "-q", "main")
    return path


def plan(home: Path, cwd: Path, *args: str, env: dict[str, str] | None = None,
         code: int = 0) -> dict[str, object]:
    done = expect(agentctl("--output", "json", "plan", *args, home=home, cwd=cwd, env=env), code)
    data: dict[str, object] = json.loads(done.stdout)
    return data


def changes(data: dict[str, object]) -> list[tuple[object, object]]:
    listed = data["changes"]
    assert isinstance(listed, list)
    return [(c["action"], c["name"]) for c in listed]


def test_apply_source_is_remembered_for_plan_run_and_serve(tmp_path: Path) -> None:
    source = agents_repo(tmp_path / "agents-repo")
    checkout = SpecRepo(tmp_path / "other-checkout")  # another git checkout, with specs of its own
    checkout.spec("stranger")
    checkout.commit()
    elsewhere, home = tmp_path / "elsewhere", tmp_path / "home"
    elsewhere.mkdir()

    # Before any apply: outside a git repository there is no source, and the error says how to give one.
    done = expect(agentctl("plan", home=home, cwd=elsewhere), 2)
    assert "no spec source" in done.stderr and "apply --source" in done.stderr

    done = expect(agentctl("apply", "--source", "../agents-repo", "--ref", "release", "--path", "agents",
                           home=home, cwd=elsewhere), 0)
    assert "recorded in the home" in done.stderr
    record = json.loads((home / "config" / "sources" / "default.json").read_text())
    assert (record["source"], record["source_ref"], record["source_path"]) == (str(source), "release", "agents")

    # From another folder, and from inside another checkout: the recorded source, ref and path.
    for cwd in (elsewhere, checkout.path):
        data = plan(home, cwd)
        assert data["in_sync"] is True and data["source_origin"] == "home", data
        assert data["source"] == f"{source}@release:agents"
    assert "recorded in the home by apply --source" in expect(agentctl("plan", home=home, cwd=checkout.path),
                                                               0).stderr
    done = expect(agentctl("--output", "json", "run", "helper", home=home, cwd=checkout.path), 0)
    assert json.loads(done.stdout)["status"] == "succeeded"

    # The recorded ref is followed: a commit on release is a change; one on main is not.
    git(source, "checkout", "-q", "release")
    (source / "agents" / "greeter.yaml").write_text(yaml.safe_dump(
        {"name": "greeter", "description": "changed on release", "model": "scripted:_scripts/greeter.yaml"}))
    git(source, "commit", "-qam", "change greeter")
    git(source, "checkout", "-q", "main")
    assert changes(plan(home, checkout.path, code=1)) == [("update", "greeter")]

    # The levels above the home still win: the environment, then the client's section, then the flags.
    env = {"AGENT_ORCH_SOURCE": str(checkout.path)}
    data = plan(home, elsewhere, env=env, code=1)
    assert data["source_origin"] == "environment" and ("create", "stranger") in changes(data), data
    assert data["source"] == f"{checkout.path}@HEAD:specs", "the recorded ref and path went with another source"
    settings = home / "config" / "settings.json"
    settings.write_text(json.dumps({"clients": {"default": {"AGENT_ORCH_SOURCE": str(checkout.path)}}}))
    assert plan(home, elsewhere, code=1)["source_origin"] == "client section"
    settings.unlink()
    data = plan(home, elsewhere, "--source", str(checkout.path), code=1)
    assert data["source_origin"] == "flag" and data["source"] == f"{checkout.path}@HEAD:specs", data
    assert plan(home, elsewhere, "--ref", "main", code=1)["source"] == f"{source}@main:agents"  # a flag per key

    # apply without --source records nothing new.
    expect(agentctl("apply", home=home, cwd=elsewhere), 0)
    assert json.loads((home / "config" / "sources" / "default.json").read_text())["source_ref"] == "release"

    # The daemon too: started inside the project's own checkout (tests' cwd), it serves the recorded source.
    served = Served(home, source, tmp_path / "daemon.log", source_env=False).start()
    try:
        token = served.token("viewer", "viewer")
        listed = served.api("GET", "/agents", token=token)
        assert listed.status == 200, listed.body
        assert sorted(a["name"] for a in listed.json["agents"]) == ["greeter", "helper"]
        greeter = next(a for a in listed.json["agents"] if a["name"] == "greeter")
        assert greeter["spec"]["description"] == "changed on release"  # the daemon reconciled the new commit
        # A new apply --source replaces the record; the running daemon keeps its own source, and it is said.
        done = expect(agentctl("apply", "--source", str(checkout.path), home=home, cwd=elsewhere), 0)
        assert "the daemon running for this home" in done.stderr and "restart it" in done.stderr, done.stderr
    finally:
        served.stop()
    assert plan(home, source)["source"] == f"{checkout.path}@HEAD:specs"


def test_a_client_remembers_its_own_source(tmp_path: Path) -> None:
    first, other = agents_repo(tmp_path / "first"), SpecRepo(tmp_path / "second")
    other.spec("solo")
    other.commit()
    second = other.path
    home, cwd = tmp_path / "home", tmp_path
    expect(agentctl("apply", "--source", str(first), "--path", "agents", home=home, cwd=cwd), 0)
    expect(agentctl("--client-id", "acme", "apply", "--source", str(second), home=home, cwd=cwd), 0)
    assert plan(home, cwd)["source"] == f"{first}@HEAD:agents"
    assert plan(home, cwd, "--client-id", "acme")["source"] == f"{second}@HEAD:specs"
    assert sorted(p.name for p in (home / "config" / "sources").iterdir()) == ["acme.json", "default.json"]
