"""Clients (tenants) do not leak into each other through configuration or metrics.

- The source of a client: its own section of the settings file wins over AGENT_ORCH_SOURCE*, which speaks
  for every client; the command-line flags win over both. Checked with the real CLI, a real settings file,
  real repositories and a real environment; the daemon names the disagreement in its log at start.
- Secrets in the settings are pydantic secrets: never shown, and masked when settings travel to a run.
- Metrics: the open /metrics names no client, agent or tool; a token sees its own client's series only.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from api_helpers import Served, make_repo, poll, scripted
from conftest import agentctl
from prometheus_client.parser import text_string_to_metric_families

from runner.settings import Settings, shadowed_environment

# Names that appear nowhere but in one client's repository, so finding them in text is a leak.
OURS, THEIRS = "ours-agent-7f3a", "theirs-agent-c21e"
THEIR_TOOL = "theirpeek"
CUSTOM_TOOL = '''from langchain_core.tools import tool

PERMISSIONS = ["read"]


@tool
def {name}(path: str) -> str:
    """Says hello."""
    return "hello"
'''


def write_settings(home: Path, settings: dict[str, Any]) -> None:
    (home / "config").mkdir(parents=True, exist_ok=True)
    (home / "config" / "settings.json").write_text(json.dumps(settings))


def plan_source(home: Path, env: dict[str, str], *args: str) -> str:
    """The source `agentctl ... plan` read, from its JSON."""
    done = agentctl("--output", "json", *args, home=home, env=env)
    assert done.returncode in (0, 1), done.stderr
    source: str = json.loads(done.stdout)["source"]
    return source


# -- the source of a client ---------------------------------------------------------------------------


def test_a_clients_own_section_wins_over_the_environment_and_flags_over_both(tmp_path: Path) -> None:
    default_repo, acme_repo = (
        make_repo(tmp_path / name, {f"specs/{name}.yaml": {"name": name, "model": "llama2", "description": "x"}})
        for name in (OURS, THEIRS))
    home = tmp_path / "home"
    write_settings(home, {"AGENT_ORCH_SOURCE_PATH": "specs",
                          "clients": {"acme": {"AGENT_ORCH_SOURCE": str(acme_repo)}}})
    env = {"AGENT_ORCH_SOURCE": str(default_repo)}

    assert plan_source(home, env, "--client-id", "acme", "plan").startswith(str(acme_repo))
    assert plan_source(home, env, "plan").startswith(str(default_repo))  # no section: the environment
    assert plan_source(home, env, "--client-id", "acme", "plan", "--source", str(default_repo)).startswith(
        str(default_repo))

    # What acme applies, lists and runs comes from its own repository, and default's stays default's.
    applied = agentctl("--client-id", "acme", "apply", home=home, env=env)
    assert applied.returncode == 0, applied.stderr
    listed = agentctl("--client-id", "acme", "--output", "json", "status", home=home, env=env)
    assert [a["name"] for a in json.loads(listed.stdout)["agents"]] == [THEIRS]
    assert agentctl("apply", home=home, env=env).returncode == 0
    listed = agentctl("--output", "json", "status", home=home, env=env)
    assert [a["name"] for a in json.loads(listed.stdout)["agents"]] == [OURS]


def test_the_environment_still_fills_what_a_section_leaves_out(tmp_path: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    home = tmp_path / "home"
    write_settings(home, {"MAX_AGENTS": 3, "clients": {"acme": {"AGENT_ORCH_SOURCE_REF": "release"}}})
    for key, value in {"AGENT_ORCH_SOURCE": "/srv/everyone.git", "AGENT_ORCH_SOURCE_REF": "main", "MAX_AGENTS": "5",
                       "HOME": str(tmp_path)}.items():  # HOME is not AGENT_ORCH_HOME, whatever the case
        monkeypatch.setenv(key, value)
    acme = Settings.load(home, "acme")
    assert acme.source == "/srv/everyone.git"  # not in acme's section: the environment's
    assert acme.source_ref == "release"  # acme's section
    assert acme.max_agents == 5  # the environment over the file's top level
    assert acme.home == home
    assert shadowed_environment(acme) == [
        f"client acme: clients.acme in {home / 'config' / 'settings.json'} sets AGENT_ORCH_SOURCE_REF to "
        "'release', and the environment to 'main'; the settings file wins"]
    assert Settings.load(home, "default").source_ref == "main" and not shadowed_environment(Settings.load(home))


# -- secrets ---------------------------------------------------------------------------------------------


def test_secrets_are_never_shown_and_travel_to_a_run_masked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("AGENT_ORCH_WEBHOOK_SECRET", "hook-s3cret")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-s3cret")
    settings = Settings.load(tmp_path / "home", "default")
    assert settings.webhook_secret.get_secret_value() == "hook-s3cret"
    assert settings.openai_api_key.get_secret_value() == "sk-s3cret"
    for shown in (repr(settings), str(settings), json.dumps(settings.public()), settings.model_dump_json()):
        assert "s3cret" not in shown, shown
    dumped = settings.model_dump(mode="json")
    assert dumped["webhook_secret"] == dumped["openai_api_key"] == "**********"

    # A run gets its settings this way: they validate, nothing is read from the run's own environment,
    # and the secrets arrive masked (the egress proxy, outside the run, adds the key).
    monkeypatch.setenv("AGENT_ORCH_SOURCE", "/somewhere/else.git")
    received = Settings.model_validate(dumped)
    assert received.model_dump(mode="json") == dumped
    assert received.source == settings.source == ""
    assert received.openai_api_key.get_secret_value() == "**********"

    status = agentctl("--output", "json", "status", home=tmp_path / "home",
                      env={"AGENT_ORCH_WEBHOOK_SECRET": "hook-s3cret", "OPENAI_API_KEY": "sk-s3cret"})
    assert status.returncode == 0 and "s3cret" not in status.stdout + status.stderr


# -- one daemon, two clients -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def two(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Served, dict[str, str], dict[str, str]]]:
    """A daemon serving 'default' (source from AGENT_ORCH_SOURCE) and 'acme' (its own section, which
    names another repository), each with a scripted agent that calls a tool; a viewer token each."""
    base = tmp_path_factory.mktemp("tenants")
    data = base / "data"
    data.mkdir()
    (data / "note.txt").write_text("note\n")

    def reader(name: str, tool: str) -> dict[str, Any]:
        return scripted(name, [{"tool_calls": [{"name": tool, "args": {"path": str(data / "note.txt")}}],
                                "usage": {"input_tokens": 7, "output_tokens": 3}}, {"content": "read"}],
                        tools=[{"name": tool, "paths": [str(data)]}], overlap="queue")

    default_repo = make_repo(base / "repo-default", reader(OURS, "file_reader"))
    acme_repo = make_repo(base / "repo-acme", {**reader(THEIRS, THEIR_TOOL),
                                               f"specs/tools/{THEIR_TOOL}.py": CUSTOM_TOOL.format(name=THEIR_TOOL)})
    home = base / "home"
    write_settings(home, {"clients": {"acme": {"AGENT_ORCH_SOURCE": str(acme_repo)}}})
    daemon = Served(home, default_repo, base / "daemon.log").start()  # AGENT_ORCH_SOURCE: default_repo
    try:
        ours, theirs = ({role: daemon.token(role, f"{role}-{client}", client) for role in ("viewer", "operator")}
                        for client in ("default", "acme"))
        for token, agent in ((ours, OURS), (theirs, THEIRS)):
            started = daemon.api("POST", f"/agents/{agent}/runs", token=token["operator"])
            assert started.status == 202, started.body
            run_id = started.json["run_id"]
            poll(lambda t=token, r=run_id: daemon.api("GET", f"/runs/{r}", token=t["viewer"]).json["status"]  # type: ignore[misc]
                 not in ("queued", "running"), f"run {run_id} to end")
        yield daemon, ours, theirs
    finally:
        daemon.stop()


def test_the_daemon_says_at_start_when_a_section_and_the_environment_disagree(
        two: tuple[Served, dict[str, str], dict[str, str]]) -> None:
    daemon, _, _ = two
    warned = [line for line in daemon.log().splitlines() if "WARNING" in line and "AGENT_ORCH_SOURCE" in line]
    assert len(warned) == 1, daemon.log()
    assert "client acme" in warned[0] and "repo-acme" in warned[0] and "repo-default" in warned[0]
    assert warned[0] in (daemon.home / "logs" / "agent_orchestrator.log").read_text()


def families(text: str) -> dict[str, Any]:
    return {f.name: f for f in text_string_to_metric_families(text)}


def counted(daemon: Served, token: str | None) -> str | None:
    """The metrics text once the token's client's run (or, open, both clients' runs) is counted: its end,
    read from the state database, and its duration, observed when the daemon moves its row to the ledger."""
    reply = daemon.request("GET", "/metrics", token=token)
    assert reply.status == 200, reply.body
    found = families(reply.text)
    ended = sum(s.value for s in found["agent_orch_runs"].samples if s.name == "agent_orch_runs_total")
    timed = sum(s.value for s in found["agent_orch_run_duration_seconds"].samples if s.name.endswith("_count"))
    return reply.text if min(ended, timed) >= (1 if token else 2) else None


def test_the_open_metrics_name_no_client_agent_or_tool(two: tuple[Served, dict[str, str], dict[str, str]]) -> None:
    daemon, _, _ = two
    text = poll(lambda: counted(daemon, None), "both clients' runs to be counted")
    for name in (OURS, THEIRS, THEIR_TOOL, "acme", "file_reader", 'client="default"'):
        assert name not in text, (name, text)
    found = families(text)
    for family in found.values():
        for s in family.samples:
            assert not {"client", "agent", "tool", "revision"} & set(s.labels), s
    assert "agent_orch_source" not in found  # an info metric: its labels are all it says
    runs = {s.labels["status"]: s.value for s in found["agent_orch_runs"].samples if s.name == "agent_orch_runs_total"}
    assert runs == {"succeeded": 2.0}  # one each, summed
    calls = {s.labels["decision"]: s.value for s in found["agent_orch_tool_calls"].samples
             if s.name == "agent_orch_tool_calls_total"}
    assert calls == {"allowed": 2.0}
    count = [s.value for s in found["agent_orch_run_duration_seconds"].samples
             if s.name == "agent_orch_run_duration_seconds_count"]
    assert count == [2.0]
    assert daemon.request("GET", "/agents/v1/metrics").status == 401  # the API's own needs a token


def test_a_token_sees_its_own_clients_metrics_and_none_of_anothers(
        two: tuple[Served, dict[str, str], dict[str, str]]) -> None:
    daemon, ours, theirs = two
    for token, own, (other, other_client) in ((ours["viewer"], OURS, (THEIRS, "acme")),
                                              (theirs["viewer"], THEIRS, (OURS, "default"))):
        text = poll(lambda t=token: counted(daemon, t), "the client's run to be counted")  # type: ignore[misc]
        scoped = daemon.api("GET", "/metrics", token=token)
        assert scoped.status == 200
        for shown in (text, scoped.text):
            found = families(shown)
            runs = [s for s in found["agent_orch_runs"].samples if s.name == "agent_orch_runs_total"]
            assert [s.labels["agent"] for s in runs] == [own]
            assert other not in shown and f'client="{other_client}"' not in shown
            clients = {s.labels["client"] for f in found.values() for s in f.samples if "client" in s.labels}
            assert clients == {"acme" if own == THEIRS else "default"}
    their_text = daemon.api("GET", "/metrics", token=theirs["viewer"]).text
    assert THEIR_TOOL in their_text and THEIR_TOOL not in daemon.api("GET", "/metrics", token=ours["viewer"]).text
