"""The egress proxy: the one way out of a run's network namespace (docs/security.md, Network).

The run makes a listening socket on the loopback of its own namespace and hands it to its launcher;
the launcher, outside the sandbox and on the host's network, serves HTTP proxy requests on it:

- ``CONNECT host:port`` (HTTPS and other tunnels): checked, connected, then bytes both ways;
- ``GET http://host:port/path`` and the other methods in absolute form: checked, then sent on in
  origin form with ``Connection: close``, one request per connection, so that a connection the client
  keeps alive cannot carry a request to another host.

The proxy resolves each name itself and connects to the addresses it checked. Every decision waits in
``decisions()`` for the launcher, which journals it as an ``egress`` event of the run (``wake_fd``
becomes readable when there is one).
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import queue
import re
import socket
import ssl
import threading
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

import h11

from runner.errors import DeniedError
from runner.sandbox.access import HostRule, lookup, loopback
from runner.times import utcnow

HEAD_LIMIT = 64 * 1024
CONNECT_TIMEOUT = 10.0
# Connections one run may hold open through its proxy at once (each costs the supervisor two
# descriptors): past it, a new one is closed at once and the refusal recorded once per burst.
MAX_CONNECTIONS = 32
HOP_HEADERS = {b"connection", b"keep-alive", b"proxy-connection", b"proxy-authorization", b"proxy-authenticate",
               b"te", b"trailer", b"upgrade"}
PROXY_VARIABLES = ("http_proxy", "https_proxy", "HTTP_PROXY", "HTTPS_PROXY")
# The name a run uses for its OpenAI-compatible model endpoint, in plain HTTP: the proxy forwards
# its requests to the real endpoint (over TLS when that is https) with the key added. The run never
# holds the key, so there is none to find in its memory, environment or files.
MODEL_HOST = "model.egress.internal"


def proxy_environment(port: int) -> dict[str, str]:
    """What the run's environment says so that its HTTP clients use the proxy."""
    url = f"http://127.0.0.1:{port}"
    return {name: url for name in PROXY_VARIABLES}


@dataclass(frozen=True)
class Upstream:
    """Where the proxy sends a run's requests for MODEL_HOST, and the credentials it adds to them."""

    scheme: str  # http or https
    host: str
    port: int
    authorization: str | None = field(default=None, repr=False)


# What a run may ask of a model server: the inference and listing calls of Ollama and of the
# OpenAI-compatible API, nothing else (not Ollama's create, pull, push or delete, not a provider's
# files, batches or admin calls, which the key the proxy adds would otherwise open).
MODEL_METHODS = frozenset({"GET", "POST", "HEAD"})
MODEL_CALLS = ("/models", "/chat/completions", "/completions", "/embeddings", "/api/chat", "/api/generate",
               "/api/embed", "/api/embeddings", "/api/tags", "/api/show", "/api/version", "/api/ps")
SEGMENT = re.compile(r"[A-Za-z0-9._:-]+")  # one path segment; matched alone, so in linear time
MAX_PATH = 2048
MAX_HOST = 253  # the longest DNS name
MAX_DECISIONS = 2000  # decisions recorded in full per run
# Loopback ports of the runner's own API (the daemon adds the one it binds; settings add the
# configured one): no run may reach them, "local" or not. A run holding its connections would
# otherwise take the API's from every client, and it has nothing to ask there.
CONTROL_PLANE: set[int] = set()


def control_plane_refusal(host: str, port: int, addresses: list[str],
                          control: frozenset[int] = frozenset()) -> str | None:
    """Why ``host:port`` (resolved to ``addresses``) may not be reached from a run, or by the daemon on a run's
    behalf (a remote agent asked): the runner's own API, under any address of this machine."""
    if port in CONTROL_PLANE | control and any(loopback(a) for a in addresses):
        return f"{host}:{port} is the runner's own API, which no run may reach"
    return None


@dataclass(frozen=True)
class EgressPolicy:
    """Where a run may connect: its model endpoints, and (with network tools) its allowed domains."""

    models: frozenset[tuple[str, int]]  # (host, port) of the model servers
    hosts: HostRule | None  # None: no tool of the run is granted 'network'
    upstream: Upstream | None = None  # the OpenAI-compatible endpoint, reached as http://MODEL_HOST
    tunnels: frozenset[tuple[str, int]] = frozenset()  # model servers on https: reached by CONNECT
    budget: Budget | None = None
    control: frozenset[int] = frozenset()  # the API port the settings name (see CONTROL_PLANE)

    def decide(self, host: str, port: int, method: str = "CONNECT", path: str = "") -> tuple[list[str], str]:
        """The addresses to connect to and why; raises DeniedError. Nothing is resolved before the
        name is allowed (see HostRule.check). A model server gets model calls only: by CONNECT when it
        is on https (the tunnel is opaque), else in absolute form, method and path checked."""
        host = host.lower().rstrip(".")
        if (host, port) in self.models:
            self._model_rules(host, port, method, path, tunnel=(host, port) in self.tunnels)
            return lookup(host), "the model endpoint"
        if self.hosts is None:
            raise DeniedError(f"{host}:{port} is not the model endpoint, and no tool of this agent is granted "
                              "'network'")
        addresses = self.hosts.check(host)
        refused = control_plane_refusal(host, port, addresses, self.control)
        if refused:
            raise DeniedError(refused)
        if self.is_model(addresses, port):  # the model server under another name (localhost, say)
            self._model_rules(host, port, method, path,
                              tunnel=any(self._model_addresses.get((a, port)) for a in addresses))
        return addresses, "allowed_domains"

    def is_model(self, addresses: list[str], port: int) -> bool:
        """Whether this is a model server: one of its addresses, or, for one on this machine, any
        address of this machine at its port (127.0.0.2 and 0.0.0.0 reach a server bound to all)."""
        local = any(loopback(m) for m, p in self._model_addresses if p == port)
        return any((a, port) in self._model_addresses or (local and loopback(a)) for a in addresses)

    @functools.cached_property
    def _model_addresses(self) -> dict[tuple[str, int], bool]:
        """(address, port) of each model server, resolved once: whether it is reached by a tunnel."""
        return {(a, port): (host, port) in self.tunnels for host, port in self.models for a in lookup(host)}

    @staticmethod
    def _model_rules(host: str, port: int, method: str, path: str, *, tunnel: bool) -> None:
        if method == "CONNECT" and not tunnel:
            raise DeniedError(f"{host}:{port} is the model server, on plain http: ask it in absolute form, "
                              "not through a tunnel")
        if method != "CONNECT":
            model_call(method, path)


def model_call(method: str, path: str) -> bool:
    """Raises DeniedError unless this is an inference or listing call to a model server; True for a
    call that generates (chat, completions, Ollama's chat and generate): those the budget counts."""
    bare = path.split("?", 1)[0]
    if method not in MODEL_METHODS or not _model_path(bare):
        raise DeniedError(f"{method} {bare[:200]} is not a model call (chat, completions, embeddings, models, or "
                          "Ollama's chat, generate, embed, tags, show, version)")
    return method == "POST" and bare.rstrip("/").endswith(GENERATING)


GENERATING = ("/chat/completions", "/completions", "/api/chat", "/api/generate")


def _model_path(path: str) -> bool:
    """A base path of plain segments ending in one of MODEL_CALLS (or /models/NAME). No regex over the
    whole path: a run controls it, and a backtracking pattern would spend the proxy's CPU."""
    if len(path) > MAX_PATH or not path.startswith("/"):
        return False
    segments = path.rstrip("/").split("/")[1:]
    if not segments or not all(SEGMENT.fullmatch(s) and s not in (".", "..") for s in segments):
        return False
    joined = "/" + "/".join(segments)
    return joined.endswith(MODEL_CALLS) or "models" in segments[:-1][-1:]
MAX_MODEL_BODY = 16 << 20


@dataclass(frozen=True)
class Budget:
    """What the spec allows a run's model: calls that generate, and output tokens in all. Kept here as
    well as in the run, since the run's code could call the model itself (a tool, with the key the
    proxy adds): the proxy counts the calls and caps what each may generate."""

    calls: int
    output: int | None


def capped(body: bytes, path: str, output: int) -> bytes:
    """The request body with its output-token limit at most ``output`` (set where it had none)."""
    try:
        data = json.loads(body)
    except (ValueError, RecursionError):
        raise DeniedError("a model call's body is not JSON") from None
    if not isinstance(data, dict):
        raise DeniedError("a model call's body is not a JSON object")
    if path.split("?", 1)[0].rstrip("/").endswith(("/api/chat", "/api/generate")):
        options = data.get("options")
        options = options if isinstance(options, dict) else {}
        options["num_predict"] = _least(options.get("num_predict"), output)
        data["options"] = options
    else:
        for key in ("max_tokens", "max_completion_tokens"):
            if key in data or key == "max_tokens":
                data[key] = _least(data.get(key), output)
        # One answer per call: n, best_of and a list of prompts would multiply what a call generates.
        if data.get("n", 1) != 1 or data.get("best_of", 1) != 1 or \
                (isinstance(data.get("prompt"), list) and len(data["prompt"]) > 1):
            raise DeniedError("a model call asks for more than one answer (n, best_of, or several prompts)")
    return json.dumps(data).encode()


def _least(value: object, cap: int) -> int:
    return min(value, cap) if isinstance(value, int) and not isinstance(value, bool) and value > 0 else cap


class _Unreachable(Exception):
    pass


class EgressProxy:
    """Serves one run's listener on a thread of its own until ``close``.

    The thread starts at once, before the listener exists: a launcher that has unshared its PID
    namespace for the run cannot start threads any more (the kernel refuses CLONE_THREAD there), so
    it starts this one first and hands the listener over with ``serve``. For the same reason the
    proxy starts no thread later: names are resolved on the proxy's own thread.
    """

    def __init__(self, policy: EgressPolicy) -> None:
        self.policy = policy
        self.listener: socket.socket | None = None
        self._decisions: queue.SimpleQueue[dict[str, Any]] = queue.SimpleQueue()
        self.wake_fd, self._wake_write = os.pipe()  # a byte arrives here with each decision
        os.set_blocking(self.wake_fd, False)
        os.set_blocking(self._wake_write, False)
        self.open = 0  # connections being served (on the proxy's thread only)
        self.generations = 0  # model calls that generate, counted against the budget
        self.recorded = self.unrecorded = 0
        self.refusing = False
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self._run, name="egress-proxy", daemon=True)
        self.thread.start()

    def serve(self, listener: socket.socket) -> None:
        self.listener = listener
        listener.setblocking(False)
        ready = asyncio.run_coroutine_threadsafe(asyncio.start_server(self._handle, sock=listener, limit=HEAD_LIMIT),
                                                 self.loop)
        ready.result(timeout=5)

    def decisions(self) -> list[dict[str, Any]]:
        """The decisions made since the last call: {ts, decision, method, host, port, reason[, error]}."""
        try:
            os.read(self.wake_fd, 65536)
        except BlockingIOError:
            pass
        found = []
        while not self._decisions.empty():
            found.append(self._decisions.get())
        return found

    def close(self) -> list[dict[str, Any]]:
        """Stop serving; the decisions not yet taken."""
        if self.thread.is_alive():
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(timeout=5)
        if self.listener is not None:
            self.listener.close()  # the last reference to the run's network namespace goes with it
        last = self.decisions()
        if self.unrecorded:
            last.append({"ts": utcnow(), "decision": "denied", "method": "-", "host": "-", "port": 0,
                         "reason": f"{self.unrecorded} more decisions past the {MAX_DECISIONS} recorded in full"})
        os.close(self.wake_fd)
        os.close(self._wake_write)
        return last

    async def _budgeted(self, request: h11.Request, reader: asyncio.StreamReader, path: str) -> bytes | None:
        """For a call that generates: counted against the budget's calls, its body read and its output
        capped. None for other model calls (their body, if any, is relayed as it comes)."""
        budget = self.policy.budget
        if budget is None or not model_call(request.method.decode("ascii", "replace"), path):
            return None
        self.generations += 1
        if self.generations > budget.calls:
            raise DeniedError(f"this run's model calls are used up ({budget.calls}, max_model_calls)")
        lengths = [v for k, v in request.headers if k.lower() == b"content-length"]
        if len(lengths) != 1 or not lengths[0].isdigit() or int(lengths[0]) > MAX_MODEL_BODY:
            raise DeniedError("a model call needs one Content-Length of at most 16 MiB")
        try:
            body = await asyncio.wait_for(reader.readexactly(int(lengths[0])), CONNECT_TIMEOUT)
        except (asyncio.IncompleteReadError, TimeoutError):
            raise DeniedError("a model call's body did not arrive whole") from None
        return capped(body, path, budget.output) if budget.output else body

    def _record(self, decision: dict[str, Any]) -> None:
        """One decision for the run's record; past MAX_DECISIONS, only their number (each is a ledger
        row, and a run could ask without end)."""
        self.recorded += 1
        if self.recorded > MAX_DECISIONS:
            self.unrecorded += 1
            return
        if len(str(decision.get("reason", ""))) > 300:
            decision = {**decision, "reason": str(decision["reason"])[:300] + "..."}
        if self.recorded == MAX_DECISIONS:
            decision = {**decision, "note": "the last decision recorded in full; later ones are counted"}
        self._decisions.put({"ts": utcnow(), **decision})
        try:
            os.write(self._wake_write, b"!")
        except BlockingIOError:
            pass  # wake-ups are pending already

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        try:
            self.loop.run_forever()
        finally:
            tasks = asyncio.all_tasks(self.loop)
            for task in tasks:
                task.cancel()
            self.loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
            self.loop.close()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.open >= MAX_CONNECTIONS:
            if not self.refusing:
                self.refusing = True
                self._record({"method": "-", "host": "-", "port": 0, "decision": "denied",
                              "reason": f"more than {MAX_CONNECTIONS} connections open through the proxy at once"})
            writer.transport.abort()
            return
        self.refusing = False
        self.open += 1
        try:
            await self._serve(reader, writer)
        finally:
            self.open -= 1

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: asyncio.StreamWriter | None = None
        try:
            try:
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), CONNECT_TIMEOUT)
            except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
                return
            request = _parse(head)
            if request is None:
                await _answer(writer, 400, "Bad Request", "not an HTTP proxy request")
                return
            method = request.method.decode("ascii", "replace")
            target = _target(method, request.target.decode("latin-1"))
            if target is None:
                await _answer(writer, 400, "Bad Request", "a proxy request names an absolute http:// URL, "
                              "or CONNECT host:port")
                return
            host, port, path = target
            if len(host) > MAX_HOST or len(path) > MAX_PATH:
                self._record({"method": method, "host": host[:64] + "...", "port": port, "decision": "denied",
                              "reason": "a name or path longer than any real one"})
                await _answer(writer, 403, "Forbidden", "a name or path longer than any real one")
                return
            detail = {"method": method, "host": host, "port": port}
            model = self.policy.upstream if host == MODEL_HOST else None
            try:  # on this thread: see the class
                if host == MODEL_HOST:
                    if model is None or method == "CONNECT":
                        raise DeniedError(f"{MODEL_HOST} is the model endpoint of an openai: model, in plain http")
                    detail.update(host=model.host, port=model.port, via=MODEL_HOST)
                    model_call(method, path)
                    addresses, reason, port = lookup(model.host), "the model endpoint", model.port
                else:
                    addresses, reason = self.policy.decide(host, port, method, path)
                to_model = model is not None or (host, port) in self.policy.models or \
                    self.policy.is_model(addresses, port)
                body = await self._budgeted(request, reader, path) if to_model and method != "CONNECT" else None
            except DeniedError as exc:
                self._record({**detail, "decision": "denied", "reason": exc.message})
                await _answer(writer, 403, "Forbidden", exc.message)
                return
            tls = model.host if model is not None and model.scheme == "https" else None
            try:
                up_reader, upstream = await _connect(addresses, port, tls)
            except _Unreachable as exc:
                self._record({**detail, "decision": "allowed", "reason": reason, "error": str(exc)})
                await _answer(writer, 502, "Bad Gateway", f"{detail['host']}:{port}: {exc}")
                return
            self._record({**detail, "decision": "allowed", "reason": reason})
            if method == "CONNECT":
                writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            else:
                upstream.write(_origin_form(request, path, model, body))
            await _relay(reader, writer, up_reader, upstream)
        except (ConnectionError, OSError):
            pass
        except asyncio.CancelledError:  # the run is over and the proxy closing: end quietly
            pass
        finally:
            for w in (writer, upstream):
                if w is not None:
                    w.close()


def _parse(head: bytes) -> h11.Request | None:
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=HEAD_LIMIT)
    try:
        conn.receive_data(head)
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    return event if isinstance(event, h11.Request) else None


def _target(method: str, target: str) -> tuple[str, int, str] | None:
    """(host, port, origin-form path) of a proxy request, or None when it is not one."""
    if method == "CONNECT":
        host, sep, port = target.rpartition(":")
        host = host.strip("[]")
        return (host.lower(), int(port), "") if sep and host and port.isdigit() and 0 < int(port) < 65536 else None
    parts = urllib.parse.urlsplit(target)
    if parts.scheme != "http" or not parts.hostname:
        return None
    try:
        number = parts.port or 80
    except ValueError:
        return None
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    return parts.hostname.lower(), number, path


def _origin_form(request: h11.Request, path: str, model: Upstream | None = None, body: bytes | None = None) -> bytes:
    """The request as the upstream server gets it. For the model endpoint, the Host is the real one
    and the credentials are the proxy's: whatever Authorization the run sent is dropped. A ``body``
    the proxy has read (and capped) follows the head, with its own length."""
    lines = [request.method + b" " + path.encode("latin-1") + b" HTTP/1.1"]
    dropped = HOP_HEADERS | ({b"host", b"authorization"} if model is not None else set())
    if body is not None:
        dropped |= {b"content-length", b"transfer-encoding"}
        lines.append(b"Content-Length: " + str(len(body)).encode())
    lines += [name + b": " + value for name, value in request.headers if name.lower() not in dropped]
    if model is not None:
        default = 443 if model.scheme == "https" else 80
        lines.append(b"Host: " + (model.host if model.port == default else f"{model.host}:{model.port}").encode())
        if model.authorization:
            lines.append(b"Authorization: " + model.authorization.encode())
    lines.append(b"Connection: close")
    return b"\r\n".join(lines) + b"\r\n\r\n" + (body or b"")


async def _connect(addresses: list[str], port: int, tls: str | None = None
                   ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A connection to the first address that answers; over TLS, checked for the name ``tls``."""
    if not addresses:
        raise _Unreachable("the name does not resolve")
    error: Exception = _Unreachable("no address")
    context = ssl.create_default_context() if tls else None
    for address in addresses:
        try:
            return await asyncio.wait_for(asyncio.open_connection(address, port, ssl=context, server_hostname=tls),
                                          CONNECT_TIMEOUT)
        except (OSError, TimeoutError) as exc:
            error = exc
    errno = getattr(error, "errno", None)
    raise _Unreachable(os.strerror(errno) if errno else str(error) or type(error).__name__)


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, up_reader: asyncio.StreamReader,
                 upstream: asyncio.StreamWriter) -> None:
    """Bytes both ways until the upstream side closes (a request from the client may close first)."""
    to_upstream = asyncio.ensure_future(_pipe(reader, upstream, half_close=True))
    try:
        await _pipe(up_reader, writer, half_close=False)
    finally:
        to_upstream.cancel()


async def _pipe(source: asyncio.StreamReader, sink: asyncio.StreamWriter, *, half_close: bool) -> None:
    try:
        while data := await source.read(65536):
            sink.write(data)
            await sink.drain()
        if half_close and sink.can_write_eof():
            sink.write_eof()
    except (ConnectionError, OSError):
        pass


async def _answer(writer: asyncio.StreamWriter, status: int, phrase: str, message: str) -> None:
    body = (message + "\n").encode()
    writer.write(f"HTTP/1.1 {status} {phrase}\r\nContent-Type: text/plain; charset=utf-8\r\n"
                 f"Content-Length: {len(body)}\r\nX-Egress-Error: {_header(message)}\r\n"
                 f"Connection: close\r\n\r\n".encode() + body)
    try:
        await writer.drain()
    except (ConnectionError, OSError):
        pass


def _header(text: str) -> str:
    return "".join(c if " " <= c <= "~" else "?" for c in text)[:500]
