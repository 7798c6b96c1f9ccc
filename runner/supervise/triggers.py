"""Triggers: schedules and file changes, each turned into ``submit`` calls on the process table.

Schedules keep a heap of (next slot, agent, trigger). Before a slot's run is queued, the slot is
written to ``trigger_state``: after a crash the next start knows it fired, so no slot fires twice.
At start, a ``persistent`` trigger whose latest slot passed while the daemon was down fires once. That
catch-up is decided from ``trigger_state`` alone, by the first ``update`` (the daemon makes it with
``catch_up=True`` before anything else arms the heap), never from what the heap already holds.

File changes: one watchdog observer. Events are filtered by the trigger's patterns and gathered
until ``debounce`` seconds pass without a new one; then one run gets the list of files as input.
A watched folder that does not exist (yet, or any more) is looked for at every tick until it is
there; meanwhile the log says so once, and ``waiting()`` names it (the daemon shows it in the agent's
status: "waiting for PATH to exist"). Its watch is known
to be dead when the folder's inode changed or when watchdog's emitter for it stopped (it stops itself
when the folder is deleted; a folder made again at once can get the same inode back). Files already in
a folder that comes back were made before its new watch was, so they count as changes.
"""

from __future__ import annotations

import fnmatch
import heapq
import logging
import os
import sqlite3
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from watchdog.events import FileSystemEvent, FileSystemEventHandler
from watchdog.observers import Observer
from watchdog.observers.api import BaseObserver, ObservedWatch
from watchdog.observers.polling import PollingObserver

import runner.reconcile.applied  # noqa: F401  (registers the agents table, which the trigger below names, first)
from runner.sandbox import landlock
from runner.specs.checking import expand
from runner.specs.models import AgentSpec, FileChangeTrigger, ScheduleTrigger
from runner.state import Transaction, register
from runner.supervise.scheduling import last_fire, next_fire


def _forget_deleted(conn: sqlite3.Connection) -> None:
    """Drop the rows of agents deleted while the trigger below did not exist yet (a home made by an older
    version). Looked for first: a DELETE, even of no row, would take the write lock."""
    orphans = ("NOT EXISTS (SELECT 1 FROM agents a WHERE a.client_id = trigger_state.client_id "
               "AND a.name = trigger_state.agent)")
    if conn.execute(f"SELECT 1 FROM trigger_state WHERE {orphans} LIMIT 1").fetchone():
        conn.execute(f"DELETE FROM trigger_state WHERE {orphans}")


# An agent's schedules' history goes with it, whichever process deletes it (an apply, in the same
# transaction): an agent made again under its name starts afresh, and is not caught up on a slot its
# namesake missed.
register("""
CREATE TABLE IF NOT EXISTS trigger_state (   -- the last schedule slot fired, so a restart never fires it twice
    client_id TEXT NOT NULL,
    agent TEXT NOT NULL,
    trigger_key TEXT NOT NULL,
    last_slot TEXT NOT NULL,
    PRIMARY KEY (client_id, agent, trigger_key)
);
CREATE TRIGGER IF NOT EXISTS trigger_state_of_deleted AFTER DELETE ON agents BEGIN
    DELETE FROM trigger_state WHERE client_id = OLD.client_id AND agent = OLD.name;
END;
""", then=_forget_deleted)

log = logging.getLogger("runner.triggers")
Submit = Callable[..., Any]


@dataclass(order=True)
class _Slot:
    at: datetime
    agent: str = field(compare=False)
    key: str = field(compare=False)
    trigger: ScheduleTrigger = field(compare=False)


def schedule_key(index: int, trigger: ScheduleTrigger) -> str:
    return f"{index}|{trigger.cron}|{trigger.timezone}"


class Scheduler:
    def __init__(self, conn_factory: Callable[[], Any], client_id: str, submit: Submit) -> None:
        self.conn_factory, self.client_id, self.submit = conn_factory, client_id, submit
        self.cond = threading.Condition()
        self.heap: list[_Slot] = []
        self.stopping = False
        self.on_lag: Callable[[float], None] | None = None  # seconds between a slot and its submission
        self.thread = threading.Thread(target=self._loop, name="scheduler", daemon=True)
        self.thread.start()

    def update(self, agents: dict[str, AgentSpec], *, catch_up: bool = False) -> None:
        """Replace the schedule with these agents' schedule triggers (enabled, not suspended).

        A trigger already scheduled keeps its pending slot, and the new heap is made under the lock: computing
        a trigger's next slot afresh while the loop fires could drop a slot that is due (now has passed it) or
        bring back one the loop has just fired.
        """
        conn = self.conn_factory()
        last = {(r[0], r[1]): datetime.fromisoformat(r[2]) for r in conn.execute(
            "SELECT agent, trigger_key, last_slot FROM trigger_state WHERE client_id = ?", (self.client_id,))}
        heap: list[_Slot] = []
        due: list[_Slot] = []
        with self.cond:
            now = datetime.now(UTC)
            pending = {(slot.agent, slot.key): slot.at for slot in self.heap}
            for name, spec in agents.items():
                for i, trig in enumerate(spec.triggers):
                    if not isinstance(trig, ScheduleTrigger):
                        continue
                    key = schedule_key(i, trig)
                    previous = last.get((name, key))
                    if catch_up and trig.persistent and previous is not None:
                        missed = last_fire(trig.cron, trig.timezone, now)
                        if missed is not None and missed > previous:
                            due.append(_Slot(missed, name, key, trig))
                    if (name, key) in pending:
                        heap.append(_Slot(pending[(name, key)], name, key, trig))
                        continue
                    after = max(now, previous) if previous else now
                    heap.append(_Slot(next_fire(trig.cron, trig.timezone, after), name, key, trig))
            heapq.heapify(heap)
            self.heap = heap
            self.cond.notify_all()
        for slot in due:
            log.info("catching up one missed slot of %s (%s)", slot.agent, slot.at.isoformat())
            self._fire(slot, catch_up=True)

    def next_runs(self) -> dict[str, datetime]:
        with self.cond:
            out: dict[str, datetime] = {}
            for slot in self.heap:
                if slot.agent not in out or slot.at < out[slot.agent]:
                    out[slot.agent] = slot.at
            return out

    def stop(self) -> None:
        with self.cond:
            self.stopping = True
            self.cond.notify_all()

    def _loop(self) -> None:
        while True:
            with self.cond:
                while not self.stopping and not self.heap:
                    self.cond.wait()
                if self.stopping:
                    return
                wait = (self.heap[0].at - datetime.now(UTC)).total_seconds()
                if wait > 0:
                    self.cond.wait(timeout=min(wait, 60))
                    continue
                slot = heapq.heappop(self.heap)
                heapq.heappush(self.heap, _Slot(next_fire(slot.trigger.cron, slot.trigger.timezone, slot.at),
                                                slot.agent, slot.key, slot.trigger))
            self._fire(slot)

    def _fire(self, slot: _Slot, catch_up: bool = False) -> None:
        conn = self.conn_factory()
        with Transaction(conn) as tx:  # recorded first: a crash after this never fires the slot again
            tx.execute("INSERT OR REPLACE INTO trigger_state (client_id, agent, trigger_key, last_slot) "
                       "VALUES (?, ?, ?, ?)", (self.client_id, slot.agent, slot.key, slot.at.isoformat()))
        lag = (datetime.now(UTC) - slot.at).total_seconds()
        if not catch_up and self.on_lag is not None:
            self.on_lag(lag)
        what = "missed slot" if catch_up else "slot"
        self.submit(slot.agent, trigger="schedule",
                    input=f"Scheduled run ({what} {slot.at.isoformat(timespec='seconds')}, cron '{slot.trigger.cron}' "
                          f"{slot.trigger.timezone}).")


@dataclass
class _Watch:
    agent: str
    path: str
    trigger: FileChangeTrigger
    pending: dict[str, float] = field(default_factory=dict)  # file -> time of its last event
    handle: ObservedWatch | None = None
    inode: tuple[int, int] | None = None  # of the folder being watched; None while not watched
    absent: bool = False  # the folder was not there (never yet, or it went away) when last looked at


class Watcher(FileSystemEventHandler):
    def __init__(self, submit: Submit, on_waiting: Callable[[], None] | None = None) -> None:
        self.submit = submit
        self.on_waiting = on_waiting  # called (from the tick thread) when a watched folder appears or goes away
        self.lock = threading.Lock()
        self.watches: dict[tuple[str, int], _Watch] = {}
        self.polling = False
        self.observer: BaseObserver = self._start_observer()
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._tick, name="watcher", daemon=True)
        self.thread.start()

    def _start_observer(self) -> BaseObserver:
        try:
            observer: BaseObserver = Observer()
            observer.start()
            return observer
        except OSError as exc:
            log.warning("inotify is not available (%s): watching folders by polling instead", exc)
            self.polling = True
            observer = PollingObserver(timeout=1)
            observer.start()
            return observer

    def update(self, agents: dict[str, AgentSpec], variables: Callable[[str], dict[str, str]]) -> None:
        wanted: dict[tuple[str, int], tuple[str, FileChangeTrigger]] = {}
        for name, spec in agents.items():
            for i, trig in enumerate(spec.triggers):
                if isinstance(trig, FileChangeTrigger):
                    # As written, not resolved: a link on the way (a run may plant one in its write path)
                    # is refused when the watch is armed, rather than followed elsewhere.
                    wanted[(name, i)] = (os.path.normpath(expand(trig.path, variables(name))), trig)
        with self.lock:
            for key in [k for k in self.watches if k not in wanted or
                        (self.watches[k].path, self.watches[k].trigger) != wanted[k]]:
                self._unschedule(self.watches.pop(key))
            for key, (path, trig) in wanted.items():
                if key not in self.watches:
                    self.watches[key] = _Watch(key[0], path, trig)
                    self._schedule(self.watches[key])

    def waiting(self) -> dict[str, list[str]]:
        """Folders each agent's triggers wait for: they do not exist, so nothing watches them yet."""
        with self.lock:
            out: dict[str, list[str]] = {}
            for w in self.watches.values():
                if w.absent and w.path not in out.get(w.agent, []):
                    out.setdefault(w.agent, []).append(w.path)
            return out

    def stop(self) -> None:
        self.stopping.set()
        self.observer.stop()

    # watchdog calls this from its own thread
    def on_any_event(self, event: FileSystemEvent) -> None:
        if event.is_directory or event.event_type in ("opened", "closed_no_write", "deleted"):
            return
        path = os.fsdecode(getattr(event, "dest_path", "") or event.src_path)
        now = time.monotonic()
        with self.lock:
            for w in self.watches.values():
                folder = os.path.dirname(path)
                inside = folder == w.path or (w.trigger.recursive and folder.startswith(w.path + os.sep))
                if inside and any(fnmatch.fnmatch(os.path.basename(path), p) for p in w.trigger.patterns):
                    w.pending[path] = now

    def _tick(self) -> None:
        """Fire debounced batches; re-arm watches on folders that were deleted and made again."""
        while not self.stopping.wait(0.1):
            now = time.monotonic()
            fire: list[tuple[str, list[str]]] = []
            with self.lock:
                before = [w.absent for w in self.watches.values()]
                for w in self.watches.values():
                    if w.pending and now - max(w.pending.values()) >= w.trigger.debounce:
                        fire.append((w.agent, sorted(w.pending)))
                        w.pending.clear()
                    self._rearm(w)
                changed = before != [w.absent for w in self.watches.values()]
            if changed and self.on_waiting is not None:
                self.on_waiting()
            for agent, files in fire:
                shown = "\n".join(f"- {f}" for f in files[:200])
                more = f"\n... and {len(files) - 200} more" if len(files) > 200 else ""
                self.submit(agent, trigger="file_change",
                            input=f"{len(files)} file(s) changed:\n{shown}{more}")

    def _rearm(self, w: _Watch) -> None:
        try:
            st = os.stat(w.path)
            inode: tuple[int, int] | None = (st.st_dev, st.st_ino)
        except OSError:
            inode = None
        if inode is None:
            if w.inode is not None:  # it went away: watch for it to come back
                self._unschedule(w)
                w.absent = True
                log.warning("%s: %s went away; waiting for it to exist again", w.agent, w.path)
            return
        emitter = self._emitter(w)
        if inode == w.inode and emitter == "alive":
            return
        # The folder came back, or another took its place: not when the emitter is merely missing (a watch on
        # the same folder was removed, or everything moved to a polling observer).
        came_back = w.absent or (w.inode is not None and (inode != w.inode or emitter == "stopped"))
        self._unschedule(w)
        self._schedule(w)
        if came_back and w.inode is not None:
            self._seed(w.path)

    def _emitter(self, w: _Watch) -> str:
        """watchdog's emitter for this watch: alive, stopped (it stops when the folder is deleted) or missing."""
        try:
            emitters = [e for e in list(self.observer.emitters) if w.handle is not None and e.watch == w.handle]
        except RuntimeError:  # the observer changed its emitters meanwhile: look again next tick
            return "alive"
        if not emitters:
            return "missing"
        return "alive" if any(e.is_alive() for e in emitters) else "stopped"

    def _seed(self, path: str) -> None:
        now = time.monotonic()
        for w in [w for w in self.watches.values() if w.path == path]:  # they share one emitter
            for folder, _dirs, files in os.walk(path):
                for name in files:
                    if any(fnmatch.fnmatch(name, p) for p in w.trigger.patterns):
                        w.pending[os.path.join(folder, name)] = now
                if not w.trigger.recursive:
                    break

    def _schedule(self, w: _Watch) -> None:
        try:
            fd = landlock.open_no_symlinks(w.path)
        except landlock.SymlinkError as exc:
            if not w.absent:
                log.warning("%s: not watching %s: %s", w.agent, w.path, exc.message)
            w.inode, w.absent = None, True
            return  # _rearm looks again: the link may go
        if fd is not None:
            os.close(fd)
        try:
            st = os.stat(w.path)
        except OSError:
            if not w.absent:
                log.warning("%s: the file_change trigger's folder %s does not exist; waiting for it to exist",
                            w.agent, w.path)
            w.inode = None
            w.absent = True
            return  # not there (yet): _rearm tries again
        try:
            w.handle = self.observer.schedule(self, w.path, recursive=w.trigger.recursive)
        except OSError as exc:  # watch limit reached, for one
            log.warning("cannot watch %s with inotify (%s): falling back to polling", w.path, exc)
            if not self.polling:
                self.observer.stop()
                self.observer = PollingObserver(timeout=1)
                self.observer.start()
                self.polling = True
                for other in self.watches.values():
                    other.inode = None  # re-schedule everything on the new observer
            w.handle = self.observer.schedule(self, w.path, recursive=w.trigger.recursive)
        if w.absent:
            log.info("%s: %s exists now; watching it", w.agent, w.path)
        w.inode, w.absent = (st.st_dev, st.st_ino), False

    def _unschedule(self, w: _Watch) -> None:
        if w.handle is not None:
            try:
                self.observer.unschedule(w.handle)
            except (KeyError, OSError):
                pass
            w.handle = None
        w.inode = None
