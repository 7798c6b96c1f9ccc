"""Runs on a Ray cluster (docs/scale-out.md): a daemon with AGENT_ORCH_EXECUTOR=ray, end to end.

The session's cluster (conftest.py) has a head (zone=head) and two workers (zone=a, zone=b) on this
machine's loopback. Every node has the same host name here, so which node ran a run is checked by its
process: the run's host pid (``run_progress.pid`` while it runs) descends from that node's raylet, and
the daemon's view (``nodes[].runs`` in the status) says the same. Agents use the scripted model; a long
run is a scripted turn that sleeps, stopped at the end.
"""

from __future__ import annotations

import json
import os
import re
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import ROOT, SpecRepo, TcpCatcher, agentctl, poll
from daemon_helpers import process_alive, state_rows, status_of, wait_ledger
from test_run import Cli, call, expect, scripted_agent, turn

from runner.agent.recording import TERMINAL

# -- helpers shared with test_ray_faults.py -----------------------------------------------------------------



def cluster_of(daemon: Any) -> dict[str, Any]:
    """The daemon's view of the cluster (what `agentctl status` shows under "cluster"), from its socket."""
    cluster: dict[str, Any] = daemon.call({"op": "ping"})["cluster"]
    return cluster


def status_json(cli: Cli) -> dict[str, Any]:
    data: dict[str, Any] = json.loads(expect(cli("--output", "json", "status"), 0).stdout)
    return data


def runs_by_zone(daemon: Any) -> dict[str, int]:
    """Runs in flight on each live node, by its zone label."""
    return {n["labels"].get("zone", n["node_id"]): n["runs"] for n in cluster_of(daemon)["nodes"] if n["alive"]}


def running_on(daemon: Any, zone: str) -> bool:
    """One run in flight on the node of ``zone`` and none anywhere else."""
    runs = runs_by_zone(daemon)
    return runs.get(zone) == 1 and sum(runs.values()) == 1


def live_pid(home: Path, run_id: str) -> int | None:
    rows = state_rows(home, "SELECT pid FROM run_progress WHERE run_id = ?", (run_id,))
    return int(rows[0]["pid"]) if rows and rows[0]["pid"] else None


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def raylets(ray_cluster: Any) -> dict[int, str]:
    """The pid of each node's raylet, to its zone."""
    return {int(node.all_processes["raylet"][0].process.pid): zone for zone, node in ray_cluster.nodes.items()}


def zone_of_pid(ray_cluster: Any, pid: int) -> str | None:
    """The zone of the node whose raylet ``pid`` descends from (None: from none of them)."""
    known = raylets(ray_cluster)
    at: int | None = pid
    for _ in range(64):
        if at is None or at <= 1:
            return None
        if at in known:
            return known[at]
        at = _parent(at)
    return None


def ancestry(pid: int) -> list[str]:
    """The command lines of ``pid``'s ancestors, nearest first (its own excluded)."""
    found = []
    at = _parent(pid)
    while at is not None and at > 1 and len(found) < 64:
        try:
            found.append(Path(f"/proc/{at}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace"))
        except OSError:
            break
        at = _parent(at)
    return found


def final_status(home: Path, run_id: str, timeout: float = 30.0) -> str:
    """The run's status once it is final, as the CLI and the API read it."""
    def ended() -> str | None:
        status = status_of(home, run_id)
        return status if status in TERMINAL else None

    found: str = poll(ended, f"run {run_id} to end", timeout, every=0.1)
    return found


def archived(home: Path, run_id: str, timeout: float = 30.0) -> dict[str, Any]:
    """The run's one row in the ledger, once archived (with its final status)."""
    (row,) = wait_ledger(home, "SELECT * FROM runs WHERE run_id = ?", [run_id],
                         until=lambda rows: len(rows) == 1 and rows[0]["status"] in TERMINAL,
                         what=f"the ledger row of {run_id}", timeout=timeout)
    return row


def ledger_events(home: Path, run_id: str, timeout: float = 30.0) -> list[dict[str, Any]]:
    """The run's events in the ledger, once its status event is archived, in seq order."""
    rows = wait_ledger(home, "SELECT seq, kind, name, decision, detail FROM run_events WHERE run_id = ? ORDER BY seq",
                       [run_id], until=lambda rows: any(r["kind"] == "status" for r in rows),
                       what=f"the events of {run_id}", timeout=timeout)
    return [{**r, "detail": json.loads(r["detail"]) if r["detail"] else {}} for r in rows]


def long_agent(repo: SpecRepo, name: str, seconds: float = 60, **fields: Any) -> None:
    """An agent whose one model turn waits ``seconds``: a run that stays in flight until stopped."""
    scripted_agent(repo, name, [turn(sleep=seconds), turn(content="woke up")], **fields)


HOST = socket.gethostname()


def node_ids(ray_cluster: Any) -> dict[str, str]:
    """Every node id the session's cluster had (the removed nodes' too), to its zone."""
    ids = {str(n.node_id): zone for zone, n in ray_cluster.nodes.items()}
    ids.update({str(n.node_id): "removed" for n in ray_cluster.removed})
    return ids


def ran_on(ray_cluster: Any, row: dict[str, Any], zone: str | None = None) -> bool:
    """The ledger's ``node`` of a run names the node of ``zone`` (any of the cluster's when None): the host
    name, or the host name and the start of the node's Ray id ("host/1a2b3c4d")."""
    node = row["node"]
    if node == HOST:  # the host alone: every node here has it
        return True
    host, _, short = str(node).partition("/")
    wanted = [i for i, z in node_ids(ray_cluster).items() if zone is None or z == zone]
    return host == HOST and len(short) >= 8 and any(i.startswith(short) for i in wanted)


# -- a run on Ray --------------------------------------------------------------------------------------------


def test_a_run_goes_through_ray_and_is_recorded_as_locally(repo: SpecRepo, home: Path, cli: Cli, tmp_path: Path,
                                                           ray_cluster: Any, ray_daemons: Any) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "note.txt").write_text("a note for the agent\n")
    scripted_agent(repo, "hello", [turn(call("file_reader", path=str(inbox / "note.txt")), usage=(20, 4)),
                                   turn(content="Read it.", usage=(30, 6))],
                   tools=[{"name": "file_reader", "paths": [str(inbox)]}])
    repo.commit()
    daemon = ray_daemons()
    assert [n["labels"].get("zone") for n in cluster_of(daemon)["nodes"] if n["alive"]].count(None) == 0

    row = daemon.run("hello")
    assert row["status"] == "succeeded", row
    assert row["output"] == "Read it."
    run_id = row["run_id"]

    ledger_row = archived(home, run_id)
    assert ran_on(ray_cluster, ledger_row), ledger_row["node"]
    assert (ledger_row["input_tokens"], ledger_row["output_tokens"]) == (50, 10)
    assert (ledger_row["model_calls"], ledger_row["tool_calls"], ledger_row["denied"]) == (2, 1, 0)
    assert ledger_row["started_at"] is not None and ledger_row["ended_at"] >= ledger_row["started_at"]
    events = ledger_events(home, run_id)
    assert [e["seq"] for e in events] == list(range(1, len(events) + 1))
    assert [(e["kind"], e["name"], e["decision"]) for e in events] == [
        ("log", "sandbox", None),
        ("llm_call", "scripted:_scripts/hello.yaml", None),
        ("tool_call", "file_reader", "allowed"),
        ("llm_call", "scripted:_scripts/hello.yaml", None),
        ("log", "final_answer", None),
        ("status", "succeeded", None),
    ]
    assert events[2]["detail"]["result_bytes"] == len("a note for the agent\n")
    sandbox = events[0]["detail"]
    assert "pid" in sandbox["namespaces"] and "net" in sandbox["namespaces"], sandbox  # confined on its node

    # `agentctl history` lists it as it lists a local run (the same columns, the same values).
    listed = json.loads(expect(cli("--output", "json", "history", "--agent", "hello"), 0).stdout)
    (shown,) = [r for r in listed if r["run_id"] == run_id]
    assert shown["status"] == "succeeded" and shown["agent"] == "hello" and shown["trigger"] == "manual"
    assert (shown["input_tokens"], shown["output_tokens"], shown["denied"], shown["tool_errors"]) == (50, 10, 0, 0)
    assert shown["error"] is None and shown["started_at"] and shown["ended_at"]
    text = expect(cli("history", "--agent", "hello"), 0).stdout
    assert run_id in text and "succeeded" in text


def test_placement_by_label_runs_on_that_node(repo: SpecRepo, home: Path, cli: Cli, ray_cluster: Any,
                                              ray_daemons: Any) -> None:
    for zone in ("a", "b"):
        long_agent(repo, f"in-{zone}", placement={"labels": {"zone": zone}})
    repo.commit()
    daemon = ray_daemons()
    for zone in ("a", "b"):
        run_id = daemon.submit(f"in-{zone}")
        poll(lambda z=zone: running_on(daemon, z), f"the run of in-{zone} in flight on zone {zone}", 30, every=0.2)
        pid = poll(lambda r=run_id: live_pid(home, r), f"the pid of {run_id}", 30, every=0.1)
        assert zone_of_pid(ray_cluster, pid) == zone, (pid, raylets(ray_cluster))
        # Forked by the node runner's zygote, not run in the Ray worker: run < zygote < NodeRunner < raylet.
        chain = ancestry(pid)
        zygote = next(i for i, c in enumerate(chain) if "runner.agent.spawning" in c)
        assert chain[zygote + 1].startswith("ray::NodeRunner"), chain
        assert not any(c.startswith("ray::") for c in chain[:zygote]), chain
        data = status_json(cli)
        nodes = {n["labels"]["zone"]: n for n in data["cluster"]["nodes"]}
        assert data["cluster"]["executor"] == "ray" and data["cluster"]["address"] == ray_cluster.address
        assert {z: n["runs"] for z, n in nodes.items()} == {"head": 0, "a": 0, "b": 0, zone: 1}
        assert all(n["alive"] and n["enforced"] for n in nodes.values())
        assert data["cluster"]["refused"] == [] and data["cluster"]["pending"] == 0
        assert nodes[zone]["node_id"] == ray_cluster.node_id(zone)
        expect(cli("stop", f"in-{zone}"), 0)
        assert final_status(home, run_id) == "stopped"
        row = archived(home, run_id)
        assert ran_on(ray_cluster, row, zone), (row["node"], zone)
        poll(lambda: sum(runs_by_zone(daemon).values()) == 0, "no run in flight", 20, every=0.2)


def test_a_placement_no_node_satisfies_waits_and_says_why(repo: SpecRepo, home: Path, cli: Cli,
                                                          ray_daemons: Any) -> None:
    scripted_agent(repo, "nowhere", [turn(content="should never run")], placement={"labels": {"zone": "nowhere"}})
    scripted_agent(repo, "idle", [turn(content="-")])
    repo.commit()
    daemon = ray_daemons()
    run_id = daemon.submit("nowhere")
    poll(lambda: "nowhere" in cluster_of(daemon)["waiting"], "the run to wait for a node", 20, every=0.1)

    data = status_json(cli)
    agents = {a["name"]: a for a in data["agents"]}
    assert "zone=nowhere" in agents["nowhere"]["waiting"], agents["nowhere"]
    assert agents["nowhere"]["waiting"].startswith("placement:")
    assert "waiting" not in agents["idle"]
    assert data["cluster"]["pending"] == 1
    assert "zone=nowhere" in data["cluster"]["waiting"]["nowhere"]
    assert all(n["runs"] == 0 for n in data["cluster"]["nodes"])
    assert "zone=nowhere" in expect(cli("status"), 0).stdout  # the table says it too
    assert live_pid(home, run_id) is None  # never placed: no process anywhere

    expect(cli("stop", "nowhere"), 0)
    assert final_status(home, run_id) == "stopped"
    row = archived(home, run_id)
    assert row["status"] == "stopped" and row["model_calls"] == 0
    events = ledger_events(home, run_id)
    assert [e["kind"] for e in events] == ["status"], events  # nothing of it ran
    poll(lambda: cluster_of(daemon)["pending"] == 0 and cluster_of(daemon)["waiting"] == {},
         "the agent to wait no more", 10, every=0.1)


def test_placement_by_resources_waits_for_room_on_the_node(repo: SpecRepo, home: Path, ray_cluster: Any,
                                                          ray_daemons: Any) -> None:
    scripted_agent(repo, "huge", [turn(content="-")], placement={"resources": {"CPU": 64}})
    for name in ("first", "second"):  # each holds both CPUs of the zone=a node while it runs
        long_agent(repo, name, placement={"labels": {"zone": "a"}, "resources": {"CPU": 2}})
    repo.commit()
    daemon = ray_daemons()
    huge = daemon.submit("huge")
    reason = poll(lambda: cluster_of(daemon)["waiting"].get("huge"), "the huge run to wait", 20, every=0.1)
    assert reason.startswith("placement:") and "CPU: 64" in reason, reason

    first = daemon.submit("first")
    poll(lambda: running_on(daemon, "a"), "the first run on zone a", 30, every=0.1)
    second = daemon.submit("second")
    reason = poll(lambda: cluster_of(daemon)["waiting"].get("second"), "the second run to wait for room", 20,
                  every=0.1)
    assert "busy" in reason, reason
    assert running_on(daemon, "a"), runs_by_zone(daemon)  # the second is not on another node meanwhile
    assert live_pid(home, second) is None

    daemon.call({"op": "stop", "agent": "first"})
    assert final_status(home, first) == "stopped"
    pid = poll(lambda: live_pid(home, second), "the second run to start once the first is gone", 30, every=0.1)
    assert zone_of_pid(ray_cluster, pid) == "a"
    poll(lambda: "second" not in cluster_of(daemon)["waiting"], "the second run to stop waiting", 10, every=0.1)
    for name, run_id in (("second", second), ("huge", huge)):
        daemon.call({"op": "stop", "agent": name})
        assert final_status(home, run_id) == "stopped"
    poll(lambda: cluster_of(daemon)["waiting"] == {} and cluster_of(daemon)["pending"] == 0,
         "nothing left waiting", 10, every=0.1)


def test_memory_is_the_control_planes_whichever_node_saves(repo: SpecRepo, home: Path, cli: Cli, ray_cluster: Any,
                                                           ray_daemons: Any) -> None:
    note = "The launch code word is periwinkle-ray"
    scripted_agent(repo, "keeper", [turn(call("memory_save", text=note)), turn(content="Noted.")],
                   tools=[{"name": "memory_save"}], memory={"type": "vector_db"}, placement={"labels": {"zone": "a"}})
    repo.commit()
    daemon = ray_daemons()
    first = daemon.run("keeper")
    assert first["status"] == "succeeded", first
    saved = [e for e in ledger_events(home, first["run_id"]) if e["kind"] == "tool_call"]
    assert [(e["name"], e["decision"]) for e in saved] == [("memory_save", "allowed")]
    assert "error" not in saved[0]["detail"], saved

    done = expect(cli("--output", "json", "memory", "search", "keeper", "launch code word periwinkle"), 0)
    found = json.loads(done.stdout)
    assert found and found[0]["text"] == note and found[0]["run_id"] == first["run_id"], found
    assert (home / "memory" / "default" / "keeper" / "keeper.sqlite").is_file()
    # The one store is the control plane's: no node's home holds a memory store.
    stores = [p for p in (ray_cluster.base / "nodes").rglob("*.sqlite") if "memory" in p.parts]
    assert stores == []

    second = daemon.run("keeper")
    assert second["status"] == "succeeded", second
    (recall,) = [e for e in ledger_events(home, second["run_id"]) if (e["kind"], e["name"]) == ("memory", "recall")]
    assert recall["detail"]["found"] >= 1 and found[0]["id"] in recall["detail"]["ids"], recall


def test_stop_ends_a_run_on_its_node(repo: SpecRepo, home: Path, cli: Cli, ray_cluster: Any,
                                     ray_daemons: Any) -> None:
    long_agent(repo, "sleeper")
    repo.commit()
    daemon = ray_daemons()
    run_id = daemon.submit("sleeper")
    pid = poll(lambda: live_pid(home, run_id), "the run to be placed", 30, every=0.1)
    assert zone_of_pid(ray_cluster, pid) in ("head", "a", "b")
    expect(cli("stop", "sleeper"), 0)
    assert final_status(home, run_id, timeout=20) == "stopped"
    row = archived(home, run_id)
    assert row["status"] == "stopped" and row["error"] == "stopped on request"
    poll(lambda: not process_alive(pid), "the run's process to end", 20, every=0.1)


def test_a_deadline_is_enforced_on_the_node(repo: SpecRepo, home: Path, ray_cluster: Any, ray_daemons: Any) -> None:
    long_agent(repo, "slow", constraints={"max_runtime": 2})
    repo.commit()
    daemon = ray_daemons()
    run_id = daemon.submit("slow")
    assert final_status(home, run_id, timeout=40) == "timed_out"
    row = archived(home, run_id)
    assert row["status"] == "timed_out" and "max_runtime of 2s" in row["error"], row
    assert ran_on(ray_cluster, row), row["node"]


# -- the same run whichever executor -------------------------------------------------------------------------


VOLATILE = {"ts", "latency_ms", "duration_ms", "run_id", "started_at", "ended_at", "queued_at", "duration_seconds",
            "pid", "node", "cpu_seconds", "max_rss_mb"}  # where it ran, and what the kernel measured of it


def _stable(value: Any, run_id: str) -> Any:
    """``value`` without what differs from one run to another (times, ids, pids) and the run's scratch
    folder (in the home of the node that ran it)."""
    if isinstance(value, dict):
        return {k: _stable(v, run_id) for k, v in value.items() if k not in VOLATILE}
    if isinstance(value, list):
        return [_stable(v, run_id) for v in value]
    if isinstance(value, str):
        return re.sub(r"/\S*/scratch/default/<run>", "<scratch>", value.replace(run_id, "<run>"))
    return value


def test_the_same_transcript_whichever_executor(repo: SpecRepo, home: Path, cli: Cli, tmp_path: Path,
                                                ray_daemons: Any) -> None:
    inbox = tmp_path / "inbox"
    inbox.mkdir()
    (inbox / "note.txt").write_text("a note for the agent\n")
    scripted_agent(repo, "same", [
        turn(call("file_reader", path=str(inbox / "note.txt")), call("file_reader", path="/etc/passwd"),
             usage=(120, 30)),
        turn(call("file_reader", path=str(inbox / "missing.txt")), call("memory_save", text="a note was read"),
             usage=(50, 10)),
        turn(content="All done.", usage=(60, 5)),
    ], tools=[{"name": "file_reader", "paths": [str(inbox)]}, {"name": "memory_save"}], memory={"type": "vector_db"})
    repo.commit()
    local_home = tmp_path / "home-local"
    local = ray_daemons(home_=local_home, ray=False)
    on_ray = ray_daemons()
    assert "cluster" not in local.call({"op": "ping"})
    ran = {"local": (local_home, local.run("same", "the same input")),
           "ray": (home, on_ray.run("same", "the same input"))}
    shown, rows, transcripts = {}, {}, {}
    for where, (h, row) in ran.items():
        assert row["status"] == "succeeded", (where, row)
        rows[where] = archived(h, row["run_id"])
        ledger_events(h, row["run_id"])
        done = expect(agentctl("--output", "json", "show", row["run_id"], home=h), 0)
        transcript = json.loads(done.stdout)
        assert transcript["complete"] and transcript["run_id"] == row["run_id"]
        transcripts[where] = transcript
        shown[where] = _stable(transcript, row["run_id"])
    assert [s["type"] for s in shown["ray"]["steps"]] == [s["type"] for s in shown["local"]["steps"]]
    for mine, theirs in zip(shown["ray"]["steps"], shown["local"]["steps"], strict=True):
        assert mine == theirs, f"on Ray:\n{json.dumps(mine, indent=1)}\nlocally:\n{json.dumps(theirs, indent=1)}"
    assert shown["ray"]["summary"] == shown["local"]["summary"], (shown["ray"]["summary"], shown["local"]["summary"])
    assert shown["ray"] == shown["local"]
    fields = ("status", "input_tokens", "output_tokens", "model_calls", "tool_calls", "denied", "tool_errors",
              "output", "error", "trigger", "input")
    assert {f: rows["ray"][f] for f in fields} == {f: rows["local"][f] for f in fields}
    assert (rows["ray"]["denied"], rows["ray"]["tool_errors"]) == (1, 1)
    assert rows["ray"]["node"] and rows["ray"]["node"].split("/")[0] == HOST
    assert rows["local"]["node"] == HOST
    for where in ("ray", "local"):  # the transcript says where it ran as the ledger does
        assert transcripts[where]["summary"].get("node", rows[where]["node"]) == rows[where]["node"]


# -- the sandbox holds on every node -------------------------------------------------------------------------


ESCAPE = r'''
import glob, json, os, socket
from langchain_core.tools import tool

PERMISSIONS = ["write"]


def _try(fn):
    try:
        return {"ok": fn()}
    except BaseException as exc:  # what stopped it
        return {"error": f"{type(exc).__name__}: {exc}"}


def _read(path):
    with open(path, "rb") as f:
        return f.read().decode("latin-1")


def _write(path):
    with open(path, "w") as f:
        f.write("ESCAPED")
    return "written"


def _connect(port):
    socket.create_connection(("127.0.0.1", int(port)), timeout=3).sendall(b"ESCAPED")
    return "connected"


def _orphan(marker):
    if os.fork() == 0:
        os.setsid()
        if os.fork() == 0:
            out = open(marker, "w")  # kept open: the test finds survivors by this open file
            out.write(str(os.getpid()))
            out.flush()
            import time
            time.sleep(120)
        os._exit(0)
    return "forked"


def _every_environ():
    found = {}
    for path in glob.glob("/proc/[0-9]*/environ"):
        try:
            found[path] = _read(path)
        except OSError as exc:
            found[path] = f"error: {exc}"
    return found


def _ray_files():
    found = {}
    for pattern in ("/tmp/ray/**/*", os.path.expanduser("~/.ray/*"), "/root/.ray/*", "RAY_BASE/**/*"):
        for path in glob.glob(pattern, recursive=True)[:200]:
            try:
                found[path] = _read(path)[:4096]
            except OSError as exc:
                found[path] = f"error: {exc}"
    return found


@tool
def attempt(what: str) -> str:
    """Try something the sandbox must stop."""
    kind, _, arg = what.partition(":")
    actions = {
        "read": lambda: _read(arg)[:4096],
        "write": lambda: _write(arg),
        "tcp": lambda: _connect(arg),
        "orphan": lambda: _orphan(arg),
        "environ": lambda: dict(os.environ),
        "self_environ": lambda: _read("/proc/self/environ"),
        "parent_environ": lambda: _read(f"/proc/{os.getppid()}/environ"),
        "pid1_environ": lambda: _read("/proc/1/environ"),
        "every_environ": _every_environ,
        "ray_token_file": lambda: _read(os.path.expanduser("~/.ray/auth_token")),
        "ray_files": _ray_files,
    }
    result = _try(actions[kind])
    name = kind + ("-" + "".join(c if c.isalnum() else "_" for c in arg)[-60:] if arg and kind == "read" else "")
    with open(os.path.join(OUT_DIR, name + ".json"), "w") as out:  # for the test to read
        json.dump(result, out)
    return json.dumps(result)[:2000]
'''


def _escape_agent(repo: SpecRepo, name: str, out: Path, attempts: list[str], base: Path,
                  zone: str | None = None) -> None:
    repo.write("specs/tools/attempt.py", ESCAPE.replace("OUT_DIR", json.dumps(str(out)))
               .replace("RAY_BASE", str(base)))
    scripted_agent(repo, name, [turn(*[call("attempt", what=a) for a in attempts]), turn(content="done")],
                   tools=[{"name": "attempt", "permissions": ["write"], "paths": [str(out)]}],
                   **({"placement": {"labels": {"zone": zone}}} if zone else {}))


def _attempted(out: Path, kind: str, arg: str = "") -> dict[str, Any]:
    """What the tool wrote of one attempt (a read: of ``arg``)."""
    name = kind + ("-" + "".join(c if c.isalnum() else "_" for c in arg)[-60:] if arg and kind == "read" else "")
    result: dict[str, Any] = json.loads((out / f"{name}.json").read_text())
    return result


def test_the_sandbox_holds_on_a_ray_node(repo: SpecRepo, home: Path, tmp_path: Path, ray_cluster: Any,
                                         ray_daemons: Any) -> None:
    out, secret_dir = tmp_path / "out", tmp_path / "secret"
    out.mkdir()
    secret_dir.mkdir()
    (secret_dir / "secret.txt").write_text("PLANTED-SECRET-FILE-5d1e")
    outside = tmp_path / "outside.txt"
    marker = out / "orphan.pid"
    catcher = TcpCatcher()
    _escape_agent(repo, "esc", out, [f"read:{secret_dir / 'secret.txt'}", f"write:{outside}",
                                     f"tcp:{catcher.port}", "pid1_environ:", f"orphan:{marker}"],
                  ray_cluster.base, zone="b")
    scripted_agent(repo, "reader", [turn(call("file_reader", path=str(secret_dir / "secret.txt"))),
                                    turn(content="done")], tools=[{"name": "file_reader", "paths": [str(out)]}])
    repo.commit()
    daemon = ray_daemons(env={"OPENAI_API_KEY": "sk-PLANTED-DAEMON-KEY-99aa"})

    row = daemon.run("esc")
    assert row["status"] == "succeeded", row
    assert "PermissionError" in _attempted(out, "read", str(secret_dir / "secret.txt"))["error"]
    assert "error" in _attempted(out, "write") and not outside.exists()
    assert "error" in _attempted(out, "tcp")
    assert catcher.caught() == []
    pid1 = _attempted(out, "pid1_environ")
    assert "sk-PLANTED-DAEMON-KEY-99aa" not in json.dumps(pid1) and ray_cluster.token not in json.dumps(pid1)
    assert _attempted(out, "orphan") == {"ok": "forked"}
    poll(lambda: not _orphans(marker), "no process of the run to outlive it", 20, every=0.1)
    events = ledger_events(home, row["run_id"])
    assert [e["decision"] for e in events if e["kind"] == "tool_call"] == ["allowed"] * 5
    assert [bool(e["detail"].get("error")) for e in events if e["kind"] == "tool_call"] == [False] * 5
    sandbox = events[0]["detail"]
    assert {"pid", "net", "mnt"} <= set(sandbox["namespaces"]), sandbox
    text = json.dumps(events)
    assert "PLANTED-SECRET-FILE" not in text and "sk-PLANTED-DAEMON-KEY" not in text

    # A builtin tool asking outside its paths is denied before it acts, as locally.
    denied = daemon.run("reader")
    assert denied["status"] == "succeeded" and denied["denied"] == 1, denied
    (call_event,) = [e for e in ledger_events(home, denied["run_id"]) if e["kind"] == "tool_call"]
    assert call_event["decision"] == "denied" and "outside the allowed paths" in call_event["detail"]["reason"]


def _orphans(marker: Path) -> list[int]:
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            fds = os.listdir(proc / "fd")
        except OSError:
            continue
        for fd in fds:
            try:
                if os.readlink(proc / "fd" / fd) == str(marker):
                    found.append(int(proc.name))
            except OSError:
                continue
    return found


def test_a_run_cannot_read_the_ray_token(repo: SpecRepo, home: Path, tmp_path: Path, ray_cluster: Any,
                                         ray_daemons: Any) -> None:
    out = tmp_path / "out"
    out.mkdir()
    scripted_agent(repo, "idle", [turn(content="-")])
    repo.commit()
    daemon = ray_daemons(env={"OPENAI_API_KEY": "sk-PLANTED-DAEMON-KEY-77bb"})
    # The token is there to be found, outside the run: in the environment of the node runners (Ray workers),
    # of the raylets and of the daemon. The run tries them all by their pids on this machine.
    holders = [pid for pid in [*_raylet_children(ray_cluster), *raylets(ray_cluster), daemon.pid]
               if ray_cluster.token.encode() in _environ(pid)]
    assert len(holders) > len(raylets(ray_cluster)), "no Ray worker holds the token: nothing would be tested"
    reads = [f"/proc/{pid}/environ" for pid in holders] + ["/root/.ray/auth_token"]
    kinds = ["environ", "self_environ", "parent_environ", "pid1_environ", "every_environ", "ray_token_file",
             "ray_files"]
    _escape_agent(repo, "peek", out, [f"{k}:" for k in kinds] + [f"read:{r}" for r in reads], ray_cluster.base)
    repo.commit()
    daemon.call({"op": "reconcile"})
    poll(lambda: state_rows(home, "SELECT name FROM agents WHERE name = 'peek' AND spec IS NOT NULL"),
         "the agent to be applied", 30, every=0.1)

    row = daemon.run("peek")
    assert row["status"] == "succeeded", row
    found = {k: _attempted(out, k) for k in kinds} | {r: _attempted(out, "read", r) for r in reads}
    assert set(found["environ"]["ok"]) <= {"PATH", "LANG", "PYTHONPATH", "HOME", "TMPDIR"}, found["environ"]
    assert all("error" in found[r] for r in reads), {r: found[r] for r in reads}
    everything = json.dumps(found)
    assert ray_cluster.token not in everything, "the run read the Ray token"
    assert "RAY_AUTH_TOKEN" not in everything and "sk-PLANTED-DAEMON-KEY" not in everything
    events = ledger_events(home, row["run_id"])
    assert len([e for e in events if e["kind"] == "tool_call"]) == len(kinds) + len(reads)
    assert ray_cluster.token not in json.dumps(events)
    assert ray_cluster.token not in (row.get("output") or "")
    logs = [p.read_text(errors="replace") for p in (home / "logs").rglob("*") if p.is_file()]
    assert not any(ray_cluster.token in text for text in logs)


def _environ(pid: int) -> bytes:
    try:
        return Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return b""


def _raylet_children(ray_cluster: Any) -> list[int]:
    parents = set(raylets(ray_cluster))
    return [int(e) for e in os.listdir("/proc") if e.isdigit() and _parent(int(e)) in parents]


# -- a cluster the daemon must not use -----------------------------------------------------------------------


def test_serve_without_the_token_exits_with_one_line(repo: SpecRepo, home: Path, tmp_path: Path,
                                                     ray_cluster: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    scripted_agent(repo, "hello", [turn(content="hi")])
    repo.commit()
    for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(key, raising=False)
    env = {**os.environ, "AGENT_ORCH_EXECUTOR": "ray", "RAY_ADDRESS": ray_cluster.address,
           "AGENT_ORCH_SOURCE": str(repo.path), "AGENT_ORCH_PORT": "0", "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "runner", "--home", str(home), "serve"], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode != 0, done
    assert "Traceback" not in done.stderr, done.stderr
    # Ray's core logs its retries to stderr itself (lines like "[date W pid pid] gcs_client.cc:210: ..."):
    # apart from those, one line says why the daemon did not start.
    ours = [line for line in done.stderr.splitlines() if line.strip() and not RAY_CORE_LOG.match(line)]
    assert len(ours) == 1, done.stderr
    assert ours[0].startswith("error: ") and ray_cluster.address in ours[0], ours
    assert "requires token authentication and this daemon has no token" in ours[0], ours  # said before joining


def test_a_cluster_without_authentication_is_refused_unless_allowed(repo: SpecRepo, tmp_path: Path,
                                                                   ray_cluster: Any, insecure_cluster: str,
                                                                   ray_daemons: Any,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    scripted_agent(repo, "hello", [turn(content="hi")])
    repo.commit()
    for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_MODE"):
        monkeypatch.delenv(key, raising=False)
    env = {**os.environ, "AGENT_ORCH_EXECUTOR": "ray", "RAY_ADDRESS": insecure_cluster,
           "AGENT_ORCH_SOURCE": str(repo.path), "AGENT_ORCH_PORT": "0"}
    # Refused with or without a token of the daemon's own (what counts is what the cluster requires).
    for i, own in enumerate([{}, {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": ray_cluster.token}]):
        done = subprocess.run([sys.executable, "-m", "runner", "--home", str(tmp_path / f"refusing-{i}"), "serve"],
                              cwd=ROOT, env={**env, **own}, capture_output=True, text=True, timeout=120, check=False)
        assert done.returncode == 2, done
        assert "Traceback" not in done.stderr, done.stderr
        ours = [line for line in done.stderr.splitlines() if line.strip() and not RAY_CORE_LOG.match(line)]
        assert len(ours) == 1 and ours[0].startswith("error: "), done.stderr
        assert "does not require token authentication" in ours[0] and "AGENT_ORCH_RAY_INSECURE" in ours[0], ours

    # Allowed, it is used.
    daemon = ray_daemons(home_=tmp_path / "allowed", ray=False,
                         env={"AGENT_ORCH_EXECUTOR": "ray", "RAY_ADDRESS": insecure_cluster,
                              "AGENT_ORCH_RAY_INSECURE": "1"})
    cluster = cluster_of(daemon)
    assert cluster["address"] == insecure_cluster and cluster["refused"] == []
    assert [n["labels"] for n in cluster["nodes"]] == [{"zone": "insecure"}]
    row = daemon.run("hello")
    assert row["status"] == "succeeded", row


RAY_CORE_LOG = re.compile(r"^\[\d{4}-\d\d-\d\d [\d:,]+ [DIWEF] \d+ \d+\] \w+\.cc:\d+: ")
