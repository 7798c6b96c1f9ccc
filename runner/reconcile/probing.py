"""Import each custom tool module once, in a sandboxed Python process, before agents may use it.

Validation reads tool modules with ``ast`` only (the push hook must not run unreviewed code). The
reconciler goes one step further, because a tool that cannot be imported would fail every run of
every agent that uses it: it imports the module in a child process (never in the daemon) confined as
a run is, and more (``confining.confine_probe``: namespaces, no network, no capabilities, Landlock
with nothing but reads of the runtime and the module, seccomp), and marks the agents that use a
failing module Invalid with the error. Pushed code never runs outside a sandbox. Results are cached by blob id, so a
module is probed once per content, not once per reconcile.
"""

from __future__ import annotations

import os
import select
import subprocess
import sys
import tempfile
import time
from collections.abc import MutableMapping
from dataclasses import replace
from pathlib import Path
from typing import Any

from runner.specs.catalog import ToolInfo
from runner.specs.validating import SpecFile

PROBE_TIMEOUT = 60.0
_PROBE = """
import importlib.util, os, sys
path, name = sys.argv[1], sys.argv[2]
from runner.errors import DeniedError
from runner.sandbox.confining import confine_probe
try:
    confine_probe(os.path.dirname(path))
except DeniedError as exc:
    print(f"not probed: {exc.message}", file=sys.stderr)
    sys.exit(3)
spec = importlib.util.spec_from_file_location("probe_" + name, path)
module = importlib.util.module_from_spec(spec)
try:
    spec.loader.exec_module(module)
except BaseException as exc:
    print(f"import failed: {type(exc).__name__}: {exc}"[:400], file=sys.stderr)
    sys.exit(1)
from langchain_core.tools import BaseTool
if not isinstance(getattr(module, name, None), BaseTool):
    print(f"tools/{name}.py defines no LangChain tool named '{name}' after import", file=sys.stderr)
    sys.exit(1)
"""


def probe_tools(tools: dict[str, ToolInfo], files: list[SpecFile], cache: MutableMapping[str, dict[str, Any]]
                ) -> dict[str, ToolInfo]:
    """``tools`` with ``error`` set on every module that cannot be imported."""
    blobs = {f.rel_path: f for f in files}
    out = dict(tools)
    for name, info in tools.items():
        f = blobs.get(f"tools/{name}.py")
        if info.error or f is None:
            continue
        key = f"probe:{f.blob}"
        if key not in cache:
            cache[key] = {"error": probe(name, f.read())}
        error = cache[key].get("error")
        if error:
            out[name] = replace(info, error=str(error))
    return out


def probe(name: str, source: bytes) -> str | None:
    with tempfile.TemporaryDirectory(prefix="agent-tool-probe-") as tmp:
        # The module in a folder of its own, and -I: nothing pushed can shadow a module the probe
        # imports before it is confined (a tool named runner.py, json.py, ...).
        (Path(tmp) / "module").mkdir()
        path = Path(tmp) / "module" / f"{name}.py"
        path.write_bytes(source)
        env = {"PATH": os.environ.get("PATH", os.defpath), "HOME": tmp, "LANG": "C.UTF-8"}
        proc = subprocess.Popen([sys.executable, "-I", "-c", _PROBE, str(path), name], cwd="/", env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        tail, timed_out = _tail(proc, PROBE_TIMEOUT)
    if timed_out:
        return f"importing tools/{name}.py took longer than {PROBE_TIMEOUT:.0f}s"
    if proc.returncode in (0, 3):  # 3: this kernel cannot confine the probe, so it is not run (said on stderr)
        return None
    lines = [line for line in tail.decode("utf-8", "replace").strip().splitlines() if line.strip()]
    return lines[-1][:400] if lines else f"import exited with code {proc.returncode}"


def _tail(proc: subprocess.Popen[bytes], timeout: float, keep: int = 4096) -> tuple[bytes, bool]:
    """The last ``keep`` bytes the probe wrote on stderr, and whether it ran out of time (then it is
    killed). Only the tail is kept: a pushed module may write gigabytes there."""
    assert proc.stderr is not None
    deadline = time.monotonic() + timeout
    tail = b""
    poller = select.poll()
    poller.register(proc.stderr.fileno(), select.POLLIN)
    while True:
        left = deadline - time.monotonic()
        if left <= 0:
            proc.kill()
            proc.wait()
            return tail, True
        if poller.poll(left * 1000):
            chunk = os.read(proc.stderr.fileno(), 65536)
            if not chunk:
                break
            tail = (tail + chunk)[-keep:]
    proc.stderr.close()
    try:
        proc.wait(timeout=max(0.0, deadline - time.monotonic()))
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return tail, True
    return tail, False
