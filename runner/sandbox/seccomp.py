"""A seccomp filter for the run process: the kernel surfaces a run has no use for, refused.

Landlock limits what a run may open and where TCP may go; it does not see the rest of the syscall
surface. An attack on the sandbox showed what that leaves: a unix socket made through io_uring (whose
operations seccomp never sees), keystrokes typed into a terminal with ``TIOCSTI``, raw, packet and
netlink sockets, and for a root daemon's runs ``sethostname``, ``clock_settime`` and ``klogctl``. So
the filter, a classic BPF program installed with ``prctl(PR_SET_SECCOMP)`` after ``no_new_privs``
and inherited by every process the run starts, refuses:

- sockets of any family but AF_INET and AF_INET6, and raw IP sockets (EACCES). Landlock (up to ABI 7)
  does not mediate ``connect()`` to a unix socket by its path, so a run with a unix socket could reach
  a Docker socket, a root tmux, D-Bus or the daemon's control socket; netlink and packet sockets talk
  to the kernel's network stack. ``socketpair(AF_UNIX)`` stays (asyncio and multiprocessing use it;
  a pair is connected to itself);
- io_uring (ENOSYS): its operations (socket, connect, openat...) run without passing the filter again;
- ``ioctl`` TIOCSTI and TIOCLINUX (EPERM): both push input into a terminal another process reads;
- what container runtimes' default profiles refuse (EPERM): mounts and roots, new namespaces
  (``unshare``, ``setns``, ``clone`` with a CLONE_NEW* flag), the clocks, the host and domain name,
  the kernel log, modules, kexec, reboot, swap, quotas, accounting, BPF, perf events, userfaultfd,
  the key rings, tracing or reading other processes, file handles, I/O ports, a personality other
  than the default, and a few obsolete calls;
- ``clone3`` (ENOSYS): its flags sit in memory the filter cannot read; glibc falls back to ``clone``
  on ENOSYS, whose flags the filter does read;
- any syscall of another ABI on the same kernel (i386 through ``int 0x80``, x32), with ENOSYS: the
  numbers above are the native ABI's.

Everything else is allowed: this is a deny list over a runtime (Python, its libraries, the programs
``shell`` runs) that needs most of the rest. A syscall added by a later kernel is allowed until it is
listed here. The program is data: ``program()`` builds it with named jump targets, ``install()``
loads it. It reads a syscall's arguments only for the five calls it checks by argument, so the
kernel (5.11+) can work out once per syscall number that the rest are always allowed and skip the
filter for them; a refused call walks a few dozen comparisons, which costs nothing that matters.
"""

from __future__ import annotations

import ctypes
import errno
import platform
import struct

PR_SET_SECCOMP, SECCOMP_MODE_FILTER = 22, 2
RET_ALLOW, RET_ERRNO = 0x7FFF0000, 0x00050000
LD_W_ABS, ALU_AND_K, JEQ_K, JGE_K, JSET_K, RET_K = 0x20, 0x54, 0x15, 0x35, 0x45, 0x06
X32_SYSCALL_BIT = 0x40000000

# struct seccomp_data: int nr; u32 arch; u64 ip; u64 args[6]. On little-endian machines the low half
# of args[i] is at 16 + 8 * i. Every argument checked here is an int or unsigned int in the kernel
# (socket's family and type, ioctl's request, personality's value; clone uses only the low half of
# its flags), so the low half is what the kernel acts on: the high half cannot smuggle a value past.
NR, ARCH = 0, 4


def arg(index: int) -> int:
    return 16 + 8 * index


AF_UNIX, AF_INET, AF_INET6 = 1, 2, 10
SOCK_RAW, SOCK_TYPE_MASK = 3, 0xF  # the type's other bits are SOCK_NONBLOCK and SOCK_CLOEXEC
TIOCSTI, TIOCLINUX = 0x5412, 0x541C
PERSONALITY_DEFAULT, PERSONALITY_QUERY = 0, 0xFFFFFFFF
# TCP Fast Open connects inside sendto/sendmsg, where Landlock's connect rule is not consulted
# (landlock-lsm/linux#41): a run could reach any port its network namespace has.
MSG_FASTOPEN = 0x20000000
# CLONE_NEWNS, NEWCGROUP, NEWUTS, NEWIPC, NEWUSER, NEWPID, NEWNET. CLONE_NEWTIME (0x80) exists for
# unshare and clone3 only: in clone's flags that byte is the exit signal, and no signal is >= 0x80,
# so refusing the bit costs nothing.
CLONE_NEW_ANY = 0x00020000 | 0x02000000 | 0x04000000 | 0x08000000 | 0x10000000 | 0x20000000 | 0x40000000 | 0x80

AUDIT_ARCH = {"x86_64": 0xC000003E, "aarch64": 0xC00000B7}

# Syscall numbers as (x86_64, aarch64), from the kernel's tables (x86_64: asm/unistd_64.h; aarch64:
# the generic asm-generic/unistd.h). None: the architecture has no such call.
NUMBERS: dict[str, tuple[int | None, int | None]] = {
    # checked by their arguments
    "socket": (41, 198), "socketpair": (53, 199), "ioctl": (16, 29), "clone": (56, 220), "personality": (135, 92),
    "sendto": (44, 206), "sendmsg": (46, 211), "sendmmsg": (307, 269),
    # refused with ENOSYS, as if this kernel had none
    "clone3": (435, 435), "io_uring_setup": (425, 425), "io_uring_enter": (426, 426), "io_uring_register": (427, 427),
    # mounts and roots
    "mount": (165, 40), "umount2": (166, 39), "pivot_root": (155, 41), "chroot": (161, 51),
    "mount_setattr": (442, 442), "open_tree": (428, 428), "open_tree_attr": (467, 467), "move_mount": (429, 429),
    "fsopen": (430, 430), "fsconfig": (431, 431), "fsmount": (432, 432), "fspick": (433, 433),
    # namespaces (clone's flags are checked apart)
    "unshare": (272, 97), "setns": (308, 268),
    # the machine: its name, clocks, power, swap, modules, kexec, quotas, accounting, terminals, ports
    "sethostname": (170, 161), "setdomainname": (171, 162),
    "clock_settime": (227, 112), "clock_adjtime": (305, 266), "settimeofday": (164, 170), "adjtimex": (159, 171),
    "reboot": (169, 142), "swapon": (167, 224), "swapoff": (168, 225),
    "init_module": (175, 105), "finit_module": (313, 273), "delete_module": (176, 106),
    "kexec_load": (246, 104), "kexec_file_load": (320, 294),
    "quotactl": (179, 60), "quotactl_fd": (443, 443), "acct": (163, 89), "vhangup": (153, 58),
    "iopl": (172, None), "ioperm": (173, None),
    # the kernel's other surfaces: its log, BPF, perf events, page-fault handling, key rings, fanotify
    "syslog": (103, 116), "bpf": (321, 280), "perf_event_open": (298, 241), "userfaultfd": (323, 282),
    "keyctl": (250, 219), "add_key": (248, 217), "request_key": (249, 218), "fanotify_init": (300, 262),
    "lookup_dcookie": (212, 18),
    # other processes: tracing them, reading or writing their memory, taking their files
    "ptrace": (101, 117), "process_vm_readv": (310, 270), "process_vm_writev": (311, 271),
    "pidfd_getfd": (438, 438), "kcmp": (312, 272),
    # files by handle, which skips the path walk (and so Landlock's view of paths)
    "open_by_handle_at": (304, 265), "name_to_handle_at": (303, 264),
    # obsolete, with no use left but an attack surface
    "uselib": (134, None), "ustat": (136, None), "sysfs": (139, None), "_sysctl": (156, None),
    "nfsservctl": (180, 42),
}
CHECKED = ("socket", "socketpair", "ioctl", "clone", "personality", "sendto", "sendmsg", "sendmmsg")
ABSENT = ("clone3", "io_uring_setup", "io_uring_enter", "io_uring_register")
REFUSED = tuple(name for name in NUMBERS if name not in CHECKED + ABSENT)

Row = tuple[int, int, int, int]


class _Filter(ctypes.Structure):
    _fields_ = [("code", ctypes.c_uint16), ("jt", ctypes.c_uint8), ("jf", ctypes.c_uint8), ("k", ctypes.c_uint32)]


class _Program(ctypes.Structure):
    _fields_ = [("len", ctypes.c_uint16), ("filter", ctypes.POINTER(_Filter))]


def supported() -> bool:
    return platform.machine() in AUDIT_ARCH


def describe() -> str:
    """What the filter refuses, in one line, for the run's record and the daemon's report."""
    return ("native ABI only; sockets AF_INET/AF_INET6 only, not raw (socketpair AF_UNIX only); no io_uring; "
            "no TIOCSTI/TIOCLINUX; no TCP Fast Open sends; no new namespaces (unshare, setns, clone CLONE_NEW*, "
            "clone3); no mount, clock, hostname, kernel log, module, kexec, reboot, swap, BPF, perf, userfaultfd, "
            "keyring, ptrace, process_vm, file-handle or personality change syscalls")


def numbers(machine: str, names: tuple[str, ...]) -> list[int]:
    """The numbers of ``names`` on ``machine``, leaving out the calls it does not have."""
    column = 0 if machine == "x86_64" else 1
    return [nr for nr in (NUMBERS[name][column] for name in names) if nr is not None]


def program(machine: str | None = None) -> list[Row]:
    """The filter as (code, jt, jf, k) rows for ``machine`` (this one by default)."""
    machine = machine or platform.machine()
    nr = dict(zip(CHECKED, numbers(machine, CHECKED), strict=True))
    deny_socket, eperm, enosys = RET_ERRNO | errno.EACCES, RET_ERRNO | errno.EPERM, RET_ERRNO | errno.ENOSYS
    a = Assembler()
    a.load(ARCH)
    a.jump(JEQ_K, AUDIT_ARCH[machine], false="enosys")  # another ABI: its numbers mean other calls
    a.load(NR)
    a.jump(JGE_K, X32_SYSCALL_BIT, true="enosys")  # x32 shares x86_64's arch value; never set on aarch64
    for name in CHECKED:
        a.jump(JEQ_K, nr[name], true=name)
    for number in numbers(machine, ABSENT):
        a.jump(JEQ_K, number, true="enosys")
    for number in numbers(machine, REFUSED):
        a.jump(JEQ_K, number, true="eperm")
    a.ret(RET_ALLOW)

    a.label("socket")  # socket(family, type, protocol)
    a.load(arg(0))
    a.jump(JEQ_K, AF_INET, true="inet")
    a.jump(JEQ_K, AF_INET6, true="inet", false="deny_socket")
    a.label("inet")  # raw IP needs CAP_NET_RAW too; refused here for a run that still has it
    a.load(arg(1))
    a.alu(ALU_AND_K, SOCK_TYPE_MASK)
    a.jump(JEQ_K, SOCK_RAW, true="deny_socket", false="allow")

    a.label("socketpair")  # socketpair(family, type, protocol, fds)
    a.load(arg(0))
    a.jump(JEQ_K, AF_UNIX, true="allow", false="deny_socket")

    a.label("ioctl")  # ioctl(fd, request, argp)
    a.load(arg(1))
    a.jump(JEQ_K, TIOCSTI, true="eperm")
    a.jump(JEQ_K, TIOCLINUX, true="eperm", false="allow")

    a.label("clone")  # flags are args[0] on both x86_64 and aarch64 (they differ in the tid and tls order)
    a.load(arg(0))
    a.jump(JSET_K, CLONE_NEW_ANY, true="eperm", false="allow")

    a.label("personality")  # ADDR_NO_RANDOMIZE, READ_IMPLIES_EXEC and the like weaken what is exec'd
    a.load(arg(0))
    a.jump(JEQ_K, PERSONALITY_DEFAULT, true="allow")
    a.jump(JEQ_K, PERSONALITY_QUERY, true="allow", false="eperm")

    a.label("sendto")  # sendto(fd, buf, len, flags, addr, addrlen); sendmmsg(fd, vec, n, flags)
    a.label("sendmmsg")
    a.load(arg(3))
    a.jump(JSET_K, MSG_FASTOPEN, true="eperm", false="allow")
    a.label("sendmsg")  # sendmsg(fd, msg, flags)
    a.load(arg(2))
    a.jump(JSET_K, MSG_FASTOPEN, true="eperm", false="allow")

    a.label("allow")
    a.ret(RET_ALLOW)
    a.label("deny_socket")
    a.ret(deny_socket)
    a.label("eperm")
    a.ret(eperm)
    a.label("enosys")
    a.ret(enosys)
    return a.build()


def install() -> bool:
    """Install the filter on this thread (and what it starts); False where it cannot be. The caller
    has set no_new_privs (or holds CAP_SYS_ADMIN), as the kernel requires."""
    if not supported() or struct.pack("=I", 1)[0] != 1:  # the argument offsets above are little-endian's
        return False
    rows = program()
    filters = (_Filter * len(rows))(*[_Filter(*row) for row in rows])
    prog = _Program(len(rows), ctypes.cast(filters, ctypes.POINTER(_Filter)))
    libc = ctypes.CDLL(None, use_errno=True)
    return bool(libc.prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog), 0, 0) == 0)


# A helper process of the daemon (the workflow expressions' worker) also makes no process and no socket at all,
# on top of the runs' filter: x86_64 and aarch64 numbers (aarch64 has no fork or vfork).
HELPER_REFUSED: dict[str, tuple[int | None, int | None]] = {
    "socket": (41, 198), "socketpair": (53, 199), "fork": (57, None), "vfork": (58, None), "clone": (56, 220),
    "clone3": (435, 435), "execve": (59, 221), "execveat": (322, 281), "setsid": (112, 157), "setpgid": (109, 154),
}


def install_helper() -> bool:
    """Stack the helper's filter (``HELPER_REFUSED``: EPERM) on what this process has; False where it cannot be."""
    machine = platform.machine()
    if not supported():
        return False
    column = 0 if machine == "x86_64" else 1
    a = Assembler()
    a.load(ARCH)
    a.jump(JEQ_K, AUDIT_ARCH[machine], false="deny")
    a.load(NR)
    for nr in (numbers[column] for numbers in HELPER_REFUSED.values()):
        if nr is not None:
            a.jump(JEQ_K, nr, true="deny")
    a.ret(RET_ALLOW)
    a.label("deny")
    a.ret(RET_ERRNO | errno.EPERM)
    rows = a.build()
    filters = (_Filter * len(rows))(*[_Filter(*row) for row in rows])
    prog = _Program(len(rows), ctypes.cast(filters, ctypes.POINTER(_Filter)))
    return bool(ctypes.CDLL(None, use_errno=True).prctl(PR_SET_SECCOMP, SECCOMP_MODE_FILTER, ctypes.byref(prog),
                                                        0, 0) == 0)


class Assembler:
    """Classic BPF with named jump targets. A jump names the label it goes to (None: the next row);
    ``build`` turns names into the forward offsets the kernel wants (0 to 255 rows, never backwards),
    so no offset is counted by hand and a list that grows cannot silently jump to the wrong row."""

    def __init__(self) -> None:
        self._rows: list[tuple[int, str | None, str | None, int]] = []
        self._labels: dict[str, int] = {}

    def label(self, name: str) -> None:
        if name in self._labels:
            raise ValueError(f"label {name!r} defined twice")
        self._labels[name] = len(self._rows)

    def load(self, offset: int) -> None:
        """A = the 32-bit word of seccomp_data at ``offset``."""
        self._rows.append((LD_W_ABS, None, None, offset))

    def alu(self, code: int, k: int) -> None:
        self._rows.append((code, None, None, k))

    def jump(self, code: int, k: int, *, true: str | None = None, false: str | None = None) -> None:
        self._rows.append((code, true, false, k))

    def ret(self, value: int) -> None:
        self._rows.append((RET_K, None, None, value))

    def build(self) -> list[Row]:
        return [(code, self._offset(i, jt), self._offset(i, jf), k) for i, (code, jt, jf, k) in enumerate(self._rows)]

    def _offset(self, index: int, target: str | None) -> int:
        if target is None:
            return 0
        if target not in self._labels:
            raise ValueError(f"jump to undefined label {target!r}")
        distance = self._labels[target] - index - 1
        if not 0 <= distance <= 255:
            raise ValueError(f"jump from row {index} to {target!r} is {distance} rows: out of range for classic BPF")
        return distance
