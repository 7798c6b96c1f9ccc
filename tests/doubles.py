"""Test doubles for what cannot run here, each named for what it stands in for.

Ollama cannot run in the test environment, so ``FakeOllamaServer`` stands in for it: a real
``http.server`` on 127.0.0.1 that answers ``GET /api/tags`` with the models it was given (none by
default), which is all the runner's preflight check asks of Ollama.
"""

from __future__ import annotations

import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any


class FakeOllamaServer:
    """A stand-in for an Ollama server that has the given models pulled (none by default)."""

    def __init__(self, models: list[str] | None = None) -> None:
        self.models = list(models or [])
        self.requests: list[str] = []
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests.append(self.path)
                if self.path == "/api/tags":
                    body = json.dumps({"models": [{"name": m, "model": m} for m in owner.models]}).encode()
                    self.send_response(200)
                    self.send_header("Content-Type", "application/json")
                else:
                    body = b'{"error": "not found"}'
                    self.send_response(404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def __enter__(self) -> FakeOllamaServer:
        self.thread.start()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(timeout=5)
