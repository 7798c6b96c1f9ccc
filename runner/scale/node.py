"""The node runner: on each node of a Ray cluster, one detached actor that runs that node's runs.

It holds a ``LocalExecutor``, so a run on a node is forked, confined and supervised by the same code as
a local run: the zygote (LangChain loaded once) forks it into its namespaces, with Landlock, seccomp,
limits and the egress proxy in force before agent code runs. Agent code never runs in this actor's
process, which is a Ray worker: the zygote is a process of its own, started here, and runs are its
children.

The control plane (``runner.scale.cluster``) sends plans (``submit``), polls for what runs say
(``poll``: every message after a cursor, and the outcome once the run ended), and passes ``stop`` and
``answer``. Each run's messages are kept until the control plane says ``forget``, so a daemon that
died can reattach and read them again. This class imports no Ray: ``cluster`` makes it an actor.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from runner.agent.executor import Outcome
from runner.agent.local import LocalExecutor
from runner.errors import OrchestratorError
from runner.plan import RunPlan
from runner.sandbox.confining import check_paths, runtime_overlaps
from runner.specs.checking import private_folders, protected_folders

log = logging.getLogger("runner.scale")
MAX_BATCH = 2000  # messages one poll returns at most for one run
MAX_BATCH_BYTES = 4 << 20  # bytes of messages one poll returns at most, all runs together
EXPIRE_EVERY = 60.0  # seconds between two looks for ended runs no daemon came to collect
FORGET_AFTER = 6 * 3600.0  # seconds an ended run is kept for a daemon that never says forget (one that died)


@dataclass
class _Buffer:
    """One run's story as the node heard it, kept for the control plane to read (and read again)."""

    messages: list[bytes] = field(default_factory=list)  # each as JSON: a dict of small ones costs 20 times more
    size: int = 0  # bytes of messages
    outcome: dict[str, Any] | None = None
    ended_at: float | None = None
    answered: set[int] = field(default_factory=set)
    owner: str = ""  # the daemon that submitted it (its host and home)


class _Watcher:
    def __init__(self, node: NodeRunner, run_id: str) -> None:
        self.node, self.run_id = node, run_id

    def message(self, message: dict[str, Any]) -> None:
        if message["t"] == "placed":
            message = {**message, "node": self.node.name, "executor": "ray"}
        self.node._add(self.run_id, message=message)

    def ended(self, outcome: Outcome) -> None:
        self.node._add(self.run_id, outcome=asdict(outcome))


class NodeRunner:
    """The node's side. Thread-safe: the actor serves calls on several threads (a poll waits)."""

    def __init__(self, home: str | None = None, kill_grace: float = 5.0) -> None:
        # The node's own home (AGENT_ORCH_HOME where its Ray node was started) holds scratch folders only.
        home = home or os.environ.get("AGENT_ORCH_HOME") or os.path.join(tempfile.gettempdir(),
                                                                          f"agent-orchestrator-node-{os.getuid()}")
        self.home = Path(home).resolve()
        (self.home / "scratch").mkdir(parents=True, exist_ok=True)
        self.executor = LocalExecutor(kill_grace)
        self.cond = threading.Condition()
        self.runs: dict[str, _Buffer] = {}
        self.started = time.time()
        self.name = node_name()
        self.ray_folders = _ray_folders()
        threading.Thread(target=self._expiring, name="expire", daemon=True).start()

    # -- what the control plane calls ---------------------------------------------------------------

    def info(self) -> dict[str, Any]:
        """Who this node is and what its kernel enforces (``sandbox.detect``)."""
        from runner.sandbox.capabilities import detect

        with self.cond:
            in_flight = sum(1 for b in self.runs.values() if b.outcome is None)
            held = len(self.runs)
        from runner.scale.joining import auth_mode

        return {"node": self.name, "pid": os.getpid(), "home": str(self.home), "runs": in_flight, "held": held,
                "enforced": detect(), "version": _version(), "code": code_id(), "auth": auth_mode()}

    def submit(self, plan_json: dict[str, Any], owner: str = "") -> dict[str, Any]:
        """Start a run for the daemon ``owner``; ``{"error": ...}`` when it cannot start here."""
        try:
            plan = self._localised(RunPlan.from_json(plan_json))
            with self.cond:
                if plan.run_id in self.runs:
                    return {"error": f"run {plan.run_id} was submitted to this node already"}
                self.runs[plan.run_id] = _Buffer(owner=owner)
            self.executor.submit(plan, _Watcher(self, plan.run_id))
        except OrchestratorError as exc:
            self._drop(plan_json.get("run_id"))
            return {"error": exc.message}
        except Exception as exc:  # a plan this node cannot read (a version apart?) is refused, not crashed on
            log.exception("submitting a run on this node failed")
            self._drop(plan_json.get("run_id"))
            return {"error": f"the node could not start the run: {type(exc).__name__}: {exc}"}
        return {"ok": True}

    def poll(self, cursors: dict[str, int], wait: float = 1.0) -> dict[str, Any]:
        """For each run in ``cursors``: its messages from that index on and, once it ended, its outcome;
        ``{"unknown": true}`` for a run this node does not have. Waits up to ``wait`` seconds for news."""
        deadline = time.monotonic() + max(0.0, min(wait, 10.0))
        with self.cond:
            while True:
                out = self._news(cursors)
                left = deadline - time.monotonic()
                if out or left <= 0:
                    return out
                self.cond.wait(left)

    def stop(self, run_id: str) -> None:
        self.executor.stop(run_id)

    def answer(self, run_id: str, message: dict[str, Any]) -> None:
        """An answer to a run's ask, once: a daemon that reattached may answer an ask again."""
        with self.cond:
            buffer = self.runs.get(run_id)
            if buffer is None or message.get("id") in buffer.answered:
                return
            buffer.answered.add(int(message["id"]))  # polls say so: a daemon that reads the run again asks not
        self.executor.answer(run_id, message)

    def forget(self, run_ids: list[str]) -> None:
        with self.cond:
            for run_id in run_ids:
                buffer = self.runs.get(run_id)
                if buffer is not None and buffer.outcome is not None:
                    del self.runs[run_id]

    def known(self, owner: str | None = None) -> dict[str, bool]:
        """The runs this node has (those of daemon ``owner``): run id to whether it ended."""
        with self.cond:
            return {run_id: b.outcome is not None for run_id, b in self.runs.items() if owner in (None, b.owner)}

    # -- inside -------------------------------------------------------------------------------------

    def _localised(self, plan: RunPlan) -> RunPlan:
        """The plan as this node runs it: its scratch in this node's home; its data paths checked
        against this node's own folders."""
        plan.settings = plan.settings.model_copy(update={"home": self.home})
        plan.private = list(runtime_overlaps(list(private_folders(plan.settings))))
        check_paths(plan, [*protected_folders(plan.settings), *self.ray_folders])  # Ray's: its sockets, its token
        return plan

    def _add(self, run_id: str, message: dict[str, Any] | None = None, outcome: dict[str, Any] | None = None) -> None:
        with self.cond:
            buffer = self.runs.get(run_id)
            if buffer is None:
                return
            if message is not None:
                data = json.dumps(message).encode()
                buffer.messages.append(data)
                buffer.size += len(data)
            if outcome is not None:
                buffer.outcome, buffer.ended_at = outcome, time.monotonic()
            self.cond.notify_all()

    def _news(self, cursors: dict[str, int]) -> dict[str, Any]:
        """Messages as JSON text, at most MAX_BATCH_BYTES a poll (one at least), each run's in order."""
        out: dict[str, Any] = {}
        budget = MAX_BATCH_BYTES
        for run_id, cursor in cursors.items():
            buffer = self.runs.get(run_id)
            if buffer is None:
                out[run_id] = {"unknown": True}
                continue
            messages: list[bytes] = []
            for data in buffer.messages[cursor:cursor + MAX_BATCH]:
                if messages and len(data) > budget:
                    break
                messages.append(data)
                budget -= len(data)
            done = cursor + len(messages) >= len(buffer.messages)
            if messages or (done and buffer.outcome is not None):
                out[run_id] = {"messages": messages, "outcome": buffer.outcome if done else None,
                               "answered": sorted(buffer.answered)}
            if budget <= 0:
                break
        return out

    def _expiring(self) -> None:
        while True:
            time.sleep(EXPIRE_EVERY)
            now = time.monotonic()
            with self.cond:
                for run_id in [r for r, b in self.runs.items()
                               if b.ended_at is not None and now - b.ended_at > FORGET_AFTER]:
                    del self.runs[run_id]

    def _drop(self, run_id: Any) -> None:
        with self.cond:
            buffer = self.runs.get(str(run_id))
            if buffer is not None and not buffer.messages:
                del self.runs[str(run_id)]


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("agent-orchestrator")
    except PackageNotFoundError:
        return "unknown"


def node_name() -> str:
    """This node as the ledger's ``node`` column and operators say it: its host name and the start of its Ray
    node id (several nodes may share a host)."""
    try:
        import ray

        node_id = str(ray.get_runtime_context().get_node_id())[:8]
    except Exception:  # not in a Ray worker (a test of this class alone)
        return os.uname().nodename
    return f"{os.uname().nodename}/{node_id}"


@functools.cache
def code_id() -> str:
    """What code this process runs: a digest of the runner package's sources. A daemon uses no node runner
    of other code (one left from before an upgrade): plans and messages are this code's."""
    import runner

    digest = hashlib.sha256()
    root = Path(runner.__file__).parent
    for path in sorted(root.rglob("*.py")):
        digest.update(str(path.relative_to(root)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def _ray_folders() -> list[tuple[str, str]]:
    """Ray's own folders on this node (its sockets, session files and logs; ~/.ray holds the token): no
    spec path may be in or hold them."""
    found = [("Ray's folder", os.path.join(os.environ.get("RAY_TMPDIR", "/tmp"), "ray")),
             ("Ray's token folder", os.path.expanduser("~/.ray"))]
    try:
        import ray._private.worker as worker

        node: Any = worker.global_worker.node
        found.append(("Ray's folder", node.get_temp_dir_path()))
    except Exception:  # not in a Ray worker (a test of this class alone)
        pass
    return [(what, os.path.realpath(path)) for what, path in found]
