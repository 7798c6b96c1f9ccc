"""The Ray executor: the daemon's runs on the nodes of a Ray cluster (docs/scale-out.md).

The daemon stays the control plane. This executor keeps one node runner (``runner.scale.node``) per
live node, a detached actor pinned there, and talks to it with four calls: ``submit`` a plan, ``poll``
for what its runs say, ``stop``, ``answer``. One poller thread per node delivers each run's messages to
its watcher in order, then its outcome, exactly as the local executor does.

Placement is chosen here: the least busy live node with the spec's labels whose resources, less what
the runs in flight there hold, cover the run's. A run no live node can take waits (``waiting`` says
why, per agent) and starts when one can.

A node that dies takes its runs with it: they end ``interrupted`` (the spec's ``retry`` applies). A
daemon that dies leaves them running: the next one ``reattach``es to each, by run id, and reads its
story again from the node's buffer.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from runner.agent.executor import Outcome, Watcher, decide
from runner.errors import OrchestratorError
from runner.plan import RunPlan
from runner.scale.joining import NAMESPACE, connect
from runner.scale.node import code_id
from runner.settings import Settings

log = logging.getLogger("runner.scale")
POLL_WAIT = 1.0  # seconds a poll waits on the node for news
CALL_TIMEOUT = 20.0  # seconds a call to a node runner may take before the node is suspect
LOST_AFTER = 6.0  # seconds a node runner may fail to answer before its runs are given up
REFRESH = 2.0  # seconds between two looks at the cluster's nodes
READOPT = 30.0  # seconds before a node given up while Ray still lists it alive is tried again
BACKSTOP = 30.0  # seconds past a run's deadline and grace before the daemon ends it itself
FORGET_DELAY = 5.0  # seconds after a run's end before its node may drop its messages


@dataclass
class _Node:
    node_id: str
    name: str
    labels: dict[str, str]
    resources: dict[str, float]
    handle: Any = None
    info: dict[str, Any] = field(default_factory=dict)
    alive: bool = True
    lost_at: float | None = None  # monotonic, when it was given up
    failing_since: float | None = None
    thread: threading.Thread | None = None


@dataclass
class _Run:
    plan: RunPlan | None
    watcher: Watcher
    node_id: str | None = None
    cursor: int = 0
    claims: dict[str, float] = field(default_factory=dict)
    deadline: float = 0.0  # monotonic: deadline and grace, past which the daemon ends it itself
    stop_asked: bool = False
    stop_sent: float | None = None
    ended: float | None = None  # monotonic, once its outcome reached the watcher
    placed: bool = False  # its node has it (submit returned): its poller follows it
    waits: str | None = None  # why it waits for a node, as its watcher was told


class RayExecutor:
    name = "ray"  # what run_progress.executor says of its runs, from their start on (runner.supervise.recovery)

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.ray = connect(settings)
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        from runner.scale.node import NodeRunner

        self._affinity = NodeAffinitySchedulingStrategy
        self._actor = self.ray.remote(NodeRunner)
        self.cond = threading.Condition()
        self.nodes: dict[str, _Node] = {}
        self.runs: dict[str, _Run] = {}
        self.pending: list[str] = []  # run ids waiting for a node, oldest first
        self.waiting: dict[str, str] = {}  # agent: why its runs wait
        self.refused: dict[str, str] = {}  # node id: why no run goes there
        self.closing = False
        self.home_node = self.ray.get_runtime_context().get_node_id()
        self.owner = f"{_machine()}:{settings.home.resolve()}"  # one daemon per home
        self._started = False  # until settle(): a node's runs of ours may be the previous daemon's, to follow
        self._refresh()
        self._thread = threading.Thread(target=self._keeper, name="ray-nodes", daemon=True)
        self._thread.start()

    # -- the interface --------------------------------------------------------------------------------

    def submit(self, plan: RunPlan, watcher: Watcher) -> None:
        with self.cond:
            if self.closing:
                raise OrchestratorError("the executor is closing")
            self.runs[plan.run_id] = _Run(plan, watcher, claims=dict(_placement(plan)[1]))
            self.pending.append(plan.run_id)
        self._place()

    def stop(self, run_id: str) -> None:
        with self.cond:
            run = self.runs.get(run_id)
            if run is None or run.ended is not None:
                return
            run.stop_asked = True
            waiting = run_id in self.pending  # never sent to a node: it ends here
            node = self.nodes.get(run.node_id or "") if run.placed else None  # else: stopped once its node has it
            if node is not None:
                run.stop_sent = time.monotonic()
        if waiting:
            self._end_locally(run_id, decide("stopped", None))
        elif node is not None and node.handle is not None:
            node.handle.stop.remote(run_id)

    def answer(self, run_id: str, message: dict[str, Any]) -> None:
        with self.cond:
            run = self.runs.get(run_id)
            node = self.nodes.get(run.node_id or "") if run is not None else None
        if node is not None and node.handle is not None:
            node.handle.answer.remote(run_id, message)

    def close(self) -> None:
        with self.cond:
            self.closing = True
            ids = list(self.runs)
        for run_id in ids:
            self.stop(run_id)
        deadline = time.monotonic() + self.settings.kill_grace + 15
        with self.cond:
            while any(r.ended is None for r in self.runs.values()) and time.monotonic() < deadline:
                self.cond.wait(0.2)
            self.cond.notify_all()
        self._forget_ended(force=True)
        try:
            self.ray.shutdown()
        except Exception:
            pass

    # -- reattaching after a daemon's crash ---------------------------------------------------------

    def reattach(self, run_id: str, plan: RunPlan | None, watcher: Watcher, deadline: float) -> bool:
        """Follow a run a dead daemon left on a node, from its first message (the watcher skips what is on
        record already). False when no live node has it: the caller ends it interrupted."""
        with self.cond:
            nodes = [n for n in self.nodes.values() if n.alive and n.handle is not None]
        for node in nodes:
            try:
                known = self.ray.get(node.handle.known.remote(self.owner), timeout=CALL_TIMEOUT)
            except Exception as exc:
                log.warning("node %s did not say which runs it has: %s", node.name, exc)
                continue
            if run_id in known:
                with self.cond:
                    self.runs[run_id] = _Run(plan, watcher, node_id=node.node_id, placed=True,
                                             claims=dict(_placement(plan)[1]) if plan else {},
                                             deadline=time.monotonic() + deadline)
                    self.cond.notify_all()
                return True
        return False

    def settle(self) -> None:
        """The daemon followed again what it could (``reattach``): what our nodes still run for this daemon
        that nobody follows now is stopped (its record says interrupted, or queued again)."""
        with self.cond:
            self._started = True
            nodes = [n for n in self.nodes.values() if n.alive and n.handle is not None]
        for node in nodes:
            self._stop_orphans(node)

    # -- what operators see -------------------------------------------------------------------------

    def cluster(self) -> dict[str, Any]:
        with self.cond:
            nodes = []
            for node in sorted(self.nodes.values(), key=lambda n: n.name):
                mine = [r for r in self.runs.values() if r.node_id == node.node_id and r.ended is None]
                nodes.append({"node": node.name, "node_id": node.node_id, "alive": node.alive,
                              "labels": {k: v for k, v in node.labels.items() if not k.startswith("ray.io/")},
                              "resources": {k: v for k, v in node.resources.items() if not k.startswith("node:")},
                              "runs": len(mine), "enforced": node.info.get("enforced")})
            return {"executor": "ray", "address": self.settings.ray_address, "nodes": nodes,
                    "refused": [{"node_id": k, "why": v} for k, v in sorted(self.refused.items())],
                    "waiting": dict(self.waiting), "pending": len(self.pending)}

    # -- placement ----------------------------------------------------------------------------------

    def _place(self) -> None:
        """Send each pending run whose node is found to that node, oldest first; tell the others' watchers
        why they wait (their record says queued meanwhile)."""
        while True:
            told: list[tuple[_Run, str]] = []
            with self.cond:
                choice = None
                self.waiting = {}
                for run_id in self.pending:
                    run = self.runs[run_id]
                    assert run.plan is not None
                    node, why = self._choose(run.plan, run.claims)
                    if node is None:
                        self.waiting.setdefault(run.plan.agent, why)
                        if run.waits is None:
                            run.waits = why
                            told.append((run, why))
                        continue
                    choice = (run_id, run, node)
                    break
            for waiting, why in told:
                waiting.watcher.message({"t": "waiting", "reason": why})
            with self.cond:
                if choice is None:
                    return
                run_id, run, node = choice
                if run_id not in self.pending or run.ended is not None:
                    continue  # placed meanwhile by another thread, or stopped
                self.pending.remove(run_id)
                run.node_id = node.node_id
                assert run.plan is not None
                run.deadline = time.monotonic() + run.plan.deadline_seconds + self.settings.kill_grace + BACKSTOP
            self._send(run_id, run, node)

    def _choose(self, plan: RunPlan, claims: dict[str, float]) -> tuple[_Node | None, str]:
        labels, _resources = _placement(plan)
        if not labels and plan.trigger.startswith("file_change") and self.home_node in self.nodes:
            labels = {"ray.io/node-id": self.home_node}  # its files are watched here
        live = [n for n in self.nodes.values() if n.alive and n.handle is not None]
        fits = [n for n in live if all(n.labels.get(k) == v for k, v in labels.items())]
        if not fits:
            wanted = ", ".join(f"{k}={v}" for k, v in labels.items())
            return None, f"placement: no live node has {wanted}" if wanted else "placement: no live node"
        big = [n for n in fits if all(n.resources.get(k, 0.0) >= v for k, v in claims.items())]
        if not big:
            wanted = ", ".join(f"{k}: {v:g}" for k, v in claims.items())
            return None, f"placement: no live node with those labels has the resources {wanted}"
        free = [n for n in big if all(self._held(n, k) + v <= n.resources.get(k, 0.0) for k, v in claims.items())]
        if not free:
            return None, "placement: the nodes that fit are busy"
        return min(free, key=lambda n: (self._load(n), n.name)), ""

    def _held(self, node: _Node, resource: str) -> float:
        return sum(r.claims.get(resource, 0.0) for r in self.runs.values()
                   if r.node_id == node.node_id and r.ended is None)

    def _load(self, node: _Node) -> int:
        return sum(1 for r in self.runs.values() if r.node_id == node.node_id and r.ended is None)

    def _send(self, run_id: str, run: _Run, node: _Node) -> None:
        assert run.plan is not None
        data = run.plan.to_json()
        # The model key goes to the node's egress proxy (the run itself is shown it masked, as locally).
        data["settings"]["openai_api_key"] = run.plan.settings.openai_api_key.get_secret_value()
        try:
            answer = self.ray.get(node.handle.submit.remote(data, self.owner), timeout=CALL_TIMEOUT)
        except Exception as exc:
            answer = {"error": f"node {node.name} did not take the run: {type(exc).__name__}: {exc}"}
        if "error" in answer:
            self._end_locally(run_id, decide("fault", None, fault=f"the run could not start on node {node.name}: "
                                                                  f"{answer['error']}"))
            return
        with self.cond:
            run.placed = True
            self.cond.notify_all()  # its node's poller has a run to follow
        if run.stop_asked:
            self.stop(run_id)

    def _end_locally(self, run_id: str, outcome: Outcome) -> None:
        """End a run here, without its node (never placed, refused, lost, or past the backstop)."""
        with self.cond:
            run = self.runs.get(run_id)
            if run is None or run.ended is not None:
                return
            run.ended = time.monotonic()
            if run_id in self.pending:
                self.pending.remove(run_id)
            self.cond.notify_all()
        try:
            run.watcher.ended(outcome)
        except Exception:
            log.exception("recording the end of run %s failed", run_id)

    # -- the nodes ----------------------------------------------------------------------------------

    def _keeper(self) -> None:
        while True:
            with self.cond:
                self.cond.wait(REFRESH)
                if self.closing and all(r.ended is not None for r in self.runs.values()):
                    return
            try:
                self._refresh()
                self._backstop()
                self._forget_ended()
                self._place()
            except Exception:
                log.exception("looking after the Ray cluster failed")

    def _refresh(self) -> None:
        try:
            seen = {n["NodeID"]: n for n in self.ray.nodes()}
        except Exception as exc:
            log.warning("the Ray cluster did not list its nodes: %s", exc)
            return
        for node_id, n in seen.items():
            known = self.nodes.get(node_id)
            if not n.get("Alive"):
                if known is not None and known.alive:
                    self._lost(known, "Ray reports the node dead")
                continue
            waiting = self.refused.get(node_id, "").startswith("waiting")
            if known is None and (node_id not in self.refused or waiting):  # a node id is never reused
                self._adopt(node_id, n)
            elif known is not None and not known.alive and time.monotonic() - (known.lost_at or 0) > READOPT:
                self._adopt(node_id, n)  # its runner stopped answering, yet Ray says the node lives: try again

    def _adopt(self, node_id: str, n: dict[str, Any]) -> None:
        labels = {str(k): str(v) for k, v in (n.get("Labels") or {}).items()}
        labels.setdefault("ray.io/node-id", node_id)
        node = _Node(node_id, str(n.get("NodeManagerHostname") or n.get("NodeManagerAddress") or node_id[:12]),
                     labels, {str(k): float(v) for k, v in (n.get("Resources") or {}).items()})
        try:
            node.handle = self._handle(node_id)
            node.info = self.ray.get(node.handle.info.remote(), timeout=120)
            node.name = str(node.info.get("node") or node.name)
            if node.info.get("code") != code_id():
                node.handle, node.info = self._renewed(node), {}
                node.info = self.ray.get(node.handle.info.remote(), timeout=120)
        except _Busy as exc:
            if node_id not in self.refused:
                log.warning("node %s: %s", node_id[:12], exc)
            self.refused[node_id] = f"waiting: {exc}"
            return
        except Exception as exc:
            log.warning("no node runner on node %s: %s", node_id[:12], exc)
            return
        if node.info.get("auth") != "token" and not self.settings.ray_insecure:
            if node_id not in self.refused:
                log.error("node %s does not require token authentication (%s): no run goes there (set "
                          "AGENT_ORCH_RAY_INSECURE=1 to allow it)", node.name, node.info.get("auth"))
            self.refused[node_id] = f"refused: authentication {node.info.get('auth')}"
            return
        with self.cond:
            self.nodes[node_id] = node
            self.refused.pop(node_id, None)
            self.cond.notify_all()
        if self._started:
            self._stop_orphans(node)
        node.thread = threading.Thread(target=self._poller, args=(node,), name=f"ray-poll-{node.name}", daemon=True)
        node.thread.start()
        log.info("node %s (%s) joined: labels %s", node.name, node_id[:12], node.labels)

    def _handle(self, node_id: str) -> Any:
        return self._actor.options(
            name=f"node-{node_id}", namespace=NAMESPACE, lifetime="detached", get_if_exists=True, num_cpus=0,
            max_concurrency=32, max_restarts=0,
            scheduling_strategy=self._affinity(node_id, soft=False)).remote(None, self.settings.kill_grace)

    def _renewed(self, node: _Node) -> Any:
        """A node runner of this daemon's code in place of one of other code, once that one runs nothing."""
        if node.info.get("held", node.info.get("runs")):
            raise _Busy(f"its runner runs other code (from before an upgrade) and holds {node.info.get('held')} "
                        "run(s), in flight or not yet collected: it is replaced once it holds none (every daemon "
                        "of a cluster must run the same code)")
        self.ray.kill(node.handle)
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:  # the name is free once Ray has the old actor dead
            try:
                self.ray.get_actor(f"node-{node.node_id}", namespace=NAMESPACE)
            except ValueError:
                break
            time.sleep(0.2)
        log.info("node %s: its runner ran other code; replaced", node.name)
        return self._handle(node.node_id)

    def _stop_orphans(self, node: _Node) -> None:
        """Runs of this daemon on a node that answers again, which nobody follows (a previous daemon's, given up
        as interrupted when this one started): stopped, so that none runs beside its retry."""
        try:
            known = self.ray.get(node.handle.known.remote(self.owner), timeout=CALL_TIMEOUT)
        except Exception:
            return
        with self.cond:
            orphans = [rid for rid, ended in known.items() if rid not in self.runs]
        for run_id in orphans:
            if not known[run_id]:
                log.warning("node %s runs %s, which nobody follows (its record says interrupted): stopping it",
                            node.name, run_id)
                node.handle.stop.remote(run_id)
        ended = [rid for rid in orphans if known[rid]]
        if ended:
            node.handle.forget.remote(ended)

    def _lost(self, node: _Node, why: str) -> None:
        with self.cond:
            if not node.alive:
                return
            node.alive, node.lost_at = False, time.monotonic()
            mine = [rid for rid, r in self.runs.items() if r.node_id == node.node_id and r.ended is None and r.placed]
            self.cond.notify_all()
        log.warning("node %s lost (%s): %d run(s) interrupted", node.name, why, len(mine))
        for run_id in mine:
            self._end_locally(run_id, decide("lost", None, fault=f"node {node.name} was lost mid-run ({why})"))
            try:  # should the node live after all, the run does not go on beside its retry
                node.handle.stop.remote(run_id)
            except Exception:
                pass

    def _poller(self, node: _Node) -> None:
        while True:
            with self.cond:
                while node.alive and not self.closing and not self._following(node):
                    self.cond.wait(POLL_WAIT)
                if not node.alive or (self.closing and not self._following(node)):
                    return
                cursors = {rid: r.cursor for rid, r in self.runs.items()
                           if r.node_id == node.node_id and r.ended is None and r.placed}
            try:
                news = self.ray.get(node.handle.poll.remote(cursors, POLL_WAIT), timeout=POLL_WAIT + CALL_TIMEOUT)
            except Exception as exc:
                self._failing(node, exc)
                continue
            node.failing_since = None
            for run_id, report in news.items():
                self._deliver(node, run_id, report)

    def _following(self, node: _Node) -> bool:
        return any(r.node_id == node.node_id and r.ended is None and r.placed for r in self.runs.values())

    def _failing(self, node: _Node, exc: Exception) -> None:
        from ray.exceptions import ActorDiedError, RayActorError

        now = time.monotonic()
        node.failing_since = node.failing_since or now
        if isinstance(exc, (ActorDiedError, RayActorError)) and not _unavailable(exc):
            self._lost(node, f"its runner died: {type(exc).__name__}")
        elif now - node.failing_since > LOST_AFTER:
            self._lost(node, f"its runner did not answer for {now - node.failing_since:.0f}s: {type(exc).__name__}")
        else:
            time.sleep(0.2)

    def _deliver(self, node: _Node, run_id: str, report: dict[str, Any]) -> None:
        with self.cond:
            run = self.runs.get(run_id)
        if run is None or run.ended is not None:
            return
        if report.get("unknown"):
            self._end_locally(run_id, decide("lost", None, fault=f"node {node.name} no longer has the run"))
            return
        answered = set(report.get("answered", []))
        for data in report.get("messages", []):
            run.cursor += 1
            try:
                message = json.loads(data)
                if message.get("t") == "ask" and message.get("id") in answered:
                    message["answered"] = True  # a daemon before this one answered it: not asked again
                run.watcher.message(message)
            except Exception:
                log.exception("recording a message of run %s failed", run_id)
        outcome = report.get("outcome")
        if outcome is not None:
            self._end_locally(run_id, Outcome(**outcome))

    def _backstop(self) -> None:
        """A run its node has not ended past its deadline and grace: stop it; 10 s later, end it here."""
        now = time.monotonic()
        with self.cond:
            late = [(rid, r) for rid, r in self.runs.items() if r.placed and r.ended is None and now > r.deadline]
        for run_id, run in late:
            if run.stop_sent is None:
                log.warning("run %s is past its deadline on its node: stopping it", run_id)
                self.stop(run_id)
            elif now - run.stop_sent > 10:
                self._end_locally(run_id, decide("timed_out", None, deadline=run.plan.deadline_seconds
                                                 if run.plan else 0.0))

    def _forget_ended(self, force: bool = False) -> None:
        now = time.monotonic()
        by_node: dict[str, list[str]] = {}
        with self.cond:
            for run_id, run in list(self.runs.items()):
                durable = getattr(run.watcher, "durable", None)  # its final row is on disk (RunRecord)
                if run.ended is not None and (force or (now - run.ended > FORGET_DELAY and
                                                        (durable is None or durable.is_set()))):
                    del self.runs[run_id]
                    if run.node_id:
                        by_node.setdefault(run.node_id, []).append(run_id)
            handles = {nid: self.nodes[nid].handle for nid in by_node if nid in self.nodes and self.nodes[nid].alive}
        for node_id, run_ids in by_node.items():
            if node_id in handles:
                handles[node_id].forget.remote(run_ids)


def _machine() -> str:
    """This machine, for telling our runs from another daemon's: its machine id (host names repeat)."""
    try:
        with open("/etc/machine-id") as handle:
            return handle.read().strip() or os.uname().nodename
    except OSError:
        return os.uname().nodename


class _Busy(Exception):
    """A node runner that cannot be used yet, and says why."""


def _placement(plan: RunPlan | None) -> tuple[dict[str, str], dict[str, float]]:
    placement = plan.spec.placement if plan is not None else None
    if placement is None:
        return {}, {}
    return dict(placement.labels), dict(placement.resources)


def _unavailable(exc: Exception) -> bool:
    """Ray's 'the actor may come back' (a network blip), as opposed to its death."""
    try:
        from ray.exceptions import ActorUnavailableError
    except ImportError:
        return False
    return isinstance(exc, ActorUnavailableError)
