"""Namespaces for a run: its own PID namespace with its own pid_max, its own IPC, UTS and mount
namespaces (SysV objects and the host name stay the run's own; its scratch folder is a tmpfs that
goes with it), and its own network namespace.

``enter`` unshares them; the caller then forks once, and that child is PID 1 of the new
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
CLONE_NEWUTS, CLONE_NEWIPC = 0x04000000, 0x08000000
MS_NOSUID, MS_NODEV, MS_REC, MS_PRIVATE = 0x2, 0x4, 0x4000, 0x40000
SIOCGIFFLAGS, SIOCSIFFLAGS, IFF_UP = 0x8913, 0x8914, 0x1
RESERVED_PIDS = 300  # after the first wrap, the kernel hands out PIDs from here up
_libc = ctypes.CDLL(None, use_errno=True)


def enter() -> list[str]:
    """Unshare the PID, IPC, UTS and mount namespaces (in a user namespace when not root); the caller
    must fork once after, and must be single-threaded (a user namespace requires it). What could not
    be entered is left out of the answer: with no PID namespace, nothing is entered."""
    user = enter_user()
    if _libc.unshare(CLONE_NEWPID | CLONE_NEWIPC | CLONE_NEWUTS | CLONE_NEWNS) == 0:
        return [*user, "pid", "ipc", "uts", "mnt"]
    return [*user, "pid"] if _libc.unshare(CLONE_NEWPID) == 0 else []


def enter_user() -> list[str]:
    """A user namespace mapping our uid and gid to themselves, in which we may unshare the others.
    Only for a single-threaded process; nothing for root, which needs none."""
    if os.geteuid() == 0:
        return []
    uid, gid = os.getuid(), os.getgid()
    if _libc.unshare(CLONE_NEWUSER) != 0:
        return []
    map_user(uid, gid)
    return ["user"]


def map_user(uid: int, gid: int) -> None:
    """In a new user namespace: our uid and gid (as the parent namespace knows them) map to themselves."""
    _write("/proc/self/setgroups", "deny")
    _write("/proc/self/uid_map", f"{uid} {uid} 1")
    _write("/proc/self/gid_map", f"{gid} {gid} 1")


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


def mount_scratch(path: str, size_mb: int) -> str:
    """A tmpfs of ``size_mb`` over the run's scratch folder, in the run's own mount namespace: what the
    run writes there counts against that size, not the home's disk, and is gone with the namespace.
    Mounts made here do not propagate to the host. Returns what was done, for the run's record."""
    if _libc.mount(b"none", b"/", None, MS_REC | MS_PRIVATE, None) != 0:
        return f"on disk (mount propagation: {os.strerror(ctypes.get_errno())})"
    options = f"size={int(size_mb)}m,mode=0700".encode()
    if _libc.mount(b"tmpfs", path.encode(), b"tmpfs", MS_NOSUID | MS_NODEV, options) != 0:
        return f"on disk (tmpfs: {os.strerror(ctypes.get_errno())})"
    return f"tmpfs of {int(size_mb)} MiB"


def limit_processes(limit: int) -> int | None:
    """Set pid_max of this process's PID namespace (Linux 6.14+) so that at most about ``limit``
    processes fit in it: RESERVED_PIDS more before the first wrap. Returns the value, or None."""
    if os.getpid() != 1 or not pid_max_per_namespace():  # else pid_max would be the whole machine's
        return None
    value = RESERVED_PIDS + max(1, limit)
    try:
        with open("/proc/sys/kernel/pid_max", "w") as handle:
            handle.write(str(value))
        with open("/proc/sys/kernel/pid_max") as handle:
            return value if int(handle.read()) == value else None
    except (OSError, ValueError):
        return None


def pid_max_per_namespace() -> bool:
    """Whether this kernel keeps pid_max per PID namespace (Linux 6.14). Before that the file is the
    machine's, and a root run writing it would starve every process on the host."""
    release = os.uname().release.split("-", 1)[0].split(".")
    try:
        return (int(release[0]), int(release[1])) >= (6, 14)
    except (IndexError, ValueError):
        return False


def _write(path: str, text: str) -> None:
    try:
        with open(path, "w") as handle:
            handle.write(text)
    except OSError:
        pass
