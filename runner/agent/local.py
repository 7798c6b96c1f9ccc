"""The local executor: runs forked by a warm zygote, supervised by one thread.

``submit`` builds the run's egress proxy (the model key stays here, never in the run), has the zygote
fork the run process, and sends it its plan on the channel. One thread then watches every run in
flight at once with ``poll``: each run's channel (its messages, checked and bounded, go to its
watcher in order), its pidfd (it exited), its proxy's decisions, its deadline and any stop asked for.
It ends a run early by saying ``stop`` on the channel and signalling the run's process group: SIGTERM,
then SIGKILL after the grace. When the run process has exited and the zygote has reaped it (reporting
its wait status and what it used), the rest of the channel is read, the proxy closed, the scratch
folder removed, and ``decide`` says the outcome; the watcher hears it last.

One thread for all runs, not one per run: a hundred runs waiting on a slow model cost a hundred
entries in a poll set, not a hundred threads.
"""

from __future__ import annotations

import logging
import os
import queue
import select
import shutil
import signal
import socket
import struct
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from runner.agent.channel import Bounds, ChannelError, Decoder, checked, encode, message
from runner.agent.executor import Usage, Watcher, decide, exit_text
from runner.agent.spawning import Zygote
from runner.plan import RunPlan
from runner.sandbox.access import HostRule
from runner.sandbox.confining import model_endpoints, model_upstream, needs_network, network_tools, run_view
from runner.sandbox.egress import Budget, EgressPolicy, EgressProxy

log = logging.getLogger("runner.executor")
REAP_WAIT = 5.0  # seconds a run that exited may wait for the zygote's report of its status
SCM_MAX_FD = 253  # descriptors one unix socket message can carry (the kernel's limit)
TICK = 1.0  # seconds the loop sleeps at most when nothing happens (deadlines wake it sooner)


@dataclass
class _Run:
    plan: RunPlan
    watcher: Watcher
    pid: int
    pidfd: int
    channel: socket.socket
    proxy: EgressProxy | None
    deadline: float
    decoder: Decoder = field(default_factory=Decoder)
    bounds: Bounds | None = None
    result: dict[str, Any] | None = None
    fault: str | None = None
    ended_by: str | None = None  # why the executor is ending it (None: it ends by itself)
    kill_at: float | None = None  # when SIGKILL follows the SIGTERM
    exited: float | None = None  # when its pidfd said it exited (monotonic)
    reading: bool = True  # its channel is still read (not after a fault, nor after EOF)
    stop_asked: bool = False
    asking: int | None = None  # the id of its ask still unanswered (a run waits for each answer: one at a time)
    outbox: bytearray = field(default_factory=bytearray)  # answers not yet written on its channel


class LocalExecutor:
    def __init__(self, kill_grace: float = 5.0) -> None:
        self.kill_grace = kill_grace
        self._lock = threading.Lock()
        self._runs: dict[str, _Run] = {}
        self._wake_r, self._wake_w = os.pipe()
        os.set_blocking(self._wake_r, False)
        os.set_blocking(self._wake_w, False)
        self._closing_down = False
        self._closing: queue.SimpleQueue[int] = queue.SimpleQueue()
        threading.Thread(target=self._closer, name="executor-closer", daemon=True).start()
        self.zygote = Zygote(on_exit=lambda _run_id: self._wake())
        self._thread = threading.Thread(target=self._loop, name="executor", daemon=True)
        self._thread.start()

    # -- the interface --------------------------------------------------------------------------------

    def submit(self, plan: RunPlan, watcher: Watcher) -> None:
        plan.scratch.mkdir(parents=True, exist_ok=True)  # the run mounts its own tmpfs over it
        proxy = _egress_proxy(plan) if plan.settings.sandbox != "off" and needs_network(plan) else None
        ours, theirs = socket.socketpair()
        try:
            pid, pidfd = self.zygote.fork(plan.run_id, theirs, isolate=plan.settings.sandbox != "off")
        except BaseException:
            ours.close()
            if proxy is not None:
                proxy.close()
            shutil.rmtree(plan.scratch, ignore_errors=True)
            raise
        finally:
            theirs.close()
        # The run's view of its plan: secrets masked, no spec source, no credentials in URLs.
        ours.sendall(message("plan", plan=run_view(plan).to_json()))
        ours.setblocking(False)
        run = _Run(plan, watcher, pid, pidfd, ours, proxy, time.monotonic() + plan.deadline_seconds,
                   bounds=Bounds(plan.spec))
        with self._lock:
            self._runs[plan.run_id] = run
        watcher.message({"t": "placed", "pid": pid, "node": os.uname().nodename})
        self._wake()

    def stop(self, run_id: str) -> None:
        with self._lock:
            run = self._runs.get(run_id)
            if run is not None:
                run.stop_asked = True
        self._wake()

    def answer(self, run_id: str, message: dict[str, Any]) -> None:
        """Queue the answer to the run's one open ask; the loop writes it when the channel takes it (never
        a caller's thread: a run that does not read would hold it)."""
        with self._lock:
            run = self._runs.get(run_id)
            if run is None or run.exited is not None or run.asking is None or message.get("id") != run.asking \
                    or run.outbox:
                return  # not in flight, or not the ask it waits for (answered already)
            run.outbox += encode(message)  # its ask stays open until all of it is written
            if type(message.get("tokens")) is int and run.bounds is not None:
                run.bounds.borrow(message["tokens"])  # an agent asked as a tool: its tokens are on this run's budget
        self._wake()

    def close(self) -> None:
        with self._lock:
            self._closing_down = True
            for run in self._runs.values():
                run.stop_asked = True
        self._wake()
        self._thread.join(timeout=self.kill_grace + 30)
        self.zygote.close()

    def in_flight(self) -> int:
        with self._lock:
            return len(self._runs)

    # -- the loop -------------------------------------------------------------------------------------

    def _wake(self) -> None:
        try:
            os.write(self._wake_w, b"x")
        except BlockingIOError:
            pass  # a wake-up is pending already

    def _loop(self) -> None:
        while True:
            with self._lock:
                runs = list(self._runs.values())
                if self._closing_down and not runs:
                    return
            poller = select.poll()
            poller.register(self._wake_r, select.POLLIN)
            owners: dict[int, tuple[_Run, str]] = {}
            now = time.monotonic()
            timeout = TICK
            for run in runs:
                with self._lock:
                    sending = bool(run.outbox) and run.exited is None and run.fault is None
                if run.reading or sending:
                    poller.register(run.channel.fileno(), (select.POLLIN if run.reading else 0) |
                                    (select.POLLOUT if sending else 0))
                    owners[run.channel.fileno()] = (run, "channel")
                for fd, what in ((run.pidfd, "exit") if run.exited is None else (-1, ""),
                                 (run.proxy.wake_fd, "proxy") if run.proxy is not None else (-1, "")):
                    if fd >= 0:
                        poller.register(fd, select.POLLIN)
                        owners[fd] = (run, what)
                timeout = min(timeout, max(0.0, (run.kill_at or run.deadline) - now))
                if run.exited is not None:
                    timeout = min(timeout, 0.05)  # waiting for the zygote's report
            ready = poller.poll(timeout * 1000)
            for fd, event in ready:
                if fd == self._wake_r:
                    _drain_pipe(self._wake_r)
                    continue
                run, what = owners[fd]
                try:
                    if what == "channel" and event & select.POLLOUT:
                        self._send_answers(run)
                    if what != "channel" or event & ~select.POLLOUT:
                        self._on_ready(run, what)
                except Exception:  # a bug here must not leave every other run unsupervised
                    log.exception("supervising run %s failed", run.plan.run_id)
                    run.fault = run.fault or "its supervisor failed (see the daemon's log)"
                    run.reading = False
                    self._end(run, "fault")
            now = time.monotonic()
            for run in runs:
                try:
                    self._keep_time(run, now)
                    if run.exited is not None:
                        self._maybe_finish(run, now)
                except Exception:  # as above: one run's bad turn must not end the supervision of all
                    log.exception("supervising run %s failed", run.plan.run_id)
                    self._abandon(run)

    def _on_ready(self, run: _Run, what: str) -> None:
        if what == "channel":
            if run.proxy is not None:  # what the proxy decided came before what the run says of it now
                self._egress(run, run.proxy.decisions())
            self._receive(run)
        elif what == "exit":
            run.exited = time.monotonic()
        elif what == "proxy" and run.proxy is not None:
            self._egress(run, run.proxy.decisions())

    def _keep_time(self, run: _Run, now: float) -> None:
        if run.exited is not None:
            return
        if run.kill_at is not None and now >= run.kill_at:
            _signal_group(run.pid, signal.SIGKILL)
            run.kill_at = now + 30  # and again, should the kernel be slow to take it
        elif run.ended_by is None and now >= run.deadline:
            self._end(run, "timed_out")
        elif run.ended_by is None and run.stop_asked:
            self._end(run, "stopped")

    def _end(self, run: _Run, why: str) -> None:
        """End the run early: say stop on its channel, SIGTERM its group, SIGKILL after the grace."""
        if run.ended_by is not None or run.exited is not None:
            return
        run.ended_by = why
        try:
            run.channel.send(message("stop"))
        except OSError:
            pass
        _signal_group(run.pid, signal.SIGTERM)
        run.kill_at = time.monotonic() + run.plan.settings.kill_grace  # the plan's: a node runs many daemons' plans

    # -- what the run says --------------------------------------------------------------------------

    def _receive(self, run: _Run) -> bool:
        """Read what is there; False when nothing was (the run sent all, or nothing yet)."""
        if not run.reading:
            return False
        try:
            # Room for as many descriptors as one message can carry: the kernel closes those that do not fit
            # on this thread, and a socket closed with a long SO_LINGER would block it.
            data, fds, _flags, _addr = socket.recv_fds(run.channel, 1 << 16, SCM_MAX_FD)
        except BlockingIOError:
            return False
        except OSError:
            data, fds = b"", []
        for fd in fds:
            # The one descriptor a run may send: its egress listener, once, before any other message (the
            # run sends it while it sets up, before agent code). Anything else breaks the channel.
            proxy = run.proxy
            if proxy is not None and proxy.listener is None and run.decoder.count == 0 and len(fds) == 1:
                proxy.serve(socket.socket(fileno=fd))
            else:
                self._discard(fd)
                if run.fault is None:
                    self._broken(run, "the run sent a descriptor on its channel after its setup")
        if not data:
            run.reading = False
            return False
        if run.fault is not None:
            return False
        try:
            for raw, size in run.decoder.feed(data):
                self._message(run, checked(raw, size))
        except ChannelError as exc:
            self._broken(run, str(exc))
        return True

    def _discard(self, fd: int) -> None:
        """Close a descriptor a run sent, on a thread of its own and without lingering: a socket with
        unsent data and a long SO_LINGER would hold its closer for as long as the run chose."""
        try:
            sock = socket.socket(fileno=fd)
        except OSError:
            sock = None
        if sock is not None:
            try:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            except OSError:
                pass
            sock.detach()
        self._closing.put(fd)

    def _closer(self) -> None:
        while True:
            fd = self._closing.get()
            try:
                os.close(fd)
            except OSError:
                pass

    def _send_answers(self, run: _Run) -> None:
        with self._lock:
            try:
                sent = run.channel.send(run.outbox)
            except BlockingIOError:
                return
            except OSError:
                sent = len(run.outbox)  # the run is gone: its end is seen by its pidfd
            del run.outbox[:sent]
            if not run.outbox:
                run.asking = None  # written whole: the run may ask again

    def _message(self, run: _Run, msg: dict[str, Any]) -> None:
        assert run.bounds is not None
        run.bounds.check(msg)
        if msg["t"] == "ask":
            with self._lock:
                if run.asking is not None:
                    raise ChannelError("the run sent a message its supervisor refuses: an ask before the answer to "
                                       "its last")
                run.asking = msg["id"]
        if msg["t"] == "result":
            run.result = msg
        elif msg["t"] != "egress":
            run.watcher.message(msg)

    def _broken(self, run: _Run, reason: str) -> None:
        run.fault = reason
        run.reading = False
        self._end(run, "fault")

    def _egress(self, run: _Run, decisions: list[dict[str, Any]]) -> None:
        for d in decisions:
            run.watcher.message({"t": "event", "ts": d.pop("ts"), "kind": "log", "name": "egress",
                                 "decision": d.pop("decision"), "detail": d})

    # -- the end ----------------------------------------------------------------------------------------

    def _abandon(self, run: _Run) -> None:
        """The last resort for a run whose end could not be handled: kill it, forget it, record it failed."""
        _signal_group(run.pid, signal.SIGKILL)
        with self._lock:
            if self._runs.pop(run.plan.run_id, None) is None:
                return
        for close in (run.channel.close, lambda: os.close(run.pidfd)):
            try:
                close()
            except OSError:
                pass
        try:
            run.watcher.ended(decide("fault", None, fault="its supervisor failed (see the daemon's log)"))
        except Exception:
            log.exception("recording the end of run %s failed", run.plan.run_id)

    def _maybe_finish(self, run: _Run, now: float) -> None:
        status, usage = self.zygote.exited(run.plan.run_id, timeout=0)
        if status is None and self.zygote.proc.poll() is None and now - (run.exited or now) < REAP_WAIT:
            return  # the zygote reports the reap in a moment (and wakes us)
        try:
            while self._receive(run):
                pass
        except Exception:
            log.exception("reading what run %s sent last failed", run.plan.run_id)
            run.fault = run.fault or "its supervisor could not read what it sent last"
        run.channel.close()
        if run.proxy is not None:
            self._egress(run, run.proxy.close())
        os.close(run.pidfd)
        shutil.rmtree(run.plan.scratch, ignore_errors=True)
        with self._lock:
            self._runs.pop(run.plan.run_id, None)
        outcome = decide(run.ended_by if run.fault is None else "fault", run.result, fault=run.fault,
                         deadline=run.plan.deadline_seconds, exit_text=exit_text(status),
                         usage=Usage(**usage) if usage else None)
        try:
            run.watcher.ended(outcome)
        except Exception:
            log.exception("recording the end of run %s failed", run.plan.run_id)


def _egress_proxy(plan: RunPlan) -> EgressProxy:
    """The run's egress proxy, not serving yet: its model servers (with the credentials the run never
    sees), and its allowed domains when a tool is granted 'network'."""
    hosts = HostRule(tuple(plan.spec.constraints.allowed_domains), plan.settings.enable_remote_tools) \
        if network_tools(plan) else None
    c = plan.spec.constraints
    return EgressProxy(EgressPolicy(frozenset(model_endpoints(plan)), hosts, model_upstream(plan),
                                    frozenset(model_endpoints(plan, tls=True)),
                                    Budget(c.max_model_calls, c.max_tokens), frozenset({plan.settings.port})))


def _drain_pipe(fd: int) -> None:
    try:
        while os.read(fd, 4096):
            pass
    except BlockingIOError:
        pass


def _signal_group(pid: int, sig: signal.Signals) -> None:
    """The run's process group (it called setsid). Its PID stays reserved until the zygote reaps it,
    after its exit, so the signal reaches nobody else."""
    try:
        os.killpg(pid, sig)
    except (ProcessLookupError, PermissionError):
        pass


def readable(fds: list[int], timeout: float) -> list[int]:
    """Which of ``fds`` can be read within ``timeout`` seconds. poll, not select: a daemon serving many
    runs holds descriptors past select's 1,024."""
    poller = select.poll()
    for fd in fds:
        poller.register(fd, select.POLLIN)
    return [fd for fd, _event in poller.poll(max(0.0, timeout) * 1000)]

