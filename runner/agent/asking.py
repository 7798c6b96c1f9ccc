"""The control plane's answers to what runs ask over their channel: their agent's memory, the agents
they ask as tools, and remote A2A agents.

An agent's memory store lives with the daemon (or the foreground launcher), whichever node runs the
agent: a run asks ``memory.search`` or ``memory.save`` and waits; ``Asks`` answers on a small pool of
threads (an embedding may wait on Ollama; the executor's thread must not) and hands the answer to the
run's executor, which writes it on the run's channel. The run never opens the store's file.

``agent.ask`` goes to the handler the daemon's process table gives (``runner.supervise.calling``): it
starts the callee and replies when the callee ends, from another thread; without a daemon there is none,
and the ask is refused. ``remote.ask`` is answered here, on a pool of its own (a remote agent may take
minutes): the URL's host is checked against the run's ``allowed_domains`` by the egress rules, each
decision journaled as the egress proxy's are (an ``egress`` event of the run), the credential is read
from the daemon's own environment (``secret_env``: only a variable the operator listed in
AGENT_ORCH_REMOTE_SECRETS, never one of the runner's own), and ``runner.agent.remote`` makes the call.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import urllib.parse
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from runner.agent.executor import Executor
from runner.agent.remote import ask_remote, origin
from runner.errors import DeniedError, OrchestratorError
from runner.plan import RunPlan, store_path
from runner.sandbox.access import HostRule, loopback
from runner.sandbox.egress import control_plane_refusal
from runner.settings import remote_secret_refusal
from runner.times import utcnow

log = logging.getLogger("runner.agent")
TEXT = 8000  # characters of a memory saved, as the memory_save tool has always kept
MAX_ANSWER = 256 << 10  # bytes of an answer's memories (JSON): the nearest that fit, the rest left out
REMOTE_THREADS = 8  # remote agents asked at once; more asks wait their turn (each run asks one at a time)


class Journal(Protocol):
    """Where a run's record takes what its supervisor adds to it (its ``RunRecord``)."""

    def message(self, message: dict[str, Any]) -> None: ...


Reply = Callable[[dict[str, Any]], None]  # the answer's fields; called once, from any thread
# An ``agent.ask`` handler: (the asking run's plan, the ask, its record, reply). It raises OrchestratorError
# (DeniedError: refused by policy) to refuse at once, or calls ``reply`` when the callee has ended.
AgentAsks = Callable[[RunPlan, dict[str, Any], Journal | None, Reply], None]


class Asks:
    def __init__(self, executor: Executor, threads: int = 2, agents: AgentAsks | None = None) -> None:
        self.executor = executor
        self.agents = agents
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="asks")
        self._remote = ThreadPoolExecutor(REMOTE_THREADS, thread_name_prefix="asks-remote")
        self._lock = threading.Lock()
        self._stores: dict[Path, Any] = {}

    def take(self, plan: RunPlan, ask: dict[str, Any], record: Journal | None = None) -> None:
        """Answer ``ask`` (a checked channel message) of ``plan``'s run, later, on a pool; ``record`` is the
        run's record, for what the answer adds to it (an egress decision)."""
        pool = self._remote if ask["op"] == "remote.ask" else self._pool
        pool.submit(self._answer, plan, ask, record)

    def _answer(self, plan: RunPlan, ask: dict[str, Any], record: Journal | None) -> None:
        def reply(fields: dict[str, Any]) -> None:
            try:
                self.executor.answer(plan.run_id, {"t": "answer", "id": ask["id"], **fields})
            except Exception:
                log.exception("answering run %s failed", plan.run_id)

        try:
            if ask["op"] == "agent.ask":
                if self.agents is None:
                    raise OrchestratorError("an agent is asked as a tool by the daemon: run this agent with "
                                            "'agentctl serve' running")
                self.agents(plan, ask, record, reply)
                return
            fields = self._remote_ask(plan, ask, record) if ask["op"] == "remote.ask" else self._memory(plan, ask)
        except OrchestratorError as exc:
            fields = {"error": exc.message, **({"denied": True} if isinstance(exc, DeniedError) else {})}
        except Exception as exc:  # a bug or a broken store: the run's tool says so, the run goes on
            log.exception("answering run %s's %s failed", plan.run_id, ask.get("op"))
            fields = {"error": f"{ask['op']} failed: {type(exc).__name__}"}
        reply(fields)

    def _remote_ask(self, plan: RunPlan, ask: dict[str, Any], record: Journal | None) -> dict[str, Any]:
        tool = next((t for t in plan.spec.tools if t.name == ask.get("tool") and t.remote_agent), None)
        if tool is None or tool.remote_agent is None:
            raise DeniedError(f"'{ask.get('tool')}' is not a remote_agent tool of this agent")
        if "@" in urllib.parse.urlsplit(tool.remote_agent).netloc:
            raise DeniedError("a remote agent's URL carries no user or password: its credential is secret_env")
        token = None
        if tool.secret_env:
            refused = remote_secret_refusal(tool.secret_env, plan.settings)
            if refused:
                raise DeniedError(refused)
            token = os.environ.get(tool.secret_env)
            if not token:
                raise OrchestratorError(f"the daemon's environment has no {tool.secret_env}: the credential of "
                                        f"the remote agent at {tool.remote_agent} is missing")
        rule = HostRule(tuple(plan.spec.constraints.allowed_domains), plan.settings.enable_remote_tools)
        home = origin(tool.remote_agent)
        control = frozenset({plan.settings.port})

        def check(url: str) -> None:
            """The egress rules for one URL of the call, the decision journaled as the proxy's are: the tool's
            own origin only, a host allowed_domains allows, not the runner's own API, and a credential never
            over plain http beyond this machine."""
            detail: dict[str, Any] = {"method": "POST", "host": "-", "port": 0, "via": f"remote_agent {tool.name}"}
            try:
                scheme, host, port = origin(url)
                detail.update(host=host, port=port)
                if (scheme, host, port) != home:
                    raise DeniedError(f"{scheme}://{host}:{port} is not the origin of the tool's URL ({home[0]}://"
                                      f"{home[1]}:{home[2]}): a remote agent's card may not send the call, or its "
                                      "credential, elsewhere")
                addresses = rule.check(host)
                refused = control_plane_refusal(host, port, addresses, control)
                if refused:
                    raise DeniedError(refused)
                if token and scheme == "http" and not (addresses and all(loopback(a) for a in addresses)):
                    raise DeniedError(f"the credential ({tool.secret_env}) is never sent over plain http to a host "
                                      f"beyond this machine ('{host}'): ask it at an https URL")
            except DeniedError as exc:
                _journal(record, "denied", {**detail, "reason": exc.message})
                raise
            _journal(record, "allowed", {**detail, "reason": "allowed_domains"})

        timeout = tool.timeout or plan.settings.default_agent_timeout
        answer = ask_remote(tool.remote_agent, ask["text"], token=token, timeout=timeout, check=check)
        host = urllib.parse.urlsplit(tool.remote_agent).hostname
        return {"output": answer.text, "host": host, "task_id": answer.task_id, "state": answer.state}

    def _memory(self, plan: RunPlan, ask: dict[str, Any]) -> dict[str, Any]:
        store = self._store(plan)
        if ask["op"] == "memory.save":
            return {"memory_id": store.add(ask["text"][:TEXT], kind=ask.get("kind", "note"), run_id=plan.run_id)}
        found, size = [], 0
        for memory in store.search(ask["text"], ask["k"]):
            size += len(json.dumps(memory.as_json()))
            if size > MAX_ANSWER:
                break
            found.append(memory.as_json())
        return {"found": found}

    def _store(self, plan: RunPlan) -> Any:
        from runner.agent.memory import open_memory  # NumPy: loaded by the first run that asks

        mem = plan.spec.memory
        if mem is None or mem.type == "none":
            raise OrchestratorError("this agent has no memory")
        path = store_path(plan.settings.memory_dir, plan.client_id, plan.agent, mem.collection)
        with self._lock:
            store = self._stores.get(path)
            if store is None:
                path.parent.mkdir(parents=True, exist_ok=True)
                store = self._stores[path] = _Locked(open_memory(plan))
            return store

    def close(self) -> None:
        self._pool.shutdown(wait=True, cancel_futures=True)
        self._remote.shutdown(wait=True, cancel_futures=True)
        with self._lock:
            for store in self._stores.values():
                store.close()
            self._stores.clear()


def _journal(record: Journal | None, decision: str, detail: dict[str, Any]) -> None:
    if record is not None:
        record.message({"t": "event", "ts": utcnow(), "kind": "log", "name": "egress", "decision": decision,
                        "detail": detail})


class _Locked:
    """A store used by one thread at a time (its SQLite connection is not shared between threads)."""

    def __init__(self, store: Any) -> None:
        self.store, self.lock = store, threading.Lock()

    def add(self, text: str, *, kind: str, run_id: str) -> int:
        with self.lock:
            return int(self.store.add(text, kind=kind, run_id=run_id))

    def search(self, query: str, k: int) -> list[Any]:
        with self.lock:
            return list(self.store.search(query, k))

    def close(self) -> None:
        with self.lock:
            self.store.close()
