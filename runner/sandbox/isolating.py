"""Namespaces for a run: its own PID namespace always, and no network at all when it needs none.

The run process unshares and then forks: the child is PID 1 of the new PID namespace and runs the
agent; the parent (the run process the launcher knows) waits and passes on its exit status. When
PID 1 exits or is killed, the kernel kills every process left in the namespace, so a double-forked,
setsid'd child cannot outlive its run. A network namespace, when the run needs no network (a scripted
model and no network tools), leaves it with a loopback that is down: no sockets anywhere, no DNS.

Root can unshare directly; other users go through a user namespace that maps their uid to itself.
Where neither works (some container runtimes forbid it), the run goes on without, and says so.
"""

from __future__ import annotations

import ctypes
import os

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)


def enter(*, network: bool) -> list[str]:
    """Unshare the namespaces; the caller must fork once after this. Returns what was entered."""
    flags = CLONE_NEWPID | (0 if network else CLONE_NEWNET)
    if _libc.unshare(flags) == 0:
        return _names(flags)
    uid, gid = os.getuid(), os.getgid()
    if _libc.unshare(flags | CLONE_NEWUSER) == 0:
        _write("/proc/self/setgroups", "deny")
        _write("/proc/self/uid_map", f"{uid} {uid} 1")
        _write("/proc/self/gid_map", f"{gid} {gid} 1")
        return ["user", *_names(flags)]
    return []


def _names(flags: int) -> list[str]:
    return [name for bit, name in ((CLONE_NEWPID, "pid"), (CLONE_NEWNET, "net")) if flags & bit]


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w") as handle:
            handle.write(text)
    except OSError:
        pass
