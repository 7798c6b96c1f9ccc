"""The channel between a run and its supervisor: one message format, both ways, over any byte stream.

A message is one JSON object on one line, with the format's version ``v`` and a type ``t``:
- into the run: ``plan`` (first, once: what to run, secrets masked), ``stop`` (end now, politely; the
  supervisor follows it with signals), and ``answer`` (to the run's ``ask``, with the same ``id``);
- out of the run: ``event`` (a step: model call, tool call, memory, log), ``usage`` (tokens of a model
  call), ``tool`` (a tool was called), ``log`` (a line for the agent's log), ``ask`` (a question only the
  control plane can answer: its memory store's search and save, an agent asked as a tool, a remote A2A
  agent; the run waits for the answer), and ``result`` (the last one).

The framing is the same over a socketpair (the local executor) and a TCP stream (a remote node), so
every executor shares ``Decoder`` and ``checked``. The run's code holds its end of the channel, so
nothing it sends is trusted: ``Decoder`` bounds sizes and counts, ``checked`` admits only the shapes
the run process sends (kinds and levels from fixed lists, bounded counts, the supervisor's times), and
``Bounds`` holds a run to what its spec allows it to report.
"""

from __future__ import annotations

import json
from typing import Any

from runner.errors import ChannelError as ChannelError  # defined with the tree; importers name it here too
from runner.specs.models import AgentSpec
from runner.times import utcnow

VERSION = 1
MAX_MESSAGE = 1 << 20  # bytes of one line; events are capped far below it
MAX_MESSAGES = 20_000  # lines from one run: a flood of small ones would fill the journal and the log
MAX_BYTES = 64 << 20  # bytes from one run in all
MAX_STRANGERS = 20  # names of tools the agent does not have, that a run may report calls of
MAX_DETAIL = 64 << 10  # bytes of one event as recorded; a larger one keeps its size, not its content
EVENT_KINDS = ("llm_call", "tool_call", "memory", "log")  # 'status' rows are the supervisor's alone
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
MAX_COUNT = 2_000_000  # tokens one model call may report (the largest contexts today)
MAX_OVERSHOOT = 100_000  # tokens past twice its budget a run's own loop never reaches
ASKS = ("memory.search", "memory.save", "agent.ask", "remote.ask")  # what a run may ask its control plane
MEMORY_ASKS = ("memory.search", "memory.save")
TOOL_ASKS = {"agent.ask": "agent", "remote.ask": "remote_agent"}  # an ask of a tool: the field its tool has
MAX_ASK_TEXT = 8000  # characters of a text a run saves or searches for, or of a question it asks an agent
RUN_STATUSES = ("succeeded", "failed", "budget_exceeded")  # what a run may say of itself; the rest are its supervisor's


def encode(message: dict[str, Any]) -> bytes:
    return (json.dumps({"v": VERSION, **message}, default=str) + "\n").encode()


def message(t: str, **fields: Any) -> bytes:
    return encode({"t": t, **fields})


class Decoder:
    """Lines in, messages out: ``feed(chunk)`` returns the complete messages the chunk finished, parsed
    and versioned (not yet checked), or raises ChannelError when the stream breaks the limits."""

    def __init__(self, max_message: int = MAX_MESSAGE, max_messages: int = MAX_MESSAGES,
                 max_bytes: int = MAX_BYTES) -> None:
        self.buf = bytearray()
        self.scanned = 0  # bytes of buf known to hold no newline
        self.count = self.total = 0
        self.max_message, self.max_messages, self.max_bytes = max_message, max_messages, max_bytes

    def feed(self, chunk: bytes) -> list[tuple[dict[str, Any], int]]:
        """(message, its size in bytes) for each line the chunk completed."""
        self.total += len(chunk)
        if self.total > self.max_bytes:
            raise ChannelError(f"the run sent more than {self.max_bytes >> 20} MiB on its channel")
        self.buf += chunk
        out: list[tuple[dict[str, Any], int]] = []
        while True:
            end = self.buf.find(b"\n", self.scanned)
            if end < 0:
                self.scanned = len(self.buf)
                if len(self.buf) > self.max_message:
                    raise ChannelError(f"the run sent a message over {self.max_message} bytes on its channel")
                return out
            line = bytes(self.buf[:end])
            del self.buf[:end + 1]
            self.scanned = 0
            if len(line) > self.max_message:
                raise ChannelError(f"the run sent a message over {self.max_message} bytes on its channel")
            if not line.strip():
                continue
            self.count += 1
            if self.count > self.max_messages:
                raise ChannelError(f"the run sent more than {self.max_messages} messages on its channel")
            try:
                parsed = json.loads(line, parse_constant=_no_constant)
            except (ValueError, RecursionError):
                raise ChannelError("the run sent a line on its channel that is not JSON") from None
            if not isinstance(parsed, dict):
                raise ChannelError("the run sent a message its supervisor refuses: not a JSON object")
            version = parsed.get("v", VERSION)  # a message without one is read as this version
            if type(version) is not int or version != VERSION:
                raise ChannelError(f"the run sent a message of channel version {str(version)[:20]}, not {VERSION}")
            _storable(parsed, 0)
            out.append((parsed, len(line)))


MAX_DEPTH = 32  # nesting of a message: the record's own shapes are a few levels deep


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")  # NaN, Infinity: Python reads them, nothing downstream can


def _storable(value: Any, depth: int) -> None:
    """What every store and reader downstream can hold: no deeper than MAX_DEPTH (the record is walked
    recursively), and text that is valid UTF-8 (JSON lets a lone surrogate through; DuckDB, the API and
    terminals cannot take it). Raises ChannelError."""
    if depth > MAX_DEPTH:
        raise ChannelError(f"the run sent a message nested deeper than {MAX_DEPTH} levels")
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            raise ChannelError("the run sent text that is not valid Unicode (a lone surrogate)") from None
    elif isinstance(value, dict):
        for key, item in value.items():
            _storable(key, depth + 1)
            _storable(item, depth + 1)
    elif isinstance(value, list):
        for item in value:
            _storable(item, depth + 1)


def printable(text: str) -> str:
    """Text with its control characters shown, not obeyed: a log line reaches operators' terminals
    (`agentctl logs`), where an escape sequence could rewrite the screen or the clipboard."""
    return "".join(c if c.isprintable() or c == "\t" else f"\\x{ord(c):02x}" for c in text)


def checked(message: dict[str, Any], size: int) -> dict[str, Any]:
    """A message from a run, in the shapes the run process sends, or ChannelError. Times are the
    supervisor's (a run cannot backdate its record)."""
    kind = message.get("t")
    if kind == "event":
        detail = message.get("detail")
        if message.get("kind") not in EVENT_KINDS:
            raise ChannelError(f"the run sent a message its supervisor refuses: an event of kind "
                               f"{str(message.get('kind'))[:40]!r}")
        if message.get("decision") not in (None, "allowed", "denied"):
            raise ChannelError("the run sent a message its supervisor refuses: an event with a decision other "
                               "than allowed or denied")
        if not isinstance(detail, dict) and detail is not None:
            raise ChannelError("the run sent a message its supervisor refuses: an event whose detail is not an "
                               "object")
        name = message.get("name")
        return {"t": "event", "ts": utcnow(), "kind": message["kind"], "decision": message.get("decision"),
                "name": None if name is None else printable(str(name)[:200]),
                "detail": {"truncated": True, "bytes": size} if size > MAX_DETAIL else (detail or {})}
    if kind == "usage":
        counts = [message.get("input"), message.get("output")]
        if not all(type(c) is int and 0 <= c <= MAX_COUNT for c in counts):
            raise ChannelError("the run sent a message its supervisor refuses: token counts that are not whole "
                               "numbers from 0 to 2,000,000")
        return {"t": "usage", "input": counts[0], "output": counts[1]}
    if kind == "log":
        level = message.get("level", "INFO")
        if level not in LOG_LEVELS:
            raise ChannelError("the run sent a message its supervisor refuses: a log line of an unknown level")
        return {"t": "log", "level": level, "message": printable(str(message.get("message", ""))[:4000])}
    if kind == "ask":
        ask_id, op, text, k = message.get("id"), message.get("op"), message.get("text"), message.get("k", 5)
        if type(ask_id) is not int or op not in ASKS or not isinstance(text, str) or type(k) is not int:
            raise ChannelError("the run sent a message its supervisor refuses: an ask that is not {id, op, text, k}")
        tool = message.get("tool")
        if op in TOOL_ASKS and not isinstance(tool, str):
            raise ChannelError(f"the run sent a message its supervisor refuses: an {op} that names no tool")
        return {"t": "ask", "id": ask_id, "op": op, "text": text[:MAX_ASK_TEXT], "k": max(1, min(k, 50)),
                "kind": "run_summary" if message.get("kind") == "run_summary" else "note",
                **({"tool": printable(str(tool)[:64])} if op in TOOL_ASKS else {})}
    if kind in ("tool", "egress"):
        return {"t": kind}
    if kind == "result":
        if message.get("status") not in RUN_STATUSES:
            raise ChannelError("the run sent a message its supervisor refuses: a result with a status a run "
                               "cannot end with")
        full = message.get("output_chars")
        return {"t": "result", "status": message["status"], "output": _text(message.get("output"), 16000),
                "error": _text(message.get("error"), 4000),
                **({"output_chars": full} if type(full) is int and 16000 < full < 1 << 40 else {})}
    raise ChannelError(f"the run sent a message its supervisor refuses: a message of type {str(kind)[:40]!r}")


def _text(value: Any, cap: int) -> str | None:
    return None if value is None else str(value)[:cap]


class Bounds:
    """What the spec bounds, the run's reports are bounded by: model calls (each reports its usage
    once), tokens (twice the budget and a margin; the tokens of the agents it asked as tools count, as
    their answers carried them: ``borrow``), tools it does not have (a model may name some; not
    thousands), asks of tools it does not have, and the names of the supervisor's own records (the
    proxy's ``egress``)."""

    def __init__(self, spec: AgentSpec) -> None:
        self.spec = spec
        self.tools = {t.name for t in spec.tools}
        self.asking = {op: {t.name for t in spec.tools if getattr(t, field)} for op, field in TOOL_ASKS.items()}
        self.usages = self.tokens = self.borrowed = 0
        self.strangers: set[str] = set()

    def borrow(self, tokens: int) -> None:
        """Tokens an agent asked as a tool used, on this run's budget (its supervisor counted them)."""
        self.borrowed += max(0, tokens)

    def check(self, message: dict[str, Any]) -> None:
        c = self.spec.constraints
        if message["t"] == "usage":
            self.usages += 1
            self.tokens += message["input"] + message["output"]
            if self.usages > c.max_model_calls:
                raise ChannelError(f"the run sent a message its supervisor refuses: usage of more model calls "
                                   f"than max_model_calls ({c.max_model_calls})")
            used = self.tokens + self.borrowed
            if c.max_tokens is not None and used > 2 * c.max_tokens + MAX_OVERSHOOT:
                raise ChannelError(f"the run sent a message its supervisor refuses: usage far past the token "
                                   f"budget ({used} tokens of {c.max_tokens}, {self.borrowed} of them its "
                                   "agents asked as tools used)")
        elif message["t"] == "event" and message["kind"] == "tool_call" and message["name"] not in self.tools:
            self.strangers.add(str(message["name"]))
            if len(self.strangers) > MAX_STRANGERS:
                raise ChannelError(f"the run sent a message its supervisor refuses: calls of more than "
                                   f"{MAX_STRANGERS} tools the agent does not have")
        elif message["t"] == "ask" and message["op"] in TOOL_ASKS:
            if message["tool"] not in self.asking[message["op"]]:
                raise ChannelError(f"the run sent a message its supervisor refuses: an {message['op']} of "
                                   f"{message['tool']!r}, which is not one of its {TOOL_ASKS[message['op']]} tools")
        elif message["t"] == "ask" and (self.spec.memory is None or self.spec.memory.type == "none"):
            raise ChannelError("the run sent a message its supervisor refuses: an ask of the memory of an agent "
                               "that has none")
        elif message["t"] == "event" and message["kind"] == "log" and message["name"] is not None and \
                (not message["name"].isascii() or message["name"].strip().lower().startswith("egress")):
            raise ChannelError("the run sent a message its supervisor refuses: a log event named like the proxy's "
                               "own records (egress), or not in plain ASCII")
