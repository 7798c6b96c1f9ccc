"""The control socket: how agentctl reaches a running daemon ($AGENT_ORCH_HOME/run/CLIENT.sock).

One JSON request per connection, one JSON answer. The socket is created mode 0600: reaching it is as
good as being the operator, which is what running agentctl on this machine as the daemon's user is.
The REST API (with tokens) is for everyone else. A run is the daemon's user too, and Landlock does not
stop a connect() to a socket by its path; so a request from a process in other namespaces than the
daemon's (a run, in its own) is refused.
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

from runner.errors import StorageFullError, TransientError

Handler = Callable[[dict[str, Any]], dict[str, Any]]


def _from_a_sandbox(conn: socket.socket) -> str | None:
    """Why a peer may not ask (it is in a run's namespaces, or gone), or None."""
    pid = struct.unpack("3i", conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i")))[0]
    try:
        if any(os.readlink(f"/proc/{pid}/ns/{ns}") != os.readlink(f"/proc/self/ns/{ns}") for ns in ("net", "pid")):
            return "refused: the request comes from inside a run's sandbox"
    except OSError:
        return "refused: the asking process is gone"
    return None


def socket_path(home: Path, client_id: str) -> Path:
    return home / "run" / f"{client_id}.sock"


class ControlServer:
    def __init__(self, path: Path, handle: Handler) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        if path.exists():
            path.unlink()
        outer = self

        class _Request(socketserver.StreamRequestHandler):
            def handle(self) -> None:
                try:
                    request = json.loads(self.rfile.readline(1 << 20) or b"{}")
                    refused = _from_a_sandbox(self.connection)
                    answer = {"ok": False, "error": refused} if refused else outer.handle(request)
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

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        try:
            self.path.unlink()
        except FileNotFoundError:
            pass


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
        sock.sendall((json.dumps(request) + "\n").encode())
        data = b""
        while not data.endswith(b"\n"):
            chunk = sock.recv(65536)
            if not chunk:
                break
            data += chunk
    if not data:
        raise TransientError("the daemon closed the connection before answering (did it stop?); "
                             "'agentctl history' shows how the run ended")
    answer: dict[str, Any] = json.loads(data)
    return answer
