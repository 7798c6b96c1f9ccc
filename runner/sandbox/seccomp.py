"""A seccomp filter for the run process: no unix sockets of its own making, no foreign syscall ABIs.

Landlock (up to ABI 7) does not mediate ``connect()`` to a unix socket by its path, so a run could
reach any socket it can name as its user: a Docker or containerd socket, a root tmux, D-Bus, the
daemon's own control socket. The filter refuses ``socket(AF_UNIX, ...)`` with EACCES, so there is
nothing to connect with. ``socketpair()`` (asyncio, multiprocessing) is a different call and stays
allowed: a pair is connected to itself. Syscalls of another ABI on the same kernel (i386 through
``int 0x80``, x32) are refused, since the filter reads syscall numbers of the native ABI only.

A classic BPF program of ten instructions, installed with ``prctl(PR_SET_SECCOMP)`` after
``no_new_privs``; every process the run starts inherits it.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct

PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
RET_ALLOW, RET_ERRNO = 0x7FFF0000, 0x00050000
LD_W_ABS, JEQ_K, JGE_K, RET_K = 0x20, 0x15, 0x35, 0x06
AF_UNIX, X32_SYSCALL_BIT = 1, 0x40000000
ARCHES = {"x86_64": (0xC000003E, 41), "aarch64": (0xC00000B7, 198)}  # AUDIT_ARCH_*, __NR_socket


class _Filter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_Filter))]


def supported() -> bool:
    return platform.machine() in ARCHES


def program() -> list[tuple[int, int, int, int]]:
    arch, socket_nr = ARCHES[platform.machine()]
    deny_unix, foreign = RET_ERRNO | errno.EACCES, RET_ERRNO | errno.ENOSYS
    return [
        (LD_W_ABS, 0, 0, 4),                 # 0: A = seccomp_data.arch
        (JEQ_K, 1, 0, arch),                 # 1: native ABI? to 3, else 2
        (RET_K, 0, 0, foreign),              # 2
        (LD_W_ABS, 0, 0, 0),                 # 3: A = seccomp_data.nr
        (JGE_K, 3, 0, X32_SYSCALL_BIT),      # 4: x32? to 8
        (JEQ_K, 0, 3, socket_nr),            # 5: socket()? to 6, else 9
        (LD_W_ABS, 0, 0, 16),                # 6: A = low half of args[0], the domain
        (JEQ_K, 0, 1, AF_UNIX),              # 7: AF_UNIX? to 8, else 9
        (RET_K, 0, 0, deny_unix),            # 8
        (RET_K, 0, 0, RET_ALLOW),            # 9
    ]


def install() -> bool:
    """Install the filter on this thread (and what it starts); False where it cannot be."""
    if not supported() or struct.pack("=I", 1)[0] != 1:  # args[0]'s low half is at offset 16 on little-endian
        return False
    rows = program()
    filters = (_Filter * len(rows))(*[_Filter(*row) for row in rows])
    prog = _Program(len(rows), ctypes.cast(filters, ctypes.POINTER(_Filter)))
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) == 0)
