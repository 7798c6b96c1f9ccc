"""One daemon per home: the daemon holds an exclusive ``flock`` on ``$AGENT_ORCH_HOME/run/daemon.lock``.

The lock is taken before the daemon touches anything else of the home (control sockets, the API's
port, the state database), and held for its whole life on a descriptor nobody else inherits. The
kernel drops it when the daemon's process ends, however it ends (SIGTERM, kill -9, a crash), so there
is nothing stale to clean up and no window between checking a pid and writing one.

The file also says who holds it: one JSON object (pid, API address, version, start time), written
in place once the lock is held and again when the API is bound. The content is only ever read after
the lock says a daemon runs: a file left by a dead daemon is not taken for a live one.

A reader (``running_daemon``, for `agentctl status` and the Makefile) tests the lock with a
non-blocking shared ``flock`` on an open file description of its own. That probe holds the lock for
microseconds; a daemon starting at that instant would take it for a live daemon, so ``HomeLock``
tries again for a moment before it gives up.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import signal
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from runner import __version__
from runner.errors import DaemonRunningError

PROBE_GRACE = 1.0  # seconds HomeLock retries a lock held by a reader's probe before it believes a daemon holds it


def lock_path(home: Path) -> Path:
    return Path(home) / "run" / "daemon.lock"


class HomeLock:
    """The home's daemon lock, held from ``acquire`` until the process ends (or ``release``)."""

    def __init__(self, home: Path) -> None:
        self.path = lock_path(home)
        self.fd = -1
        self.info: dict[str, Any] = {}

    def acquire(self) -> HomeLock:
        """Take the lock or raise DaemonRunningError, naming the daemon that holds it."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        deadline = time.monotonic() + PROBE_GRACE
        while True:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() < deadline:
                    time.sleep(0.02)
                    continue
                holder = _read(fd)
                os.close(fd)
                raise DaemonRunningError(describe(holder)) from None
        self.fd = fd
        self.info = {"pid": os.getpid(), "api": None, "version": __version__,
                     "started_at": datetime.now(UTC).isoformat(timespec="seconds").replace("+00:00", "Z"),
                     "home": str(self.path.parent.parent)}
        self._write()
        return self

    def record(self, **fields: Any) -> None:
        """Add to what the lock file says of this daemon (the API address once it is bound)."""
        self.info.update(fields)
        self._write()

    def release(self) -> None:
        """Clear the record and drop the lock (the process ending drops it too)."""
        if self.fd < 0:
            return
        with contextlib.suppress(OSError):
            os.ftruncate(self.fd, 0)
        os.close(self.fd)
        self.fd = -1

    def _write(self) -> None:
        # Written at offset 0, then cut to length: a reader sees the old record, the new one, or the new
        # one followed by the old one's tail, which raw_decode ignores; never an empty file after the first.
        data = (json.dumps(self.info) + "\n").encode()
        os.pwrite(self.fd, data, 0)
        os.ftruncate(self.fd, len(data))


def running_daemon(home: Path) -> dict[str, Any] | None:
    """The daemon that runs for ``home``: {pid, api, version, started_at, home}, or None when none runs.

    "Runs" means it holds the home's lock, tested with a non-blocking flock; the pid in the file is never
    checked on its own. ``api`` is "HOST:PORT", or None while the daemon starts (or serves no API).
    """
    try:
        fd = os.open(lock_path(home), os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read(fd)
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def describe(holder: dict[str, Any]) -> str:
    pid = holder.get("pid") or "unknown"
    api = holder.get("api") or "not bound yet"
    return f"a daemon already runs for this home (pid {pid}, API on {api})"


def _read(fd: int) -> dict[str, Any]:
    """The record in the lock file; a daemon that has just taken the lock may not have written it yet."""
    deadline = time.monotonic() + 1.0
    while True:
        raw = os.pread(fd, 65536, 0).decode("utf-8", "replace")
        try:
            found, _end = json.JSONDecoder().raw_decode(raw)
            if isinstance(found, dict):
                return found
        except ValueError:
            pass
        if time.monotonic() >= deadline:
            return {}
        time.sleep(0.02)


# -- the operator's side: `make agent-orchestrator-status` and `-restart` (python -m runner.supervise.owning) --


def status_line(home: Path) -> str:
    found = running_daemon(home)
    if found is None:
        return f"no daemon runs for {home}"
    return (f"daemon of {home}: pid {found.get('pid')}, version {found.get('version')}, "
            f"API on {found.get('api') or 'not bound yet'}, since {found.get('started_at')}")


def restart(home: Path, timeout: float = 120.0) -> str:
    """Restart the daemon that holds ``home``'s lock, and only that one: SIGTERM to the pid it recorded,
    wait for the lock to be free, then start the same command again with the same environment and
    working directory (read from /proc before it stopped), detached, its output in the home's logs."""
    found = running_daemon(home)
    if found is None or not found.get("pid"):
        raise LookupError(f"no daemon runs for {home}: start one with 'make run'")
    pid = int(found["pid"])
    proc = Path(f"/proc/{pid}")
    argv = [a.decode() for a in (proc / "cmdline").read_bytes().split(b"\0") if a]
    env = dict(e.decode().split("=", 1) for e in (proc / "environ").read_bytes().split(b"\0") if b"=" in e)
    cwd = os.readlink(proc / "cwd")
    os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while running_daemon(home) is not None:
        if time.monotonic() >= deadline:
            raise TimeoutError(f"the daemon (pid {pid}) did not stop within {timeout:g}s of SIGTERM")
        time.sleep(0.1)
    out_path = Path(home) / "logs" / "serve.out"
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with open(out_path, "ab") as out:
        new = subprocess.Popen(argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL, stdout=out,
                               stderr=subprocess.STDOUT, start_new_session=True)
    while (now := running_daemon(home)) is None or now.get("pid") != new.pid or not now.get("api"):
        if new.poll() is not None:
            raise RuntimeError(f"the new daemon exited with {new.returncode}; see {out_path}")
        if time.monotonic() >= deadline:
            raise TimeoutError(f"the new daemon (pid {new.pid}) is not ready after {timeout:g}s; see {out_path}")
        time.sleep(0.1)
    return f"restarted the daemon of {home}: pid {pid} -> {new.pid}, API on {now.get('api')}"


def main(argv: list[str]) -> int:
    usage = "usage: python -m runner.supervise.owning status|restart HOME"
    if len(argv) != 2 or argv[0] not in ("status", "restart"):
        print(usage, file=sys.stderr)
        return 2
    home = Path(argv[1]).expanduser().absolute()
    try:
        if argv[0] == "status":
            print(status_line(home))
            return 0 if running_daemon(home) else 1
        print(restart(home))
    except PermissionError as exc:
        print(f"cannot read {lock_path(home)} ({exc.strerror}): run this as root or as the daemon's user",
              file=sys.stderr)
        return 1
    except (LookupError, TimeoutError, RuntimeError, OSError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
