"""Landlock through its three system calls (Linux 5.13+), with ctypes: no dependency, no privileges.

A ruleset names the kinds of access it handles; everything of those kinds that no rule allows is
denied to this process and every process it starts, for good. Rules allow access beneath a path (or,
from ABI 4, TCP connect/bind to a port). Each ABI adds kinds; we handle what the kernel knows.

A rule is bound to the file its path leads to when the rule is added, not to the path. So a rule for
a path a run could have changed (a spec path under some run's write path, scratch, the memory store)
must not follow symbolic links: a run that swaps a folder for a link to /etc would otherwise steer the
next run's rule there. ``allow_path(..., follow=False)`` opens such a path with openat2(2) and
RESOLVE_NO_SYMLINKS (Linux 5.6), or without it one component at a time with O_NOFOLLOW, and refuses
any link on the way (``SymlinkError``). The runtime's own paths still follow: /lib may be a link to
/usr/lib, and no run can write there.
"""

from __future__ import annotations

import ctypes
import errno
import os
import platform
import stat
from collections.abc import Iterable

# Defined with the rest of the tree; importers may still name them through this module.
from runner.errors import LandlockError as LandlockError
from runner.errors import SymlinkError as SymlinkError

SYS = {"x86_64": (444, 445, 446), "aarch64": (444, 445, 446), "riscv64": (444, 445, 446)}
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH, RULE_NET_PORT = 1, 2

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX, SCOPE_SIGNAL = 1 << 0, 1 << 1

OPENAT2 = {"x86_64": 437, "aarch64": 437, "riscv64": 437}
AT_FDCWD = -100
RESOLVE_NO_MAGICLINKS, RESOLVE_NO_SYMLINKS = 0x02, 0x04
# openat2 failures that mean "this kernel (or a seccomp profile, as Docker's) does not offer it as
# asked": the component walk answers instead. Any other failure is the path's own (missing, no access).
OPENAT2_UNAVAILABLE = (errno.ENOSYS, errno.EPERM, errno.EINVAL, errno.E2BIG)

READ = READ_FILE | READ_DIR
READ_EXEC = READ | EXECUTE
WRITE = WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_DIR | MAKE_REG | MAKE_SYM | MAKE_SOCK | MAKE_FIFO | TRUNCATE
FILE_ONLY = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV  # what a rule on a file (not a folder) may hold


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


class _OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]


class _NetPort(ctypes.Structure):
    _fields_ = [("allowed_access", ctypes.c_uint64), ("port", ctypes.c_uint64)]


_libc = ctypes.CDLL(None, use_errno=True)


def abi_version() -> int:
    """The Landlock ABI this kernel offers; 0 when it has none (or it is disabled)."""
    numbers = SYS.get(platform.machine())
    if numbers is None:
        return 0
    version = _libc.syscall(numbers[0], None, ctypes.c_size_t(0), ctypes.c_uint32(CREATE_RULESET_VERSION))
    return max(0, int(version))


def fs_access_for(abi: int) -> int:
    handled = (1 << 13) - 1  # ABI 1: EXECUTE .. MAKE_SYM
    if abi >= 2:
        handled |= REFER
    if abi >= 3:
        handled |= TRUNCATE
    if abi >= 5:
        handled |= IOCTL_DEV
    return handled


class Ruleset:
    def __init__(self, *, network: bool = True, scope: bool = True) -> None:
        self.abi = abi_version()
        if self.abi == 0:
            raise LandlockError("Landlock is not available on this kernel")
        create, self._add, self._restrict = SYS[platform.machine()]
        self.fs = fs_access_for(self.abi)
        self.net = (NET_BIND_TCP | NET_CONNECT_TCP) if network and self.abi >= 4 else 0
        scoped = (SCOPE_ABSTRACT_UNIX | SCOPE_SIGNAL) if scope and self.abi >= 6 else 0
        attr = _RulesetAttr(self.fs, self.net, scoped)
        size = 8 if self.abi < 4 else (16 if self.abi < 6 else 24)
        fd = _libc.syscall(create, ctypes.byref(attr), ctypes.c_size_t(size), ctypes.c_uint32(0))
        if fd < 0:
            raise LandlockError(ctypes.get_errno(), f"landlock_create_ruleset: {os.strerror(ctypes.get_errno())}")
        self.fd = int(fd)

    def allow_path(self, path: str, access: int, *, follow: bool = True) -> bool:
        """Allow ``access`` beneath ``path``; False (and nothing added) when the path does not exist
        or cannot be opened. With ``follow=False`` a symbolic link anywhere in ``path`` raises
        SymlinkError instead of being followed (see the module's note)."""
        if follow:
            try:
                pfd: int | None = os.open(path, os.O_PATH | os.O_CLOEXEC)
            except OSError:
                pfd = None
        else:
            pfd = open_no_symlinks(path)
        if pfd is None:
            return False
        try:
            allowed = access & self.fs
            # The opened file, not the path again: what the path names may have changed since.
            if not stat.S_ISDIR(os.fstat(pfd).st_mode):
                allowed &= FILE_ONLY
            rule = _PathBeneath(allowed, pfd)
            if _libc.syscall(self._add, self.fd, RULE_PATH_BENEATH, ctypes.byref(rule), 0) < 0:
                raise LandlockError(ctypes.get_errno(), f"landlock_add_rule({path}): "
                                    f"{os.strerror(ctypes.get_errno())}")
        finally:
            os.close(pfd)
        return True

    def allow_ports(self, ports: Iterable[int], access: int = NET_CONNECT_TCP) -> None:
        if not self.net:
            return
        for port in set(ports):
            rule = _NetPort(access & self.net, port)
            if _libc.syscall(self._add, self.fd, RULE_NET_PORT, ctypes.byref(rule), 0) < 0:
                raise LandlockError(ctypes.get_errno(), f"landlock_add_rule(port {port}): "
                                    f"{os.strerror(ctypes.get_errno())}")

    def enforce(self) -> None:
        """From now on this process (and what it starts) has only what the rules allow."""
        if _libc.prctl(38, 1, 0, 0, 0) != 0:  # PR_SET_NO_NEW_PRIVS: required, and wanted anyway
            raise LandlockError(ctypes.get_errno(), "prctl(PR_SET_NO_NEW_PRIVS) failed")
        if _libc.syscall(self._restrict, self.fd, 0) < 0:
            raise LandlockError(ctypes.get_errno(), f"landlock_restrict_self: {os.strerror(ctypes.get_errno())}")
        os.close(self.fd)


def open_no_symlinks(path: str) -> int | None:
    """An O_PATH descriptor of ``path`` reached without any symbolic link; None when it does not exist
    or cannot be opened; SymlinkError when a link is on the way. openat2(2) where the kernel has it,
    else ``walk_no_symlinks``."""
    number = OPENAT2.get(platform.machine())
    if number is not None:
        how = _OpenHow(os.O_PATH | os.O_CLOEXEC, 0, RESOLVE_NO_SYMLINKS | RESOLVE_NO_MAGICLINKS)
        fd = _libc.syscall(number, ctypes.c_long(AT_FDCWD), ctypes.c_char_p(os.fsencode(path)), ctypes.byref(how),
                           ctypes.c_size_t(ctypes.sizeof(how)))
        if fd >= 0:
            return int(fd)
        err = ctypes.get_errno()
        if err == errno.ELOOP:  # with RESOLVE_NO_SYMLINKS: a link on the way, not a loop
            raise _symlink_error(path)
        if err not in OPENAT2_UNAVAILABLE:
            return None
    return walk_no_symlinks(path)


def walk_no_symlinks(path: str) -> int | None:
    """``open_no_symlinks`` without openat2: open each component relative to the folder before it,
    with O_NOFOLLOW, and look at what was opened (O_PATH|O_NOFOLLOW opens a link itself). Each step
    holds the folder it came from, so no rename elsewhere can slip a link between two checks."""
    fd = os.open("/" if path.startswith("/") else ".", os.O_PATH | os.O_CLOEXEC | os.O_DIRECTORY)
    walked = "/" if path.startswith("/") else ""
    try:
        for name in path.split("/"):
            if name in ("", "."):
                continue
            walked = os.path.join(walked, name)
            try:
                step = os.open(name, os.O_PATH | os.O_NOFOLLOW | os.O_CLOEXEC, dir_fd=fd)
            except OSError:  # missing, no access, or a file where a folder should be
                return None
            os.close(fd)
            fd = step
            if stat.S_ISLNK(os.fstat(fd).st_mode):
                raise SymlinkError(path, walked, _link_target(walked))
        found, fd = fd, -1
        return found
    finally:
        if fd >= 0:
            os.close(fd)


def _symlink_error(path: str) -> SymlinkError:
    """The error naming the first link in ``path``, found again by name (for the message only)."""
    walked = "/" if path.startswith("/") else ""
    for name in path.split("/"):
        if name in ("", "."):
            continue
        walked = os.path.join(walked, name)
        if os.path.islink(walked):
            return SymlinkError(path, walked, _link_target(walked))
    return SymlinkError(path, None, None)  # gone again since: a race, still refused


def _link_target(link: str) -> str | None:
    try:
        return os.readlink(link)
    except OSError:
        return None
