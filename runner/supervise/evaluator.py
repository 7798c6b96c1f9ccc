"""Workflow expressions are evaluated in a process of their own, with a memory limit and a time limit, and
nothing else of the machine: no capabilities, no file or network access, the runs' seccomp filter.

A spec author writes the expressions and templates, and an agent's answer (which a prompt may have shaped)
is their data; the daemon must stay up whatever they do. Jinja2's sandbox keeps them from Python's internals,
and ``expressions`` bounds what it can (``*``, ``range``, widths), but no list of bounds covers every filter
and method that can make a large string or take long. So they run here: one worker per workflow engine, started
when first needed, its address space limited (``MEMORY``), each request given ``TIMEOUT`` seconds. A worker that
runs out of either is killed, the request fails with the reason (the step fails, never the daemon), and the next
request starts a new worker.

The protocol is one JSON line each way. A request names what to do (``if``, ``for_each``, ``render``), the text,
and its context: ``inputs``, ``item``, and of ``steps`` only those the text names (``Names.steps``), each as its
status and answers; the worker makes ``output``, ``outputs`` and, when read, ``json`` of them.
"""

from __future__ import annotations

import json
import os
import resource
import select
import signal
import subprocess
import sys
import threading
import time
from typing import Any

from runner.errors import ExpressionError

MEMORY = 1 << 30  # bytes of address space the worker may map
TIMEOUT = 5.0  # seconds one request may take
MAX_RENDERED_TOTAL = 16 << 20  # characters the inputs of one step may add up to (a fan-out's, all items)
MAX_LINE = 64 << 20  # bytes of one answer line
MAX_ERROR = 2000  # characters of an error
MAX_ITEMS = 10_000  # items of one fan-out
MAX_ITEM = 16_000  # characters of one item as JSON
MAX_ITEMS_TOTAL = 1 << 20  # characters of all a fan-out's items as JSON


class Evaluator:
    """The engine's side: ``ask`` sends a request and waits for its answer, within ``timeout``."""

    def __init__(self, timeout: float = TIMEOUT, memory: int = MEMORY) -> None:
        self.timeout, self.memory = timeout, memory
        self._proc: subprocess.Popen[bytes] | None = None
        self._lock = threading.Lock()
        self._buffer = b""
        self._why: str | None = None

    def ask(self, op: str, text: str, context: dict[str, Any], items: list[Any] | None = None) -> Any:
        request = json.dumps({"op": op, "text": text, "context": context, "items": items}).encode() + b"\n"
        with self._lock:
            proc = self._worker()
            assert proc.stdin is not None and proc.stdout is not None
            try:
                proc.stdin.write(request)
                proc.stdin.flush()
                line = self._read_line(proc)
            except (OSError, ValueError):
                line = None
            if line is None:
                why = self._kill()
                raise ExpressionError(why)
        answer = json.loads(line)
        if "error" in answer:
            raise ExpressionError(str(answer["error"]))
        return answer["value"]

    def close(self) -> None:
        with self._lock:
            self._kill()

    def _worker(self) -> subprocess.Popen[bytes]:
        if self._proc is None or self._proc.poll() is not None:
            self._buffer = b""
            env = {"PATH": os.defpath, "LANG": "C.UTF-8"}  # nothing of the daemon's environment
            self._proc = subprocess.Popen([sys.executable, "-I", "-m", "runner.supervise.evaluator", str(self.memory),
                                           str(os.getpid())],
                                          stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                                          env=env, cwd="/", start_new_session=True,
                                          pass_fds=(), close_fds=True)
        return self._proc

    def _read_line(self, proc: subprocess.Popen[bytes]) -> bytes | None:
        """One answer line (reading in time linear in its length), or None when the worker took too long, died,
        or said too much (``self._why``)."""
        assert proc.stdout is not None
        fd = proc.stdout.fileno()
        deadline = time.monotonic() + self.timeout
        chunks, size = [self._buffer], len(self._buffer)
        while b"\n" not in chunks[-1]:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            if size > MAX_LINE:
                self._why = f"the expression's result is over {MAX_LINE >> 20} MiB"
                return None
            ready, _, _ = select.select([fd], [], [], left)
            if not ready:
                return None
            chunk = os.read(fd, 1 << 20)
            if not chunk:
                return None
            chunks.append(chunk)
            size += len(chunk)
        line, _, self._buffer = b"".join(chunks).partition(b"\n")
        return line

    def _kill(self) -> str:
        """End the worker; why it could not answer."""
        proc, self._proc = self._proc, None
        why, self._why = self._why, None
        if proc is None:
            return "the expression could not be evaluated"
        died = proc.poll() is not None
        if not died:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                proc.kill()
        proc.wait(timeout=10)
        for stream in (proc.stdin, proc.stdout):
            if stream is not None:
                stream.close()
        if why:
            return why
        if died:
            return (f"the expression used more than the {self.memory >> 20} MiB an expression may (its worker "
                    "ended)")
        return f"the expression took longer than {self.timeout:g}s"


# -- the worker ---------------------------------------------------------------------------------------


class _Entry(dict[str, Any]):
    """A step as an expression reads it; ``json`` is parsed when first read."""

    def __contains__(self, key: object) -> bool:
        return key == "json" or super().__contains__(key)

    def __missing__(self, key: str) -> Any:
        if key != "json":
            raise KeyError(key)
        from runner.specs.expressions import parse_json

        outputs = self["outputs"]
        value = [parse_json(o) for o in outputs] if self.get("fan_out") else parse_json(self["output"])
        self["json"] = value
        return value


class _Headers(dict[str, Any]):
    """An event's headers: names match without regard to case (they arrive lower-cased)."""

    def __getitem__(self, key: Any) -> Any:
        return super().__getitem__(key.lower() if isinstance(key, str) else key)

    def __contains__(self, key: object) -> bool:
        return super().__contains__(key.lower() if isinstance(key, str) else key)

    def get(self, key: Any, default: Any = None) -> Any:
        return super().get(key.lower() if isinstance(key, str) else key, default)


def _steps(given: dict[str, Any]) -> dict[str, _Entry]:
    out = {}
    for step_id, raw in given.items():
        outputs = raw.get("outputs") or []
        entry = _Entry(status=raw.get("status"), outputs=outputs, fan_out=bool(raw.get("fan_out")))
        entry["output"] = "\n".join(o for o in outputs if o is not None) if raw.get("fan_out") else \
            (outputs[0] if outputs else None)
        if "approval" in raw:
            decision = raw["approval"] or {}
            entry.update(approved=decision.get("approved"), by=decision.get("by"), comment=decision.get("comment"),
                         output=decision.get("comment"))
        out[step_id] = entry
    return out


def _answer(request: dict[str, Any]) -> Any:
    from runner.specs.expressions import evaluate, render

    op, text = request["op"], request["text"]
    context = dict(request.get("context") or {})
    context["steps"] = _steps(context.get("steps") or {})
    context["headers"] = _Headers({str(k).lower(): v for k, v in (context.get("headers") or {}).items()})
    if op == "if":
        return bool(evaluate(text, context))
    if op == "for_each":
        value = evaluate(text, context)
        if isinstance(value, dict | str) or not hasattr(value, "__iter__"):
            kind = "a mapping" if isinstance(value, dict) else type(value).__name__
            raise ExpressionError(f"'{text}' gives {kind}, not a list")
        items, total = [], 0
        for i, item in enumerate(value):
            if i >= MAX_ITEMS:
                raise ExpressionError(f"more than {MAX_ITEMS} items in one fan-out")
            try:
                text = json.dumps(item, ensure_ascii=False)
            except (TypeError, ValueError, RecursionError):
                raise ExpressionError(f"item {i} is not JSON data ({type(item).__name__})") from None
            total += len(text)
            if len(text) > MAX_ITEM or total > MAX_ITEMS_TOTAL:
                raise ExpressionError(f"item {i} makes the fan-out's items larger than an item may be ({MAX_ITEM} "
                                      f"characters) or all of them together ({MAX_ITEMS_TOTAL}): give paths or ids")
            items.append(json.loads(text))
        return items
    if op == "render":
        texts, total = [], 0
        for item in request.get("items") or [None]:
            out = render(text, {**context, "item": item} if request.get("items") is not None else context)
            total += len(out)
            if total > MAX_RENDERED_TOTAL:
                raise ExpressionError(f"the inputs of this step's runs add up to more than {MAX_RENDERED_TOTAL} "
                                      "characters: pass paths to the data, not the data")
            texts.append(out)
        return texts
    raise ExpressionError(f"unknown request {op!r}")


def _die_with(parent: int) -> None:
    """Ask the kernel to end this process when the daemon's thread that started it ends (a kill -9 of the daemon
    included), and end now if that has happened already."""
    import ctypes

    ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0)  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(0)


def main() -> None:
    memory = int(sys.argv[1]) if len(sys.argv) > 1 else MEMORY
    _die_with(int(sys.argv[2]) if len(sys.argv) > 2 else os.getppid())
    resource.setrlimit(resource.RLIMIT_AS, (memory, memory))
    # what Jinja2 loads only when first used, loaded now (nothing can be read once locked down)
    import textwrap  # noqa: F401  (wordwrap)

    import jinja2.debug  # noqa: F401  (Jinja2 rewrites a failing template's traceback with it: the real error)

    from runner.sandbox.privileges import lock_down_helper
    from runner.specs.expressions import render

    render("{{ x | tojson }}{{ [1] | join(',') }}{{ 'a' | upper }}{{ lipsum(1) }}{{ 'a b' | wordwrap(3) }}",
           {"x": {}})
    lock_down_helper()  # from here it reads and writes its two pipes only

    out = sys.stdout.buffer
    for line in sys.stdin.buffer:
        try:
            answer: dict[str, Any] = {"value": _answer(json.loads(line))}
        except ExpressionError as exc:
            answer = {"error": str(exc)}
        except MemoryError:
            answer = {"error": "the expression used more memory than an expression may"}
        except RecursionError:
            answer = {"error": "the expression is nested too deeply"}
        except Exception as exc:  # anything else an expression meets is its own failure, said as such
            answer = {"error": f"{type(exc).__name__}: {exc}"}
        if "error" in answer:
            answer["error"] = answer["error"][:MAX_ERROR]  # a missing key may be quoted whole
        out.write(json.dumps(answer, ensure_ascii=False).encode() + b"\n")
        out.flush()


if __name__ == "__main__":
    main()
