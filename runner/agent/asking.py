"""The control plane's answers to what runs ask over their channel: their agent's memory.

An agent's memory store lives with the daemon (or the foreground launcher), whichever node runs the
agent: a run asks ``memory.search`` or ``memory.save`` and waits; ``Asks`` answers on a small pool of
threads (an embedding may wait on Ollama; the executor's thread must not) and hands the answer to the
run's executor, which writes it on the run's channel. The run never opens the store's file.
"""

from __future__ import annotations

import json
import logging
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from runner.agent.executor import Executor
from runner.errors import OrchestratorError
from runner.plan import RunPlan, store_path

log = logging.getLogger("runner.agent")
TEXT = 8000  # characters of a memory saved, as the memory_save tool has always kept
MAX_ANSWER = 256 << 10  # bytes of an answer's memories (JSON): the nearest that fit, the rest left out


class Asks:
    def __init__(self, executor: Executor, threads: int = 2) -> None:
        self.executor = executor
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="asks")
        self._lock = threading.Lock()
        self._stores: dict[Path, Any] = {}

    def take(self, plan: RunPlan, ask: dict[str, Any]) -> None:
        """Answer ``ask`` (a checked channel message) of ``plan``'s run, later, on the pool."""
        self._pool.submit(self._answer, plan, ask)

    def _answer(self, plan: RunPlan, ask: dict[str, Any]) -> None:
        try:
            answer = {"t": "answer", "id": ask["id"], **self._do(plan, ask)}
        except OrchestratorError as exc:
            answer = {"t": "answer", "id": ask["id"], "error": exc.message}
        except Exception as exc:  # a bug or a broken store: the run's tool says so, the run goes on
            log.exception("answering run %s's %s failed", plan.run_id, ask.get("op"))
            answer = {"t": "answer", "id": ask["id"], "error": f"memory failed: {type(exc).__name__}"}
        try:
            self.executor.answer(plan.run_id, answer)
        except Exception:
            log.exception("answering run %s failed", plan.run_id)

    def _do(self, plan: RunPlan, ask: dict[str, Any]) -> dict[str, Any]:
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
        with self._lock:
            for store in self._stores.values():
                store.close()
            self._stores.clear()


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
