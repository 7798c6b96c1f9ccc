"""Shared fixtures: real git repositories in tmp_path and the real agentctl in a subprocess."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest

ROOT = Path(__file__).resolve().parents[1]

GIT_IDENTITY = {
    "GIT_AUTHOR_NAME": "Test Author", "GIT_AUTHOR_EMAIL": "author@example.invalid",
    "GIT_COMMITTER_NAME": "Test Committer", "GIT_COMMITTER_EMAIL": "committer@example.invalid",
}


@pytest.fixture(autouse=True)
def _isolated_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    for key, value in GIT_IDENTITY.items():
        monkeypatch.setenv(key, value)
    monkeypatch.setenv("GIT_CONFIG_NOSYSTEM", "1")
    for key in list(os.environ):
        if key.startswith("AGENT_ORCH_") or key in ("MAX_AGENTS", "DEFAULT_AGENT_TIMEOUT", "ENABLE_REMOTE_TOOLS",
                                                    "VECTOR_DB_URL", "LANGCHAIN_API_URL", "OLLAMA_HOST"):
            monkeypatch.delenv(key)


def poll(predicate: Callable[[], Any], what: str, timeout: float = 20.0, every: float = 0.05) -> Any:
    """``predicate()`` once it is truthy; fails after ``timeout`` seconds (a bounded wait, never a sleep)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() >= deadline:
            raise AssertionError(f"gave up waiting for {what} after {timeout:g}s")
        time.sleep(every)


def process_table() -> list[tuple[int, str, int, int]]:
    """(pid, state, ppid, process group) of every process, from /proc."""
    table = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()  # after the command name
        except OSError:
            continue
        table.append((int(entry), fields[0], int(fields[1]), int(fields[2])))
    return table


def git(cwd: Path, *args: str, check: bool = True, input: str | None = None) -> str:
    done = subprocess.run(["git", *args], cwd=cwd, capture_output=True, text=True, check=False, input=input)
    if check and done.returncode != 0:
        raise AssertionError(f"git {' '.join(args)} failed: {done.stderr}")
    return done.stdout.strip()


class SpecRepo:
    """A real git repository with a specs/ folder."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.mkdir(parents=True, exist_ok=True)
        git(path, "init", "-q", "-b", "main")
        (path / "specs").mkdir(exist_ok=True)

    def write(self, rel: str, text: str | bytes) -> Path:
        target = self.path / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(text, bytes):
            target.write_bytes(text)
        else:
            target.write_text(textwrap.dedent(text))
        return target

    def spec(self, name: str, extra: str = "", **fields: str) -> Path:
        """Write a minimal valid spec specs/NAME.yaml (fields override, extra is appended YAML)."""
        body = {"name": name, "model": "llama2", "description": f"agent {name}", **fields}
        text = "".join(f"{k}: {v}\n" for k, v in body.items()) + textwrap.dedent(extra)
        return self.write(f"specs/{name}.yaml", text)

    def remove(self, rel: str) -> None:
        (self.path / rel).unlink()

    def commit(self, message: str = "change") -> str:
        git(self.path, "add", "-A")
        git(self.path, "commit", "-q", "--allow-empty", "-m", message)
        return git(self.path, "rev-parse", "HEAD")


@pytest.fixture
def repo(tmp_path: Path) -> SpecRepo:
    return SpecRepo(tmp_path / "repo")


@pytest.fixture
def home(tmp_path: Path) -> Path:
    return tmp_path / "home"


def agentctl(*args: str, home: Path | None = None, cwd: Path | None = None, input: str | None = None,
             env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    """Run the real CLI (python -m runner) and return its result."""
    cmd = [sys.executable, "-m", "runner"]
    if home is not None:
        cmd += ["--home", str(home)]
    return subprocess.run([*cmd, *args], cwd=cwd or ROOT, capture_output=True, text=True, input=input,
                          env={**os.environ, **(env or {})}, timeout=timeout, check=False)


@pytest.fixture
def cli(home: Path, repo: SpecRepo) -> Iterator[object]:
    """agentctl bound to this test's home, with the test repository as its source."""

    def run(*args: str, **kwargs: object) -> subprocess.CompletedProcess[str]:
        env = {"AGENT_ORCH_SOURCE": str(repo.path), **kwargs.pop("env", {})}  # type: ignore[dict-item]
        return agentctl(*args, home=home, env=env, **kwargs)  # type: ignore[arg-type]

    yield run


# -- real servers on this machine's loopback, for the network tests ---------------------------------------


class _Site(BaseHTTPRequestHandler):
    """A real web server: /, a redirect to itself (/hop), and a redirect to a name nobody allows (/away)."""

    served: list[str]

    def do_GET(self) -> None:
        self.served.append(self.path)
        if self.path in ("/hop", "/away"):
            self.send_response(302)
            self.send_header("Location", "/" if self.path == "/hop" else "http://forbidden.test/stolen")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        body = b"hello from the test server"
        self.send_response(200)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *_args: Any) -> None:
        pass


@pytest.fixture
def site() -> Iterator[tuple[str, list[str]]]:
    """The web server's base URL, and the paths it has served."""
    served: list[str] = []
    server = ThreadingHTTPServer(("127.0.0.1", 0), type("Handler", (_Site,), {"served": served}))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", served
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


class TcpCatcher:
    """A listening TCP socket on loopback that records the first bytes of any connection it accepts."""

    def __init__(self) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.accepted: list[bytes] = []
        self.listener.settimeout(10)
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()

    def _accept(self) -> None:
        try:
            conn, _ = self.listener.accept()
            self.accepted.append(conn.recv(16))
        except OSError:
            pass

    def caught(self) -> list[bytes]:
        """Close it and say what arrived."""
        self.listener.close()
        self.thread.join(timeout=15)
        return self.accepted
