"""The escape suite, part three: runs that may use the network, and processes.

A run that needs the network (a model server, or a tool granted ``network``) lives in a network
namespace of its own; its one way out is the egress proxy its launcher serves (docs/security.md).
Here custom tools granted ``network`` try every other way, and the proxy with forbidden hosts; each
decision of the proxy is a ``log``/``egress`` event of the run.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path
from typing import Any

from conftest import SpecRepo, TcpCatcher, poll
from daemon_helpers import ledger_rows
from doubles import FakeOpenAIServer
from test_daemon import daemons  # noqa: F401 (the fixture)
from test_run import apply, call, ledger, run, scripted_agent, tool_events, turn

from runner.sandbox import seccomp

REACH = '''
import os, socket, urllib.request
from langchain_core.tools import tool

PERMISSIONS = ["network"]


@tool
def reach(what: str) -> str:
    """Try to reach something. The outcome comes back as the tool's error, which the ledger keeps."""
    raise RuntimeError("OUTCOME " + _reach(what))


def _reach(what):
    kind, _, arg = what.partition(":")
    try:
        if kind == "tcp":
            host, port = arg.rsplit(",", 1)
            socket.create_connection((host, int(port)), timeout=3).sendall(b"ESCAPED")
            return "connected"
        if kind == "resolve":
            return str(socket.getaddrinfo(arg, 80))
        if kind == "get":  # through the proxy (from the environment), following redirects
            return urllib.request.urlopen(arg, timeout=10).read().decode()
        if kind == "direct":  # no proxy
            return urllib.request.build_opener(urllib.request.ProxyHandler({})).open(arg, timeout=3).read().decode()
        if kind == "connect":  # a tunnel, asked of the proxy by hand
            port = int(os.environ["http_proxy"].rsplit(":", 1)[1])
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(f"CONNECT {arg} HTTP/1.1\\r\\nHost: {arg}\\r\\n\\r\\n".encode())
            return s.recv(300).decode()
        return "unknown"
    except Exception as exc:
        return f"error: {type(exc).__name__}: {exc}"
'''

BOMB = '''
import os, time
from langchain_core.tools import tool

PERMISSIONS = ["read"]


@tool
def bomb(seconds: str) -> str:
    """Fork until the kernel says no. The outcome comes back as the tool's error."""
    raise RuntimeError("OUTCOME " + _bomb(seconds))


def _bomb(seconds):
    children = 0
    try:
        while children < 100000:
            if os.fork() == 0:
                time.sleep(float(seconds))
                os._exit(0)
            children += 1
    except OSError as exc:
        return f"{children} {exc.errno}"
    return f"{children} none"
'''


def egress(home: Path, run_id: str) -> list[dict[str, Any]]:
    rows = ledger(home, "SELECT decision, detail FROM run_events WHERE run_id = ? AND name = 'egress' ORDER BY seq",
                  [run_id])
    return [{"decision": d, **json.loads(detail)} for d, detail in rows]


def sandbox_of(home: Path, run_id: str) -> dict[str, Any]:
    (row,) = ledger(home, "SELECT detail FROM run_events WHERE run_id = ? AND name = 'sandbox'", [run_id])
    return dict(json.loads(row[0]))


def test_a_network_tool_gets_out_only_through_the_proxy_to_allowed_hosts(repo: SpecRepo, cli, home: Path,
                                                                          site: tuple[str, list[str]]) -> None:
    page, served = site
    port = int(page.rsplit(":", 1)[1])
    catcher = TcpCatcher()
    attempts = [f"get:{page}/", f"get:{page}/away", f"tcp:127.0.0.1,{catcher.port}",
                "resolve:example.com", f"direct:{page}/direct", "connect:10.255.255.1:443", f"connect:127.0.0.1:{port}"]
    repo.write("specs/tools/reach.py", REACH)
    scripted_agent(repo, "net", [turn(*[call("reach", what=a) for a in attempts]),
                                 turn(call("http_get", url="http://forbidden.test/")), turn(content="done")],
                   tools=[{"name": "reach", "permissions": ["network"]}, {"name": "http_get"}],
                   constraints={"allowed_domains": ["local"]})
    apply(repo, cli)

    result = run(cli, "net")
    assert result["status"] == "succeeded", result
    got = dict(zip(attempts, _tool_outputs(home, result["run_id"]), strict=False))
    assert got[f"get:{page}/"] == "hello from the test server"
    assert "403" in got[f"get:{page}/away"], got  # the proxy refused the redirect's target
    for attempt in attempts[2:5]:
        assert got[attempt].startswith("error:"), (attempt, got[attempt])
    assert " 403 " in got["connect:10.255.255.1:443"], got
    assert " 200 " in got[f"connect:127.0.0.1:{port}"], got

    assert catcher.caught() == [], "a direct connection left the run's network namespace"
    assert "/direct" not in served and served.count("/") == 1 and "/away" in served

    decisions = egress(home, result["run_id"])
    denied = {d["host"]: d for d in decisions if d["decision"] == "denied"}
    assert set(denied) == {"forbidden.test", "10.255.255.1"}, decisions
    assert "allowed_domains" in denied["forbidden.test"]["reason"]
    assert denied["10.255.255.1"]["method"] == "CONNECT" and denied["10.255.255.1"]["port"] == 443
    allowed = [d for d in decisions if d["decision"] == "allowed"]
    assert {(d["host"], d["port"]) for d in allowed} == {("127.0.0.1", port)}

    events = {e["detail"]["args"].get("url"): e for e in tool_events(home, result["run_id"]) if e["name"] == "http_get"}
    assert events["http://forbidden.test/"]["decision"] == "denied"

    sandbox = sandbox_of(home, result["run_id"])
    assert sandbox["network"]["namespace"] is True and sandbox["network"]["allowed"] == ["local"]
    proxy_port = int(sandbox["network"]["egress"].rsplit(":", 1)[1])
    assert sandbox["landlock"]["tcp_connect"] == [proxy_port]


def test_the_model_is_reached_through_the_proxy_and_nothing_else(repo: SpecRepo, cli, home: Path, tmp_path: Path,
                                                                 site: tuple[str, list[str]]) -> None:
    page, served = site
    port = int(page.rsplit(":", 1)[1])
    repo.write("specs/tools/reach.py", REACH.replace('PERMISSIONS = ["network"]', 'PERMISSIONS = ["read"]'))
    repo.spec("chat", model="openai:tiny",
              extra="tools:\n  - name: reach\n    permissions: [read]\n"
                    f"    paths: [{json.dumps(str(tmp_path / 'data'))}]\n")
    repo.commit()
    apply(repo, cli)
    with FakeOpenAIServer(tool_call={"name": "reach", "args": {"what": f"get:http://127.0.0.1:{port}/"}}) as model:
        result = run(cli, "chat", env={"LANGCHAIN_API_URL": model.base, "OPENAI_API_KEY": "sk-egress-test"})
        assert model.requests.count("/v1/chat/completions") == 2
    # The key was added by the proxy, outside the run: the run itself holds a placeholder only.
    assert model.authorizations == ["Bearer sk-egress-test"] * 3, model.authorizations
    assert result["status"] == "succeeded" and result["output"] == "All done.", result
    (output,) = _tool_outputs(home, result["run_id"])
    assert "403" in output and served == [], output  # the tool is not granted 'network'

    decisions = egress(home, result["run_id"])
    model_port = int(model.url.rsplit(":", 1)[1])
    assert [(d["decision"], d["host"], d["port"]) for d in decisions if d["decision"] == "allowed"] == \
        [("allowed", "127.0.0.1", model_port)] * 3  # the preflight, then two chat completions
    (denied,) = [d for d in decisions if d["decision"] == "denied"]
    assert denied["port"] == port and "no tool of this agent is granted 'network'" in denied["reason"]
    assert all(d["reason"] == "the model endpoint" for d in decisions if d["decision"] == "allowed")
    tokens = ledger(home, "SELECT input_tokens, output_tokens FROM runs WHERE run_id = ?", [result["run_id"]])
    assert tokens == [(24, 6)]


def test_an_unreachable_model_fails_fast_through_the_proxy_with_the_fix(repo: SpecRepo, cli, home: Path) -> None:
    repo.spec("chat", model="openai:tiny")
    repo.commit()
    apply(repo, cli)
    closed = socket.create_server(("127.0.0.1", 0))
    url = f"http://127.0.0.1:{closed.getsockname()[1]}/v1"
    closed.close()
    done = cli("run", "chat", env={"LANGCHAIN_API_URL": url}, timeout=30)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "cannot reach" in done.stderr and "refused" in done.stderr.lower() and "LANGCHAIN_API_URL" in done.stderr


def test_a_fork_bomb_dies_alone(repo: SpecRepo, cli, home: Path, tmp_path: Path) -> None:
    repo.write("specs/tools/bomb.py", BOMB)
    scripted_agent(repo, "bomb", [turn(call("bomb", seconds="20")), turn(content="survived")],
                   tools=[{"name": "bomb", "permissions": ["read"], "paths": [str(tmp_path / "data")]}],
                   constraints={"max_processes": 40})
    apply(repo, cli)
    result = run(cli, "bomb")
    assert result["status"] == "succeeded" and result["output"] == "survived", result
    (output,) = _tool_outputs(home, result["run_id"])
    children, errno = output.split()
    assert errno == "11", output  # EAGAIN: the namespace is full
    sandbox = sandbox_of(home, result["run_id"])
    if sandbox["processes"].get("pid_max"):
        assert sandbox["processes"]["pid_max"] == 340
        assert 0 < int(children) < 340
    # the run is over, and its children with it: the machine forks as before
    assert cli("status").returncode == 0


def _tool_outputs(home: Path, run_id: str) -> list[str]:
    """What each call of our custom tools found (they raise it, so that the ledger keeps it)."""
    rows = ledger(home, "SELECT detail FROM run_events WHERE run_id = ? AND kind = 'tool_call' ORDER BY seq", [run_id])
    errors = [json.loads(r[0]).get("error", "") for r in rows]
    return [e.split("OUTCOME ", 1)[1] for e in errors if "OUTCOME " in e]


def test_the_control_socket_refuses_a_process_inside_a_run(tmp_path: Path) -> None:
    """Landlock does not stop connect() to a unix socket by path; the daemon refuses such a peer itself."""
    from runner.sandbox import isolating
    from runner.supervise.control import ControlServer
    from runner.supervise.control import call as ask

    path = tmp_path / "run" / "default.sock"
    server = ControlServer(path, lambda request: {"ok": True, "asked": request})
    try:
        assert ask(path, {"op": "status"}, timeout=10) == {"ok": True, "asked": {"op": "status"}}
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:  # as a run is: in a network namespace of its own
            try:
                isolating.enter_network(gateway=False)
                os.write(write_end, json.dumps(ask(path, {"op": "run", "agent": "x"}, timeout=10)).encode())
            finally:
                os._exit(0)
        os.close(write_end)
        answer = json.loads(os.read(read_end, 4096) or b"{}")
        os.waitpid(pid, 0)
        assert answer == {"ok": False, "error": "refused: the request comes from inside a run's sandbox"}
    finally:
        server.close()


def test_a_daemon_run_gets_the_same_way_out(repo: SpecRepo, cli, home: Path, daemons,  # noqa: F811
                                            site: tuple[str, list[str]]) -> None:
    """Through the daemon the launcher has entered the run's PID namespace before it forks, and can
    start no thread after that: the proxy's thread must exist already."""
    page, served = site
    scripted_agent(repo, "web", [turn(call("http_get", url=f"{page}/"),
                                      call("reach", what="connect:forbidden.test:443")), turn(content="done")],
                   tools=[{"name": "http_get"}, {"name": "reach", "permissions": ["network"]}],
                   constraints={"allowed_domains": ["local"]})
    repo.write("specs/tools/reach.py", REACH)
    apply(repo, cli)
    row = daemons().run("web")
    assert row["status"] == "succeeded", row
    assert served == ["/"]
    rows = poll(lambda: ledger_rows(home, "SELECT decision, detail FROM run_events WHERE run_id = ? AND "
                                          "name = 'egress' ORDER BY seq", [row["run_id"]]) or None,
                "the run's egress events in the ledger (the daemon holds it: read as agentctl history does)")
    decisions = [(r["decision"], json.loads(r["detail"])["host"]) for r in rows]
    assert decisions == [("allowed", "127.0.0.1"), ("denied", "forbidden.test")]


def test_no_unix_socket_is_reachable_by_its_path(repo: SpecRepo, cli, home: Path, tmp_path: Path) -> None:
    """Landlock does not mediate connect() to a unix socket; seccomp keeps the run from making one. The
    listener stands for a Docker socket, a root tmux or the daemon's control socket."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(tmp_path / "service.sock"))
    listener.listen(1)
    listener.settimeout(1)  # checked after the run: a connection would be waiting by then
    tool = REACH.replace('"network"]', '"read"]')
    repo.write("specs/tools/reach.py", tool.replace('if kind == "resolve":', '''if kind == "unix":
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(arg)
            s.sendall(b"ESCAPED")
            return "connected"
        if kind == "resolve":'''))
    scripted_agent(repo, "unix", [turn(call("reach", what=f"unix:{tmp_path / 'service.sock'}")), turn(content="done")],
                   tools=[{"name": "reach", "permissions": ["read"], "paths": [str(tmp_path / "data")]}])
    apply(repo, cli)
    result = run(cli, "unix")
    assert result["status"] == "succeeded", result
    (output,) = _tool_outputs(home, result["run_id"])
    assert output.startswith("error: PermissionError"), output
    try:
        conn, _ = listener.accept()
        arrived = conn.recv(16)
    except OSError:
        arrived = b""
    finally:
        listener.close()
    assert arrived == b""
    assert sandbox_of(home, result["run_id"])["seccomp"] == seccomp.describe()


def test_without_namespaces_strict_refuses_and_permissive_runs_on_the_host_network(
        repo: SpecRepo, cli, home: Path, site: tuple[str, list[str]]) -> None:
    """Where runs cannot have namespaces of their own (here: "root" in a user namespace with every
    capability dropped, as in a container without CAP_SYS_ADMIN), strict refuses with the fix."""
    page, served = site
    scripted_agent(repo, "web", [turn(call("http_get", url=f"{page}/")), turn(content="done")],
                   tools=[{"name": "http_get"}], constraints={"allowed_domains": ["local"]})
    apply(repo, cli)
    no_caps = ["unshare", "--user", "--map-root-user", "setpriv", "--inh-caps=-all", "--bounding-set=-all"]

    def run_without(mode: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*no_caps, sys.executable, "-m", "runner", "--home", str(home), "--output", "json",
                               "run", "web"], capture_output=True, text=True, timeout=60, check=False,
                              env={**os.environ, "AGENT_ORCH_SOURCE": str(repo.path), "AGENT_ORCH_SANDBOX": mode})

    refused = run_without("strict")
    assert refused.returncode == 1, refused.stdout + refused.stderr
    assert "cannot give the run a network namespace" in refused.stdout + refused.stderr
    assert "AGENT_ORCH_SANDBOX=permissive" in refused.stdout + refused.stderr and served == []

    allowed = run_without("permissive")
    result = json.loads(allowed.stdout)
    assert result["status"] == "succeeded", allowed.stdout + allowed.stderr
    assert served == ["/"]
    sandbox = sandbox_of(home, result["run_id"])
    assert sandbox["mode"] == "permissive" and sandbox["namespaces"] == []
    assert sandbox["network"] == {"namespace": False, "egress": "the host's network (AGENT_ORCH_SANDBOX=permissive)"}
