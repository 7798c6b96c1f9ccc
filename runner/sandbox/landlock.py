"""Landlock through its three system calls (Linux 5.13+), with ctypes: no dependency, no privileges.

A ruleset names the kinds of access it handles; everything of those kinds that no rule allows is
denied to this process and every process it starts, for good. Rules allow access beneath a path (or,
from ABI 4, TCP connect/bind to a port). Each ABI adds kinds; we handle what the kernel knows.
"""

from __future__ import annotations

import ctypes
import os
import platform
from collections.abc import Iterable

SYS = {"x86_64": (444, 445, 446), "aarch64": (444, 445, 446), "riscv64": (444, 445, 446)}
CREATE_RULESET_VERSION = 1
RULE_PATH_BENEATH, RULE_NET_PORT = 1, 2

EXECUTE, WRITE_FILE, READ_FILE, READ_DIR = 1 << 0, 1 << 1, 1 << 2, 1 << 3
REMOVE_DIR, REMOVE_FILE, MAKE_CHAR, MAKE_DIR = 1 << 4, 1 << 5, 1 << 6, 1 << 7
MAKE_REG, MAKE_SOCK, MAKE_FIFO, MAKE_BLOCK, MAKE_SYM = 1 << 8, 1 << 9, 1 << 10, 1 << 11, 1 << 12
REFER, TRUNCATE, IOCTL_DEV = 1 << 13, 1 << 14, 1 << 15
NET_BIND_TCP, NET_CONNECT_TCP = 1 << 0, 1 << 1
SCOPE_ABSTRACT_UNIX, SCOPE_SIGNAL = 1 << 0, 1 << 1

READ = READ_FILE | READ_DIR
READ_EXEC = READ | EXECUTE
WRITE = WRITE_FILE | REMOVE_DIR | REMOVE_FILE | MAKE_DIR | MAKE_REG | MAKE_SYM | MAKE_SOCK | MAKE_FIFO | TRUNCATE
FILE_ONLY = EXECUTE | WRITE_FILE | READ_FILE | TRUNCATE | IOCTL_DEV  # what a rule on a file (not a folder) may hold


class LandlockError(OSError):
    pass


class _RulesetAttr(ctypes.Structure):
    _fields_ = [("handled_access_fs", ctypes.c_uint64), ("handled_access_net", ctypes.c_uint64),
                ("scoped", ctypes.c_uint64)]


class _PathBeneath(ctypes.Structure):
    _pack_ = 1
    _fields_ = [("allowed_access", ctypes.c_uint64), ("parent_fd", ctypes.c_int32)]


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

    def allow_path(self, path: str, access: int) -> bool:
        """Allow ``access`` beneath ``path``; False (and nothing added) when the path does not exist."""
        try:
            pfd = os.open(path, os.O_PATH | os.O_CLOEXEC)
        except OSError:
            return False
        try:
            allowed = access & self.fs
            if not os.path.isdir(path):
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
