"""Test doubles for what cannot run here, each named for what it stands in for.

Ollama cannot run in the test environment, so ``FakeOllamaServer`` stands in for it: a real
``http.server`` on 127.0.0.1 that answers ``GET /api/tags`` with the models it was given (none by
default), which is all the runner's preflight check asks of Ollama. ``FakeOpenAIServer`` stands in for
an OpenAI-compatible server in ``make test`` (the real one, llama.cpp with a real model, is
``make e2e-llm``): it lists one model and answers every chat completion with the same short reply.
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


class FakeOpenAIServer(FakeOllamaServer):
    """A stand-in for an OpenAI-compatible server: ``GET /v1/models`` and ``POST /v1/chat/completions``."""

    def __init__(self, model: str = "tiny", reply: str = "All done.", tool_call: dict[str, Any] | None = None
                 ) -> None:
        """``tool_call`` ({"name", "args"}): the first answer calls that tool, the next one replies."""
        super().__init__()
        owner = self
        self.authorizations: list[str | None] = []  # the Authorization header of each request
        self.bodies: list[dict[str, Any]] = []  # the JSON body of each POST

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.requests.append(self.path)
                owner.authorizations.append(self.headers.get("Authorization"))
                self._json(200, {"object": "list", "data": [{"id": model, "object": "model"}]}
                           if self.path == "/v1/models" else {"error": "not found"})

            def do_POST(self) -> None:
                owner.requests.append(self.path)
                owner.authorizations.append(self.headers.get("Authorization"))
                sent = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
                owner.bodies.append(sent)
                message: dict[str, Any] = {"role": "assistant", "content": reply}
                if tool_call and not any(m.get("role") == "tool" for m in sent.get("messages", [])):
                    message = {"role": "assistant", "content": None, "tool_calls": [
                        {"id": "call_1", "type": "function", "function": {
                            "name": tool_call["name"], "arguments": json.dumps(tool_call["args"])}}]}
                self._json(200, {"id": "chatcmpl-1", "object": "chat.completion", "created": 0, "model": model,
                                 "choices": [{"index": 0, "finish_reason": "stop", "message": message}],
                                 "usage": {"prompt_tokens": 12, "completion_tokens": 3, "total_tokens": 15}})

            def _json(self, status: int, data: dict[str, Any]) -> None:
                body = json.dumps(data).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *_args: Any) -> None:
                pass

        self.server.server_close()
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def base(self) -> str:
        return f"{self.url}/v1"
