"""The real API: `agentctl serve --port P` in a subprocess, a real spec repository, and plain HTTP.

The daemon is waited for by polling /healthz; every wait here is a bounded poll, never a fixed sleep.
Requests go through http.client, one connection each, so a test sees exactly what a client would.
"""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass, field
from email.message import Message
from pathlib import Path
from typing import Any

import yaml
from conftest import GIT_IDENTITY, ROOT, poll
from daemon_helpers import ServeProcess

ERROR_KEYS = {"code", "message", "details"}


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


# -- a spec repository, committed with an explicit identity (module fixtures run before conftest's env) --


def git(repo: Path, *args: str, input: bytes | None = None) -> str:
    env = {**os.environ, **GIT_IDENTITY, "GIT_CONFIG_NOSYSTEM": "1"}
    done = subprocess.run(["git", *args], cwd=repo, capture_output=True, env=env, input=input, check=False)
    if done.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {done.stderr.decode(errors='replace')}")
    return done.stdout.decode().strip()


def make_repo(path: Path, files: dict[str, Any]) -> Path:
    """A git repository holding ``files`` (text, or data dumped as YAML), committed on main."""
    path.mkdir(parents=True)
    git(path, "init", "-q", "-b", "main")
    write_files(path, files)
    git(path, "add", "-A")
    git(path, "commit", "-q", "-m", "seed")
    return path


def write_files(repo: Path, files: dict[str, Any]) -> None:
    for rel, content in files.items():
        target = repo / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(content if isinstance(content, str) else yaml.safe_dump(content, sort_keys=False))


def scripted(name: str, turns: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
    """specs/NAME.yaml and its scripted model specs/_scripts/NAME.yaml."""
    spec = {"name": name, "description": f"test agent {name}", "model": f"scripted:_scripts/{name}.yaml", **fields}
    return {f"specs/{name}.yaml": spec, f"specs/_scripts/{name}.yaml": {"turns": turns}}


def head(repo: Path) -> str:
    return git(repo, "rev-parse", "refs/heads/main")


def blob(repo: Path, rel: str, rev: str = "refs/heads/main") -> str | None:
    """The blob id of ``rel`` at ``rev`` (the branch, not the work tree: the API writes no work tree)."""
    listed = git(repo, "ls-tree", rev, "--", rel)
    return listed.split()[2] if listed else None


# -- HTTP -------------------------------------------------------------------------------------------------


@dataclass
class Reply:
    status: int
    headers: Message
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def text(self) -> str:
        return self.body.decode()

    def error(self) -> dict[str, Any]:
        """The error object, after checking the one JSON shape every error has."""
        assert self.headers.get("Content-Type", "").startswith("application/json"), self.headers
        data = self.json
        assert set(data) == {"error"}, data
        error: dict[str, Any] = data["error"]
        assert set(error) == ERROR_KEYS, error
        assert isinstance(error["code"], str) and isinstance(error["message"], str), error
        assert isinstance(error["details"], list), error
        return error


def request(port: int, method: str, path: str, *, token: str | None = None, body: Any = None,
            data: bytes | None = None, headers: dict[str, str] | None = None, timeout: float = 60) -> Reply:
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    if body is not None:
        data = json.dumps(body).encode()
        sent.setdefault("Content-Type", "application/json")
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        conn.request(method, path, body=data, headers=sent)
        resp = conn.getresponse()
        return Reply(resp.status, resp.headers, resp.read())
    finally:
        conn.close()


# -- the daemon -------------------------------------------------------------------------------------------


@dataclass
class Served(ServeProcess):
    """A running `agentctl serve` for one client, with its home, source and tokens."""

    home: Path
    source: Path
    log_path: Path
    client_id: str = "default"
    env: dict[str, str] = field(default_factory=dict)
    port: int = 0
    proc: subprocess.Popen[bytes] | None = None
    tokens: dict[str, str] = field(default_factory=dict)
    source_env: bool = True  # False: the sources come from the home's settings file (several clients)
    ready: tuple[str, ...] = ("ok",)  # the /healthz status that means started

    def start(self, timeout: float = 60.0) -> Served:
        self.port = free_port()
        env = {k: v for k, v in os.environ.items() if not k.startswith("AGENT_ORCH_")}
        if self.source_env:
            env["AGENT_ORCH_SOURCE"] = str(self.source)
        env.update({"AGENT_ORCH_SYNC_INTERVAL": "300",
                    "AGENT_ORCH_FLUSH_INTERVAL": "0.2", "AGENT_ORCH_SHUTDOWN_GRACE": "0",
                    "AGENT_ORCH_KILL_GRACE": "1", **GIT_IDENTITY, **self.env})
        self.env = env
        self._spawn(["--home", str(self.home), "--client-id", self.client_id], env, "--port", str(self.port))
        try:
            poll(self._healthy, "the API to answer /healthz", timeout)
        except BaseException:
            self.stop()  # a daemon that never became ready must not outlive the test
            raise
        return self

    def _healthy(self) -> bool:
        self._running()
        try:
            reply = self.request("GET", "/healthz", timeout=5)
        except OSError:
            return False
        return reply.status == 200 and reply.json["status"] in self.ready

    def token(self, role: str, name: str, client_id: str | None = None) -> str:
        """`agentctl token create`: the token it prints (once)."""
        done = subprocess.run([sys.executable, "-m", "runner", "--home", str(self.home), "--client-id",
                               client_id or self.client_id, "token", "create", "--role", role, "--name", name],
                              cwd=ROOT, env=self.env, capture_output=True, text=True, timeout=60, check=False)
        assert done.returncode == 0, done.stderr
        token = done.stdout.strip()
        assert token.startswith("ao_") and "\n" not in token, done.stdout
        return token

    def request(self, method: str, path: str, *, role: str | None = None, token: str | None = None,
                **kwargs: Any) -> Reply:
        """A request with the token of ``role`` (made at start), or ``token``, or none."""
        return request(self.port, method, path, token=self.tokens[role] if role else token, **kwargs)

    def api(self, method: str, path: str, **kwargs: Any) -> Reply:
        return self.request(method, f"/agents/v1{path}", **kwargs)

    def wait_run(self, run_id: str, timeout: float = 30.0) -> dict[str, Any]:
        """Poll GET /runs/{id} until the run ended; its row."""
        def ended() -> dict[str, Any] | None:
            reply = self.api("GET", f"/runs/{run_id}", role="viewer")
            assert reply.status == 200, reply.body
            row: dict[str, Any] = reply.json
            return row if row["status"] not in ("queued", "running") else None

        row: dict[str, Any] = poll(ended, f"run {run_id} to end", timeout)
        return row

    def stop(self, timeout: float = 30.0) -> None:
        self.terminate(timeout)


def serve(base: Path, files: dict[str, Any], *, client_id: str = "default", home: Path | None = None,
          env: dict[str, str] | None = None, roles: tuple[str, ...] = ("viewer", "operator", "admin")) -> Served:
    """A spec repository under ``base`` with ``files``, a daemon serving it, and a token per role."""
    source = make_repo(base / f"repo-{client_id}", files)
    served = Served(home or base / "home", source, base / f"daemon-{client_id}.log", client_id, dict(env or {}))
    served.start()
    try:
        served.tokens = {role: served.token(role, f"{role}-{client_id}") for role in roles}
    except BaseException:
        served.stop()
        raise
    return served


def two_clients(base: Path, default_repo: Path, other_repo: Path) -> Served:
    """A daemon serving two clients from its home's settings file: 'default' from ``default_repo`` and 'other'
    from ``other_repo`` (whose tokens must learn nothing of the first's). Started; no tokens made yet."""
    home = base / "home"
    (home / "config").mkdir(parents=True)
    (home / "config" / "settings.json").write_text(json.dumps(
        {"AGENT_ORCH_SOURCE": str(default_repo), "clients": {"other": {"AGENT_ORCH_SOURCE": str(other_repo)}}}))
    return Served(home, default_repo, base / "daemon.log", source_env=False).start()
