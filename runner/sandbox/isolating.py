"""Namespaces for a run: its own PID namespace with its own pid_max, and its own network namespace.

``enter`` unshares the PID namespace; the caller then forks once, and that child is PID 1 of the new
namespace and runs the agent. When PID 1 exits or is killed, the kernel kills every process left in
the namespace, so a double-forked, setsid'd child cannot outlive its run. PID 1 then calls
``limit_processes`` (pid_max of its own namespace: a fork bomb fails there) and ``enter_network``:
a network namespace with nothing in it, or, when the run needs the network, a loopback that is up
and a listening socket on it for the egress proxy (docs/security.md).

Root can unshare directly; other users go through a user namespace that maps their uid to itself.
Where neither works (some container runtimes forbid it), nothing is entered, and the sandbox says so.
"""

from __future__ import annotations

import ctypes
import fcntl
import os
import socket
import struct

CLONE_NEWNS, CLONE_NEWUSER, CLONE_NEWPID, CLONE_NEWNET = 0x00020000, 0x10000000, 0x20000000, 0x40000000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
RESERVED_PIDS = 300  # after the first wrap, the kernel hands out PIDs from here up
_libc = ctypes.CDLL(None, use_errno=True)


def enter() -> list[str]:
    """Unshare the PID namespace (with a user namespace when not root); the caller must fork once after.
    The caller must be single-threaded (a user namespace requires it)."""
    if _libc.unshare(CLONE_NEWPID) == 0:
        return ["pid"]
    user = enter_user()
    return user + enter_pid() if user else []


def enter_user() -> list[str]:
    """A user namespace mapping our uid and gid to themselves, in which we may unshare the others.
    Only for a single-threaded process; nothing for root, which needs none."""
    if os.geteuid() == 0:
        return []
    uid, gid = os.getuid(), os.getgid()
    if _libc.unshare(CLONE_NEWUSER) != 0:
        return []
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")
    return ["user"]


def enter_pid() -> list[str]:
    """A PID namespace for the children from now on (a multi-threaded process may do it, but can start
    no thread after it)."""
    return ["pid"] if _libc.unshare(CLONE_NEWPID) == 0 else []


def enter_network(*, gateway: bool) -> socket.socket | None:
    """Move this process into a network namespace of its own. With ``gateway``, bring its loopback up
    and return a socket listening there (for the egress proxy). Raises OSError when it cannot."""
    if _libc.unshare(CLONE_NEWNET) != 0:
        errno = ctypes.get_errno()
        raise OSError(errno, f"unshare(CLONE_NEWNET): {os.strerror(errno)}")
    if not gateway:
        return None
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        request = struct.pack("16sh22x", b"lo", 0)
        flags = struct.unpack("16sh22x", fcntl.ioctl(s.fileno(), SIOCGIFFLAGS, request))[1]
        fcntl.ioctl(s.fileno(), SIOCSIFFLAGS, struct.pack("16sh22x", b"lo", flags | IFF_UP))
    return socket.create_server(("127.0.0.1", 0), backlog=64)


def limit_processes(limit: int) -> int | None:
    """Set pid_max of this process's PID namespace (Linux 6.14+) so that at most about ``limit``
    processes fit in it: RESERVED_PIDS more before the first wrap. Returns the value, or None."""
    if os.getpid() != 1:  # not in a PID namespace of our own: pid_max would be the machine's
        return None
    value = RESERVED_PIDS + max(1, limit)
    try:
        with open("/proc/sys/kernel/pid_max", "w") as handle:
            handle.write(str(value))
        with open("/proc/sys/kernel/pid_max") as handle:
            return value if int(handle.read()) == value else None
    except (OSError, ValueError):
        return None


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w") as handle:
            handle.write(text)
    except OSError:
        pass
