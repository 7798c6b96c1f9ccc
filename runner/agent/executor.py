"""The executor interface: what the daemon and the CLI know of where and how a run executes.

``submit(plan, watcher)`` starts a run; ``stop(run_id)`` ends it early; what the run reports comes back
to its watcher: ``message(m)`` for each checked channel message, in order, then ``ended(outcome)``
exactly once. Nothing above this interface sees a pid, a pipe or a file of the run, so a run may
execute in a local process (``runner.agent.local``), on another node, or in a test's subprocess.

The outcome is decided in one place, ``decide``: from why the run ended and what it said last.
"""

from __future__ import annotations

import os
import signal
from dataclasses import dataclass
from typing import Any, Protocol

from runner.plan import RunPlan

# Why an executor ended a run, when it did: the run exited by itself (None), broke its channel
# ("fault"), passed its deadline ("timed_out"), was asked to stop ("stopped"), or was lost with the node
# that ran it ("lost": its fault says how).
ENDED_BY = (None, "fault", "timed_out", "stopped", "lost")


@dataclass
class Outcome:
    """How a run ended, and what it cost the machine (None where the executor could not tell)."""

    status: str
    output: str | None = None
    error: str | None = None
    cpu_seconds: float | None = None
    max_rss_mb: float | None = None
    bytes_written: int | None = None
    output_chars: int | None = None  # the answer's full length, when over what a record keeps of it


@dataclass
class Usage:
    """What the kernel says a run's processes used: CPU (user and system), peak RSS, bytes written."""

    cpu_seconds: float | None = None
    max_rss_mb: float | None = None
    bytes_written: int | None = None


class Watcher(Protocol):
    """Receives one run's story. Called from the executor's thread, one call at a time per run. The
    executor's own first message is ``{"t": "placed", "pid": ..., "node": ...}``: where the run's process
    is, for operators (the ledger's ``pid``); nothing above the interface acts on it."""

    def message(self, message: dict[str, Any]) -> None: ...

    def ended(self, outcome: Outcome) -> None: ...


class Executor(Protocol):
    def submit(self, plan: RunPlan, watcher: Watcher) -> None:
        """Start the run, or raise OrchestratorError when it cannot start (watcher.ended is then not called)."""

    def stop(self, run_id: str) -> None:
        """End the run early (its outcome is ``stopped``); nothing when it is not in flight."""

    def answer(self, run_id: str, message: dict[str, Any]) -> None:
        """Write ``message`` (``{"t": "answer", "id": ...}``, to a run's ``ask``) on the run's channel;
        nothing when the run is not in flight."""

    def close(self) -> None:
        """Stop every run in flight and release what the executor holds."""


def decide(ended_by: str | None, result: dict[str, Any] | None, *, fault: str | None = None,
           deadline: float = 0.0, exit_text: str = "exit status unknown", usage: Usage | None = None) -> Outcome:
    """The one place a run's final status is decided. ``result`` is the run's last (checked) message."""
    status, output, error = _status(ended_by, result, fault, deadline, exit_text)
    u = usage or Usage()
    full = result.get("output_chars") if result is not None and status == "succeeded" else None
    return Outcome(status, output, error, u.cpu_seconds, u.max_rss_mb, u.bytes_written,
                   full if type(full) is int else None)


def _status(ended_by: str | None, result: dict[str, Any] | None, fault: str | None, deadline: float,
            exit_text: str) -> tuple[str, str | None, str | None]:
    if ended_by == "fault":
        return "failed", None, fault
    if ended_by == "timed_out":
        return "timed_out", None, f"exceeded max_runtime of {deadline:g}s"
    if ended_by == "stopped":
        return "stopped", None, "stopped on request"
    if ended_by == "lost":
        return "interrupted", None, fault or "the run's node was lost"
    if result is None:
        return "failed", None, f"run process died without a result ({exit_text})"
    return str(result["status"]), result.get("output"), result.get("error")


def exit_text(status: int | None) -> str:
    """A wait status as people say it: 'exit code 1', 'killed by SIGKILL'."""
    if status is None:
        return "exit status unknown"
    if os.WIFSIGNALED(status):
        number = os.WTERMSIG(status)
        try:
            return f"killed by {signal.Signals(number).name}"
        except ValueError:  # a real-time signal has no name
            return f"killed by signal {number}"
    return f"exit code {os.WEXITSTATUS(status)}"
