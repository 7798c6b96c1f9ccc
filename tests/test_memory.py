"""Agent memory across runs, its walls (agent, collection, client), its embedder, and secrets in the ledger.

Runs go through the real agentctl; the memory stores are the real sqlite-vec files under the home.
"""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import SpecRepo
from test_run import Cli, apply, call, events, expect, ledger, run, scripted_agent, tool_events, turn

from runner.agent.memory import HashingEmbedder, MemoryError_, MemoryStore

SAVER = [{"name": "memory_save"}, {"name": "memory_search"}]


def remembering_agent(repo: SpecRepo, name: str, note: str, collection: str | None = None) -> None:
    """An agent that saves ``note`` to its memory and answers."""
    memory: dict[str, Any] = {"type": "vector_db", **({"collection": collection} if collection else {})}
    scripted_agent(repo, name, [turn(call("memory_save", text=note)), turn(content="Noted.")],
                   tools=SAVER, memory=memory)


def recall(home: Path, run_id: str) -> dict[str, Any]:
    (event,) = [e for e in events(home, run_id) if e["kind"] == "memory" and e["name"] == "recall"]
    detail: dict[str, Any] = event["detail"]
    return detail


def search(cli: Cli, name: str, query: str, k: int = 5, client: str = "default") -> list[dict[str, Any]]:
    """`agentctl memory search NAME QUERY` for ``client``, as JSON."""
    done = expect(cli("--output", "json", "--client-id", client, "memory", "search", name, query, "-k", str(k)), 0)
    found: list[dict[str, Any]] = json.loads(done.stdout)
    return found


def test_a_saved_memory_is_recalled_by_the_next_run(repo: SpecRepo, cli: Cli, home: Path) -> None:
    word = f"periwinkle{uuid.uuid4().hex[:8]}"
    note = f"The launch code word is {word}"
    remembering_agent(repo, "keeper", note)
    apply(repo, cli)

    first = run(cli, "keeper", code=0)
    assert recall(home, first["run_id"])["found"] == 0
    (saved,) = [e for e in tool_events(home, first["run_id"]) if e["name"] == "memory_save"]
    assert saved["decision"] == "allowed"

    found = search(cli, "keeper", f"launch code word {word}")
    assert found and found[0]["text"] == note and found[0]["kind"] == "note"
    assert found[0]["run_id"] == first["run_id"]

    second = run(cli, "keeper", code=0)
    recalled = recall(home, second["run_id"])
    assert recalled["found"] >= 1
    assert found[0]["id"] in recalled["ids"]
    assert (home / "memory" / "default" / "keeper" / "keeper.sqlite").is_file()
    # A succeeded run also leaves its summary.
    kinds = {m["kind"] for m in search(cli, "keeper", "Noted", k=10)}
    assert kinds == {"note", "run_summary"}


def test_memories_are_private_to_agent_and_client(repo: SpecRepo, cli: Cli, home: Path) -> None:
    word = f"zebra{uuid.uuid4().hex[:8]}"
    remembering_agent(repo, "alpha", f"alpha alone knows {word}", collection="shared")
    scripted_agent(repo, "beta", [turn(content="Nothing to add.")], tools=SAVER,
                   memory={"type": "vector_db", "collection": "shared"})
    apply(repo, cli)
    expect(cli("--client-id", "other", "apply"), 0)

    alpha = run(cli, "alpha", code=0)
    assert recall(home, alpha["run_id"])["found"] == 0
    assert search(cli, "alpha", word)[0]["text"] == f"alpha alone knows {word}"

    # Same collection name, another agent: another store, nothing of alpha's.
    beta = run(cli, "beta", code=0)
    assert recall(home, beta["run_id"])["found"] == 0
    assert all(word not in m["text"] for m in search(cli, "beta", word, k=50))

    # Same agent, another client: its memory lives in its own home subfolder and starts empty.
    other = run(cli, "alpha", "--client-id", "other", code=0)
    assert recall(home, other["run_id"])["found"] == 0
    other_found = search(cli, "alpha", f"alpha alone knows {word}", k=50, client="other")
    assert [m["run_id"] for m in other_found if m["kind"] == "note"] == [other["run_id"]]
    assert all(m["run_id"] != alpha["run_id"] for m in other_found)
    assert ledger(home, "SELECT client_id FROM runs WHERE run_id = ?", [other["run_id"]]) == [("other",)]

    stores = sorted(str(p.relative_to(home / "memory")) for p in (home / "memory").rglob("*.sqlite"))
    assert stores == ["default/alpha/shared.sqlite", "default/beta/shared.sqlite", "other/alpha/shared.sqlite"]


def test_a_store_refuses_another_embedder(repo: SpecRepo, cli: Cli, home: Path) -> None:
    remembering_agent(repo, "keeper", "something worth keeping")
    apply(repo, cli)
    run(cli, "keeper", code=0)
    path = home / "memory" / "default" / "keeper" / "keeper.sqlite"

    same = MemoryStore(path, HashingEmbedder())
    try:
        assert same.count() == 2  # the note and the run summary
    finally:
        same.close()
    with pytest.raises(MemoryError_, match="embedder 'hashing-v1-256', not 'hashing-v1-64'"):
        MemoryStore(path, HashingEmbedder(dims=64))

    class OtherEmbedder(HashingEmbedder):
        def __init__(self) -> None:
            super().__init__()
            self.name = "another-model"

    with pytest.raises(MemoryError_, match="another-model"):
        MemoryStore(path, OtherEmbedder())


def test_secrets_in_tool_arguments_are_redacted(repo: SpecRepo, cli: Cli, home: Path, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "a.txt").write_text("plain\n")
    key = f"plainkey{uuid.uuid4().hex}"
    bearer = f"tok{uuid.uuid4().hex}"
    openai = f"sk-{uuid.uuid4().hex}"
    password = f"pw{uuid.uuid4().hex}"
    denied = f"tok{uuid.uuid4().hex}"
    scripted_agent(repo, "leaky", [
        turn(call("file_reader", path=str(data / "a.txt"), api_key=key, password=password),
             call("memory_save", text=f"call it with Authorization: Bearer {bearer} and {openai}"),
             call("file_reader", path=f"/srv/Bearer {denied}")),  # denied: its reason quotes the path
        turn(content="Done."),
    ], tools=[{"name": "file_reader", "paths": [str(data)]}, *SAVER], memory={"type": "vector_db"})
    apply(repo, cli)

    result = run(cli, "leaky", code=0)
    calls = {(e["name"], e["decision"]): e for e in tool_events(home, result["run_id"])}
    reader = calls["file_reader", "allowed"]["detail"]["args"]
    assert reader == {"path": str(data / "a.txt"), "api_key": "[redacted]", "password": "[redacted]"}
    saved = calls["memory_save", "allowed"]["detail"]["args"]["text"]
    assert saved == "call it with Authorization: [redacted] and [redacted]"
    refused = calls["file_reader", "denied"]["detail"]
    assert refused["args"]["path"] == "/srv/[redacted]" and "[redacted]" in refused["reason"]
    for secret in (key, bearer, openai, password, denied):
        hits = ledger(home, "SELECT count(*) FROM run_events WHERE detail::VARCHAR LIKE ?", [f"%{secret}%"])
        assert hits == [(0,)], secret
        assert secret not in (home / "logs" / "agents" / "leaky.log").read_text()
        assert secret not in result["_stdout"]
