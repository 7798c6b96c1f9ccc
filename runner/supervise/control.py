"""The control socket: how agentctl reaches a running daemon ($AGENT_ORCH_HOME/run/CLIENT.sock).

One request per connection, one answer: each a JSON document on one line. A request line may be up to
``MAX_REQUEST`` bytes, room for a run's input at its limit (``MAX_INPUT``) however it is escaped; an
answer has no limit (the daemon is trusted, and a run's answer carries its input and output back).

The socket is created mode 0600: reaching it is as good as being the operator, which is what running
agentctl on this machine as the daemon's user is. The REST API (with tokens) is for everyone else. A
run is the daemon's user too, and Landlock does not stop a connect() to a socket by its path; so a
request from a process in other namespaces than the daemon's (a run, in its own) is refused.

``ping`` answers who serves the socket: the daemon's pid, its version and the settings it runs with
(``Settings.public()``: no secret), with what the daemon's own handler adds (its runs in flight), so
that agentctl can say which daemon it talks to and which of its own settings do not apply.
"""

from __future__ import annotations

import json
import os
import socket
import socketserver
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from runner import __version__
from runner.errors import OrchestratorError, StorageFullError, TransientError, UsageError
from runner.settings import Settings

Handler = Callable[[dict[str, Any]], dict[str, Any]]

# The one limit of a run's input: its text as UTF-8, whether it goes through the daemon or not. The CLI
# checks it before anything is sent; the socket checks it again for any other caller.
MAX_INPUT = 1 << 20
# Bytes of one request line: a run's input at MAX_INPUT as JSON (an escaped control character takes six
# bytes for one) with room to spare for the rest of the request.
MAX_REQUEST = 8 << 20


def socket_path(home: Path, client_id: str) -> Path:
    return home / "run" / f"{client_id}.sock"


def check_input(text: str | None, what: str = "input") -> None:
    """A UsageError naming ``what`` when a run's input is over MAX_INPUT bytes of UTF-8."""
    if text is not None:
        check_input_size(len(text.encode("utf-8", "replace")), what)


def check_input_size(size: int, what: str = "input") -> None:
    if size > MAX_INPUT:
        raise UsageError(f"{what}: {size} bytes is over the {MAX_INPUT >> 20} MiB limit of a run's input")


class ControlServer:
    """Serves ``handle`` on the socket at ``path``. ``settings`` are the daemon's, for ping; without them,
    they are loaded as the daemon loaded its own (same process, environment, file, home and client)."""

    def __init__(self, path: Path, handle: Handler, *, settings: Settings | None = None) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.unlink()
        self.about = {"pid": os.getpid(), "version": __version__, **_settings_of(path, settings)}
        outer = self

        class _Request(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                try:
                    answer = outer.answer(self.rfile.readline(MAX_REQUEST + 1), self.connection)
                except Exception as exc:  # one bad request must not take the daemon down
                    full = StorageFullError.of(exc)
                    answer = ({"ok": False, "code": full.code, "error": f"{full.message} ({full.details[0]})"}
                              if full else {"ok": False, "error": f"{type(exc).__name__}: {exc}"})
                self.wfile.write((json.dumps(answer, default=str) + "\n").encode())

        class _Server(socketserver.ThreadingUnixStreamServer):
            daemon_threads = True
            request_queue_size = 128  # parallel agentctl calls wait in the backlog (the default, 5, refuses them)

        old = os.umask(0o177)
        try:
            self.server = _Server(str(path), _Request)
        finally:
            os.umask(old)
        self.path, self.handle = path, handle
        self.thread = threading.Thread(target=self.server.serve_forever, name="control", daemon=True)
        self.thread.start()

    def answer(self, line: bytes, conn: socket.socket) -> dict[str, Any]:
        if len(line) > MAX_REQUEST:
            return {"ok": False, "code": "too_large", "error": f"the request is over {MAX_REQUEST} bytes"}
        if line and not line.endswith(b"\n"):
            return {"ok": False, "code": "usage", "error": "the request ended before its end of line"}
        try:
            request = json.loads(line or b"{}")
        except (UnicodeDecodeError, json.JSONDecodeError) as exc:
            return {"ok": False, "code": "usage", "error": f"the request is not JSON: {exc}"}
        if not isinstance(request, dict):
            return {"ok": False, "code": "usage", "error": "the request must be a JSON object"}
        refused = _from_a_sandbox(conn)
        if refused:
            return {"ok": False, "error": refused}
        try:
            check_input(request.get("input") if isinstance(request.get("input"), str) else None)
        except OrchestratorError as exc:
            return {"ok": False, "code": "too_large", "error": exc.message}
        if request.get("op") == "ping":  # what the daemon's handler says comes last
            return {"ok": True, **self.about, **self.handle(request)}
        return self.handle(request)

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


def _settings_of(path: Path, settings: Settings | None) -> dict[str, Any]:
    """The daemon's public settings (None when they cannot be known)."""
    if settings is None:
        try:
            settings = Settings.load(path.parent.parent, path.stem)
        except OrchestratorError:
            return {"settings": None}
    return {"settings": settings.public()}


def _from_a_sandbox(conn: socket.socket) -> str | None:
    """Why a peer may not ask (it is in a run's namespaces, or gone), or None."""
    pid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
    try:
        if any(os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}") for ns in ("net", "pid")):
            return "refused: the request comes from inside a run's sandbox"
    except OSError:
        return "refused: the asking process is gone"
    return None


def call(path: Path, request: dict[str, Any], timeout: float | None = None) -> dict[str, Any] | None:
    """Ask the daemon; None when no daemon listens there."""
    if not path.exists():
        return None
    deadline = None if timeout is None else time.monotonic() + timeout
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(timeout)
        while True:
            try:
                sock.connect(str(path))
                break
            except (ConnectionRefusedError, FileNotFoundError):
                return None
            except BlockingIOError:  # with a timeout, a full backlog says "busy" at once; wait as a blocking call would
                if deadline is not None and time.monotonic() >= deadline:
                    raise TransientError(f"the daemon did not accept the connection within {timeout:g}s") from None
                time.sleep(0.01)
        try:
            sock.sendall((json.dumps(request) + "\n").encode())
        except (BrokenPipeError, ConnectionResetError):
            pass  # the daemon refused the request before reading all of it: its answer says why
        with sock.makefile("rb") as reader:
            data = reader.readline()
    if not data.endswith(b"\n"):
        raise TransientError("the daemon closed the connection before answering (did it stop?); "
                             "'agentctl history' shows how the run ended")
    answer: dict[str, Any] = json.loads(data)
    return answer
