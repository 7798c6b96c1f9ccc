"""The daemon loop: follow the git source and keep the applied state in step with it.

Order of a pass: wait for the next poll (sync_interval with jitter) or a reconcile request (the
post-receive hook or the webhook touches a file), reconcile, log what changed. A source that cannot
be read keeps the last good state and is retried with exponential backoff; a revision that was
reconciled is not reconciled again until something changes, so a broken commit is no hot loop.

SIGTERM or SIGINT ends the loop after the pass in progress.
"""

from __future__ import annotations

import logging
import random
import signal
import threading
import time
from types import FrameType

from runner.errors import SourceError
from runner.reconcile.reconciling import open_source, reconcile
from runner.settings import Settings
from runner.source.hooks import reconcile_request_path
from runner.state import connect

log = logging.getLogger("runner.daemon")
MAX_BACKOFF = 300.0


class Daemon:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.stopping = threading.Event()
        self.conn = connect(settings.state_path)
        self.source = open_source(settings)
        self._request = reconcile_request_path(settings)
        self._request_mtime = self._mtime()
        self._failures = 0

    def run(self) -> None:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        log.info("serving %s for client %s from home %s", self.source.location.describe(),
                 self.settings.client_id, self.settings.home)
        while not self.stopping.is_set():
            delay = self.reconcile_once("daemon:poll")
            self._wait(delay)
        log.info("stopped")

    def reconcile_once(self, initiator: str) -> float:
        """Reconcile; returns how long to wait before the next poll."""
        try:
            plan, outcome = reconcile(self.settings, self.conn, self.source, initiator=initiator)
        except SourceError as exc:
            self._failures += 1
            backoff = min(MAX_BACKOFF, 2.0 ** self._failures)
            log.warning("source unavailable (%s); keeping the last good state, retry in %.0fs", exc.message, backoff)
            return backoff
        self._failures = 0
        if plan.refused:
            log.error("reconcile refused: %s", plan.refused)
        for change in plan.changes:
            log.info("%s", change)
        if outcome and plan.changes:
            log.info("applied %s: %d created, %d updated, %d deleted, %d invalid", plan.revision[:12],
                     outcome.created, outcome.updated, outcome.deleted, outcome.invalid)
        interval = self.settings.sync_interval
        return interval + random.uniform(0, interval / 10)

    def _wait(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self.stopping.is_set() and time.monotonic() < deadline:
            mtime = self._mtime()
            if mtime != self._request_mtime:
                self._request_mtime = mtime
                log.info("reconcile requested")
                return
            self.stopping.wait(0.2)

    def _mtime(self) -> float:
        try:
            return self._request.stat().st_mtime_ns / 1e9
        except OSError:
            return 0.0

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        log.info("received %s, stopping", signal.Signals(signum).name)
        self.stopping.set()
