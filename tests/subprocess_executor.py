"""A second executor, for tests only: each run in a plain subprocess (no zygote, no sandbox), over the
same channel (``runner.agent.channel``) and deciding its outcome in the same place
(``runner.agent.executor.decide``). It imports nothing of the local executor, so a test that passes
with it shows that the executor interface carries everything a run needs.

It is named for what it is: a test double of a real executor, used where a test is about the
interface, not the sandbox.
"""

from __future__ import annotations

import json
import os
import select
import socket
import subprocess
import sys
import threading
import time
from typing import Any

from runner.agent.channel import Bounds, ChannelError, Decoder, checked, message
from runner.agent.executor import Usage, Watcher, decide, exit_text
from runner.plan import RunPlan

CHILD = "from tests.subprocess_executor import child; child()"


class SubprocessExecutor:
    def __init__(self, kill_grace: float = 2.0) -> None:
        self.kill_grace = kill_grace
        self._lock = threading.Lock()
        self._stops: dict[str, threading.Event] = {}
        self._threads: list[threading.Thread] = []
        self.submitted: list[str] = []

    def submit(self, plan: RunPlan, watcher: Watcher) -> None:
        ours, theirs = socket.socketpair()
        proc = subprocess.Popen([sys.executable, "-c", CHILD, str(theirs.fileno())], pass_fds=[theirs.fileno()],
                                cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                                stdin=subprocess.DEVNULL)
        theirs.close()
        ours.sendall(message("plan", plan=plan.to_json()))
        stop = threading.Event()
        with self._lock:
            self._stops[plan.run_id] = stop
            self.submitted.append(plan.run_id)
        thread = threading.Thread(target=self._watch, args=(plan, watcher, proc, ours, stop), daemon=True)
        self._threads.append(thread)
        thread.start()

    def stop(self, run_id: str) -> None:
        with self._lock:
            stop = self._stops.get(run_id)
        if stop is not None:
            stop.set()

    def answer(self, run_id: str, message: dict[str, Any]) -> None:
        """Nothing is asked of it: its runs call ``execute`` without ``ask``, and open their memory themselves."""

    def close(self) -> None:
        with self._lock:
            for stop in self._stops.values():
                stop.set()
        for thread in self._threads:
            thread.join(timeout=30)

    def _watch(self, plan: RunPlan, watcher: Watcher, proc: subprocess.Popen[bytes], channel: socket.socket,
               stop: threading.Event) -> None:
        decoder, bounds = Decoder(), Bounds(plan.spec)
        deadline = time.monotonic() + plan.deadline_seconds
        result: dict[str, Any] | None = None
        ended_by: str | None = None
        fault: str | None = None
        while True:
            ready, _, _ = select.select([channel], [], [], 0.05)
            if ready:
                data = channel.recv(1 << 16)
                if not data:
                    break
                try:
                    for raw, size in decoder.feed(data):
                        msg = checked(raw, size)
                        bounds.check(msg)
                        if msg["t"] == "result":
                            result = msg
                        else:
                            watcher.message(msg)
                except ChannelError as exc:
                    fault, ended_by = str(exc), "fault"
                    break
            elif proc.poll() is not None:
                break
            if time.monotonic() > deadline:
                ended_by = "timed_out"
                break
            if stop.is_set():
                ended_by = "stopped"
                break
        if ended_by is not None:
            try:
                channel.sendall(message("stop"))
            except OSError:
                pass
            proc.terminate()
            try:
                proc.wait(self.kill_grace)
            except subprocess.TimeoutExpired:
                proc.kill()
        status = proc.wait()
        channel.close()
        with self._lock:
            self._stops.pop(plan.run_id, None)
        raw_status = -status if status < 0 else status << 8  # as a wait status
        watcher.ended(decide(ended_by, result, fault=fault, deadline=plan.deadline_seconds,
                             exit_text=exit_text(raw_status), usage=Usage()))


def child() -> None:
    """The run's side: read the plan, run the agent (no sandbox), report on the channel."""
    from runner.agent.channel import encode
    from runner.agent.running import RunPlan, execute

    channel = socket.socket(fileno=int(sys.argv[1]))
    buf = b""
    while not buf.endswith(b"\n"):
        chunk = channel.recv(1 << 20)
        if not chunk:
            return
        buf += chunk
    plan = RunPlan.from_json(json.loads(buf)["plan"])

    def sink(msg: dict[str, Any]) -> None:
        channel.sendall(encode(msg))
        if select.select([channel], [], [], 0)[0]:
            os._exit(143)

    result = execute(plan, sink)
    sink({"t": "result", **json.loads(result.to_json())})
