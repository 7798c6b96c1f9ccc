"""The seccomp filter and the capability drop (runner/sandbox/seccomp.py, privileges.py), tried for real.

Each test forks a child that confines itself as the run's process does (capabilities dropped,
no_new_privs, the filter), then makes the calls an attacker would, with real syscalls, and reports
each outcome (0, or the errno) to the parent over a pipe. We are root here, so nothing but these two
layers stands between those calls and the machine: the arguments are harmless should a layer fail (a
mount point that does not exist, a timespec the kernel rejects, a hostname set to itself in a UTS
namespace of the child's own, a process of the child's own to trace). The same calls made by an
unconfined child show that each attempt would work, or fail otherwise, without the layers.
"""

from __future__ import annotations

import asyncio
import ctypes
import errno
import fcntl
import json
import mmap
import os
import platform
import re
import signal
import socket
import sqlite3
import struct
import subprocess
import threading
import traceback
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import pytest

from runner.sandbox import privileges, seccomp

_libc = ctypes.CDLL(None, use_errno=True)
_syscall = _libc.syscall
_syscall.restype = ctypes.c_long
MACHINE = platform.machine()
BOTH = ("capabilities", "seccomp")
AF_NETLINK, AF_PACKET, AF_FAMILIES = 16, 17, range(46)  # AF_MAX is 46 since Linux 5.15 (AF_MCTP is 45)
CLONE_NEW = {"NEWNS": 0x20000, "NEWCGROUP": 0x02000000, "NEWUTS": 0x04000000, "NEWIPC": 0x08000000,
             "NEWUSER": 0x10000000, "NEWPID": 0x20000000, "NEWNET": 0x40000000, "NEWTIME": 0x80}
CLONE_NEWNS, CLONE_NEWUTS, CLONE_NEWUSER, CLONE_NEWNET = (CLONE_NEW[f"NEW{n}"] for n in ("NS", "UTS", "USER", "NET"))
TIOCSTI, TIOCLINUX, TIOCGWINSZ = 0x5412, 0x541C, 0x5413
POISON = (-1,) * 6  # every argument invalid: whatever the call, the kernel alone would refuse it
Confine = Callable[[], None]  # what a child calls once its setup is done


# -- the child and its confinement ------------------------------------------------------------------

def in_child(attempts: Callable[[Confine], dict[str, Any]], layers: tuple[str, ...] = BOTH) -> dict[str, Any]:
    """Run ``attempts(confine)`` in a forked child, its own session leader (so no controlling terminal:
    vhangup and TIOCSTI can reach nobody else's). It calls ``confine`` once its setup is done."""
    reader, writer = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(reader)
        try:
            os.setsid()
            outcome: dict[str, Any] = {"results": attempts(lambda: confine(layers))}
        except BaseException:
            outcome = {"error": traceback.format_exc()}
        with os.fdopen(writer, "wb") as out:
            out.write(json.dumps(outcome).encode())
        os._exit(0)
    os.close(writer)
    with os.fdopen(reader, "rb") as stream:
        data = stream.read()
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0 and data, f"child ended with status {status}"
    outcome = json.loads(data)
    assert "error" not in outcome, outcome["error"]
    return dict(outcome["results"])


def confine(layers: tuple[str, ...]) -> None:
    if "capabilities" in layers:
        privileges.drop_capabilities()
    assert _libc.prctl(38, *(ctypes.c_ulong(v) for v in (1, 0, 0, 0))) == 0  # PR_SET_NO_NEW_PRIVS
    if "seccomp" in layers:
        assert seccomp.install()


def number(name: str) -> int | None:
    return seccomp.NUMBERS[name][0 if MACHINE == "x86_64" else 1]


def call(name: str | int, *args: Any) -> int:
    """The syscall ``name`` of this machine (or that number); 0 when it succeeded, else its errno."""
    ctypes.set_errno(0)
    converted = [ctypes.c_long(a) if isinstance(a, int) else a for a in args]  # buffers and bytes: pointers
    nr = name if isinstance(name, int) else number(name) or -1
    return ctypes.get_errno() if _syscall(ctypes.c_long(nr), *converted) == -1 else 0


def make_socket(family: int, kind: int, protocol: int = 0, *, pair: bool = False) -> int:
    """A socket made is left open: the child exits soon."""
    return call("socketpair", family, kind, protocol, (ctypes.c_int * 2)()) if pair else call(
        "socket", family, kind, protocol)


def fastopen() -> int:
    """A TCP Fast Open send to a closed port on this machine: the connect inside it is Landlock's blind spot."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    target = (ctypes.c_ubyte * 16)(2, 0, 0, 1, 127, 0, 0, 1)  # sockaddr_in: AF_INET, port 1, 127.0.0.1
    return call("sendto", sock.fileno(), b"x", 1, 0x20000000, target, 16)


def ioctl(fd: int, request: int, argument: bytes) -> int:
    try:
        return fcntl.ioctl(fd, request, argument) and 0
    except OSError as error:
        return error.errno or -1


def clone(flags: int) -> int:
    """clone(flags | SIGCHLD) as a raw syscall: a new process, which exits at once."""
    ctypes.set_errno(0)
    pid = _syscall(ctypes.c_long(number("clone") or -1), ctypes.c_long(flags | signal.SIGCHLD),
                   *(ctypes.c_long(0) for _ in range(4)))
    if pid == 0:
        os._exit(0)
    return os.waitpid(pid, 0) and 0 if pid > 0 else ctypes.get_errno()


def i386_getpid() -> int:
    """getpid through int 0x80 (the i386 ABI), in a grandchild: 0 when it answered, else its errno (a
    kernel without IA-32 emulation answers with SIGSEGV: refused as well)."""
    pid = os.fork()
    if pid == 0:
        code = mmap.mmap(-1, mmap.PAGESIZE, prot=mmap.PROT_READ | mmap.PROT_WRITE | mmap.PROT_EXEC)
        code.write(bytes([0xB8, 20, 0, 0, 0, 0xCD, 0x80, 0xC3]))  # mov eax, 20 (getpid); int 0x80; ret
        answer = ctypes.CFUNCTYPE(ctypes.c_int)(ctypes.addressof(ctypes.c_char.from_buffer(code)))()
        os._exit(0 if answer == os.getpid() else min(-answer, 255) if answer < 0 else 255)
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status) if os.WIFEXITED(status) else errno.ENOSYS


def attacks(confine: Confine) -> dict[str, int]:
    """What the attack on the sandbox tried, and its neighbours."""
    _master, terminal = os.openpty()
    target = subprocess.Popen(["/bin/cat"], stdin=subprocess.PIPE)  # a process of our own to trace
    assert _libc.unshare(CLONE_NEWUTS) == 0  # sethostname below could change only this namespace's name
    hostname = socket.gethostname().encode()
    params, log = ctypes.create_string_buffer(120), ctypes.create_string_buffer(4096)
    bpf_attr = ctypes.create_string_buffer(struct.pack("=4I", 2, 4, 4, 1), 64)  # an array map, one entry
    perf_attr = ctypes.create_string_buffer(struct.pack("=IIQ", 1, 64, 0), 64)  # software CPU clock
    invalid_time = ctypes.create_string_buffer(struct.pack("=qq", 0, 2_000_000_000))  # tv_nsec out of range
    confine()
    results = {
        "io_uring_setup": call("io_uring_setup", 8, params),
        "socket AF_UNIX": make_socket(socket.AF_UNIX, socket.SOCK_STREAM),
        "socket AF_NETLINK": make_socket(AF_NETLINK, socket.SOCK_RAW),
        "socket AF_PACKET": make_socket(AF_PACKET, socket.SOCK_RAW),
        "socket AF_INET raw": make_socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
        "ioctl TIOCSTI": ioctl(terminal, TIOCSTI, b"x"),
        "ioctl TIOCLINUX": ioctl(terminal, TIOCLINUX, b"\x00"),
        "sethostname": call("sethostname", ctypes.c_char_p(hostname), len(hostname)),
        "clock_settime": call("clock_settime", 0, invalid_time),
        "syslog READ_ALL": call("syslog", 3, log, len(log)),
        "mount": call("mount", ctypes.c_char_p(b"none"), ctypes.c_char_p(b"/nonexistent/agent-orch"),
                      ctypes.c_char_p(b"tmpfs"), 0, None),
        "ptrace ATTACH": call("ptrace", 16, target.pid, 0, 0),
        "keyctl": call("keyctl", 0, -3, 0),  # KEYCTL_GET_KEYRING_ID of the session keyring
        "bpf": call("bpf", 0, bpf_attr, 64),
        "perf_event_open": call("perf_event_open", perf_attr, 0, -1, -1, 0),
        "userfaultfd": call("userfaultfd", os.O_CLOEXEC),
        "personality ADDR_NO_RANDOMIZE": call("personality", 0x0040000),
        "clone CLONE_NEWNS": clone(CLONE_NEWNS),
        "sendto MSG_FASTOPEN": fastopen(),
        "unshare CLONE_NEWUSER": call("unshare", CLONE_NEWUSER),  # last: the rest ran in our user namespace
    }
    if MACHINE == "x86_64":
        results["i386 getpid"] = i386_getpid()
        results["x32 socket"] = call(seccomp.X32_SYSCALL_BIT | 41, socket.AF_UNIX, socket.SOCK_STREAM, 0)
    target.kill()
    target.wait()
    return results


REFUSED_WITH = {"io_uring_setup": errno.ENOSYS, "socket AF_UNIX": errno.EACCES, "socket AF_NETLINK": errno.EACCES,
                "socket AF_PACKET": errno.EACCES, "socket AF_INET raw": errno.EACCES, "i386 getpid": errno.ENOSYS,
                "x32 socket": errno.ENOSYS}
# Without the layers, as root, these work; the others fail otherwise (EINVAL, ENOENT, ENOTTY, or no x32).
WORK_UNCONFINED = {"io_uring_setup", "socket AF_UNIX", "socket AF_NETLINK", "socket AF_PACKET", "socket AF_INET raw",
                   "ioctl TIOCSTI", "sethostname", "syslog READ_ALL", "ptrace ATTACH", "keyctl", "bpf",
                   "perf_event_open", "userfaultfd", "personality ADDR_NO_RANDOMIZE", "clone CLONE_NEWNS",
                   "unshare CLONE_NEWUSER", "i386 getpid"}


# -- the attack, refused ------------------------------------------------------------------------------

@pytest.mark.parametrize("layers", [BOTH, ("seccomp",)], ids=["both layers", "the filter alone"])
def test_each_attack_is_refused(layers: tuple[str, ...]) -> None:
    """Under both layers as the run will be, and under the filter alone (a root run that kept every
    capability): the filter's own answers, since it sees each call first."""
    refused = in_child(attacks, layers)
    assert refused == {name: REFUSED_WITH.get(name, errno.EPERM) for name in refused}


def test_unconfined_each_attack_gets_through_or_fails_otherwise() -> None:
    """The control, as root: so a refusal above is the layers' doing, not the call's."""
    unconfined = in_child(attacks, layers=())
    assert {name for name, result in unconfined.items() if result == 0} == WORK_UNCONFINED & set(unconfined)
    # this kernel has no x32 ABI: its answer and the filter's are the same ENOSYS
    assert all(result != REFUSED_WITH.get(name, errno.EPERM) for name, result in unconfined.items()
               if name != "x32 socket")


def test_every_socket_family_but_inet_is_refused() -> None:
    def attempts(confine: Confine) -> dict[str, int]:
        confine()
        kinds = {"stream": socket.SOCK_STREAM, "dgram": socket.SOCK_DGRAM, "raw": socket.SOCK_RAW,
                 "seqpacket": socket.SOCK_SEQPACKET, "stream|nonblock": socket.SOCK_STREAM | socket.SOCK_NONBLOCK}
        results = {f"{family} {kind}": make_socket(family, number) for family in AF_FAMILIES
                   for kind, number in kinds.items()}
        # The kernel reads the family and the type as ints: bits above them must not slip a value past.
        results["unix, high bits set"] = make_socket((1 << 32) | socket.AF_UNIX, socket.SOCK_STREAM)
        results["inet raw, high bits set"] = make_socket(socket.AF_INET, (1 << 32) | socket.SOCK_RAW)
        for family in AF_FAMILIES:
            results[f"pair {family}"] = make_socket(family, socket.SOCK_STREAM, pair=True)
        return results

    results = in_child(attempts, layers=("seccomp",))  # root with every capability: only the filter
    inet = {f"{family} {kind}" for family in (2, 10) for kind in ("stream", "dgram", "stream|nonblock")}
    del results["2 seqpacket"], results["10 seqpacket"]  # SCTP: there or not, depending on the kernel
    assert results == {name: 0 if name in inet | {"pair 1"} else errno.EACCES for name in results}


def test_every_listed_syscall_and_namespace_flag_is_refused() -> None:
    """Every refused number of this machine, called with invalid arguments (so nothing would happen
    without the filter either): the filter's answer, not the kernel's. And clone with each CLONE_NEW*."""
    def attempts(confine: Confine) -> dict[str, int]:
        confine()
        results = {name: call(name, *POISON) for name in seccomp.REFUSED + seccomp.ABSENT if number(name)}
        results.update({f"clone {name}": clone(flag) for name, flag in CLONE_NEW.items()})
        results["ioctl TIOCSTI, high bits set"] = call("ioctl", 0, (1 << 32) | TIOCSTI, 0)
        return results

    results = in_child(attempts, layers=("seccomp",))
    expected = {name: errno.ENOSYS if name in seccomp.ABSENT else errno.EPERM for name in results}
    assert results == expected


# -- what still works ---------------------------------------------------------------------------------

def test_a_confined_child_still_does_what_runs_do() -> None:
    def attempts(confine: Confine) -> dict[str, Any]:
        _master, terminal = os.openpty()
        confine()
        import duckdb
        import httpx
        import numpy
        from langchain_core.messages import HumanMessage

        results: dict[str, Any] = {"personality query": call("personality", 0xFFFFFFFF)}
        left, right = socket.socketpair()
        left.sendall(b"pair")
        results["socketpair"] = right.recv(4).decode()
        box: list[int] = []
        thread = threading.Thread(target=lambda: box.append(threading.get_native_id()))
        thread.start()
        thread.join()
        results["thread"] = len(box)
        results["subprocess"] = subprocess.run(["/bin/true"], check=False).returncode
        pid = os.fork()
        if pid == 0:
            os._exit(7)
        results["fork"] = os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1])
        results["tcp"] = _tcp_echo()
        results["http"] = _http_get(httpx)
        results["sqlite"] = sqlite3.connect(":memory:").execute("select 1").fetchone()[0]
        results["duckdb"] = duckdb.connect().execute("select 1").fetchone()[0]  # type: ignore[index]
        results["numpy"] = int(numpy.arange(5).sum())
        results["langchain"] = HumanMessage(content="hi").content
        results["asyncio"] = asyncio.run(_asyncio_pair())
        results["ioctl TIOCGWINSZ"] = ioctl(terminal, TIOCGWINSZ, bytes(8))
        results["getaddrinfo"] = socket.getaddrinfo("localhost", 80, flags=socket.AI_ADDRCONFIG)[0][4][0]
        return results

    assert in_child(attempts) == {
        "personality query": 0, "socketpair": "pair", "thread": 1, "subprocess": 0, "fork": 7, "tcp": "ping",
        "http": 200, "sqlite": 1, "duckdb": 1, "numpy": 10, "langchain": "hi", "asyncio": "ping",
        "ioctl TIOCGWINSZ": 0, "getaddrinfo": "127.0.0.1"}


def _tcp_echo() -> str:
    with socket.create_server(("127.0.0.1", 0)) as server, socket.create_connection(server.getsockname()) as client:
        peer, _ = server.accept()
        client.sendall(b"ping")
        return peer.recv(4).decode()


def _http_get(httpx: Any) -> int:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(200)
            self.end_headers()

    with HTTPServer(("127.0.0.1", 0), Handler) as server:
        serving = threading.Thread(target=server.handle_request)
        serving.start()
        with httpx.Client(trust_env=False) as client:
            status = int(client.get(f"http://127.0.0.1:{server.server_port}/").status_code)
        serving.join()
    return status


async def _asyncio_pair() -> str:
    left, right = socket.socketpair()
    reader, writer = await asyncio.open_connection(sock=left)
    right.sendall(b"ping")
    data = await reader.readexactly(4)
    writer.close()
    right.close()
    return data.decode()


# -- capabilities ---------------------------------------------------------------------------------------

def test_root_drops_every_capability_and_cannot_regain_them_by_exec() -> None:
    def attempts(confine: Confine) -> dict[str, Any]:
        assert _libc.unshare(CLONE_NEWUTS) == 0
        record = privileges.drop_capabilities()
        exec_status = subprocess.run(["/bin/cat", "/proc/self/status"], capture_output=True, text=True).stdout
        hostname = socket.gethostname().encode()
        return {"record": record, "held": privileges.current(),
                "exec": re.findall(r"^(Cap\w+):\s+(\w+)", exec_status, re.M),
                "unlock securebits": _libc.prctl(28, ctypes.c_ulong(0), *(ctypes.c_ulong(0) for _ in range(3))),
                "raw socket": make_socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_ICMP),
                "packet socket": make_socket(AF_PACKET, socket.SOCK_RAW),
                "sethostname": call("sethostname", ctypes.c_char_p(hostname), len(hostname)),
                "unshare CLONE_NEWNET": call("unshare", CLONE_NEWNET), "chroot": call("chroot", b"/")}

    result = in_child(attempts, layers=())
    assert {result["record"][s] for s in privileges.SETS.values()} == {"empty"} and result["record"]["no_new_privs"]
    assert {result["held"][s] for s in privileges.SETS.values()} == {0} and result["held"]["no_new_privs"] == 1
    assert dict(result["exec"]) == dict.fromkeys(privileges.SETS, "0" * 16)
    if os.geteuid() == 0:  # root held CAP_SETPCAP: the securebits are locked, and stay so
        assert result["held"]["securebits"] == privileges.LOCKED_SECUREBITS
        assert result["record"]["securebits"].endswith("locked")
        assert result["unlock securebits"] == -1
    refused = ("raw socket", "packet socket", "sethostname", "unshare CLONE_NEWNET", "chroot")
    assert {result[k] for k in refused} == {errno.EPERM}


def test_in_a_user_namespace_every_capability_is_dropped() -> None:
    def attempts(confine: Confine) -> dict[str, Any]:
        uid, gid = os.getuid(), os.getgid()
        assert _libc.unshare(CLONE_NEWUSER) == 0
        for name, text in (("setgroups", "deny"), ("uid_map", f"0 {uid} 1"), ("gid_map", f"0 {gid} 1")):
            Path(f"/proc/self/{name}").write_text(text)
        return {"before": privileges.current(), "record": privileges.drop_capabilities(), "after": privileges.current(),
                "unshare CLONE_NEWNET": call("unshare", CLONE_NEWNET)}

    result = in_child(attempts, layers=())
    assert result["before"]["effective"] != 0  # all of them, within the namespace
    assert all(result["after"][s] == 0 for s in privileges.SETS.values())
    assert result["record"]["bounding"] == "empty" and result["record"]["securebits"].endswith("locked")
    assert result["unshare CLONE_NEWNET"] == errno.EPERM


def test_for_an_unprivileged_process_it_changes_nothing_and_says_so() -> None:
    def attempts(confine: Confine) -> dict[str, Any]:
        if os.geteuid() == 0:
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
        return {"before": privileges.current(), "record": privileges.drop_capabilities(), "after": privileges.current()}

    result = in_child(attempts, layers=())
    assert result["before"]["effective"] == 0 and result["after"]["effective"] == 0
    assert result["after"]["bounding"] == result["before"]["bounding"]
    assert result["record"]["effective"] == "empty" and result["record"]["no_new_privs"] is True
    assert result["record"]["securebits"].startswith("unchanged")
    if result["before"]["bounding"]:
        assert "kept: Operation not permitted" in result["record"]["bounding"]


# -- the program as data ----------------------------------------------------------------------------------

def run_filter(rows: list[seccomp.Row], arch: int, nr: int, *args: int) -> int:
    """The kernel's classic BPF, for the five instructions the filter uses, over a seccomp_data."""
    data = struct.pack("<iIQ6Q", nr, arch, 0, *[a & (2**64 - 1) for a in (*args, 0, 0, 0, 0, 0, 0)][:6])
    a = pc = 0
    while True:
        code, jt, jf, k = rows[pc]
        pc += 1
        if code == seccomp.LD_W_ABS:
            a = struct.unpack_from("<I", data, k)[0]
        elif code == seccomp.ALU_AND_K:
            a &= k
        elif code == seccomp.RET_K:
            return k
        else:
            taken = {seccomp.JEQ_K: a == k, seccomp.JGE_K: a >= k, seccomp.JSET_K: bool(a & k)}[code]
            pc += jt if taken else jf


@pytest.mark.parametrize("machine", ["x86_64", "aarch64"])
def test_the_program_for_each_machine_decides_as_described(machine: str) -> None:
    """Both machines' programs, run by an interpreter of classic BPF: aarch64's cannot be loaded here."""
    rows, arch, column = seccomp.program(machine), seccomp.AUDIT_ARCH[machine], 0 if machine == "x86_64" else 1
    nr = {name: numbers[column] for name, numbers in seccomp.NUMBERS.items() if numbers[column] is not None}
    allow, eperm = seccomp.RET_ALLOW, seccomp.RET_ERRNO | errno.EPERM
    eacces, enosys = seccomp.RET_ERRNO | errno.EACCES, seccomp.RET_ERRNO | errno.ENOSYS

    def verdict(name: str, *args: int) -> int:
        return run_filter(rows, arch, nr[name], *args)

    assert {name: verdict(name) for name in seccomp.REFUSED if name in nr} == dict.fromkeys(
        (n for n in seccomp.REFUSED if n in nr), eperm)
    assert {verdict(name) for name in seccomp.ABSENT} == {enosys}
    assert [verdict("socket", family, 1) for family in (1, 2, 10, 16, 17, (1 << 32) | 1)] == [
        eacces, allow, allow, eacces, eacces, eacces]
    assert verdict("socket", 2, 3) == eacces and verdict("socket", 10, 3 | 0o4000) == eacces
    assert [verdict("socketpair", family, 1) for family in (1, 2)] == [allow, eacces]
    assert [verdict("ioctl", 0, request) for request in (TIOCSTI, TIOCLINUX, (7 << 32) | TIOCSTI, 0x5413)] == [
        eperm, eperm, eperm, allow]
    assert {verdict("clone", flag | 17) for flag in CLONE_NEW.values()} == {eperm}
    assert verdict("clone", 0x3D0F00) == allow  # what pthread_create passes (CLONE_VM | ... | CLONE_THREAD)
    assert [verdict("personality", p) for p in (0, 0xFFFFFFFF, 0x0040000)] == [allow, allow, eperm]
    fastopen = seccomp.MSG_FASTOPEN  # a connect Landlock's rule does not see
    assert [verdict("sendto", 3, 0, 0, fastopen | 0x40), verdict("sendto", 3, 0, 0, 0x40)] == [eperm, allow]
    assert [verdict("sendmsg", 3, 0, fastopen), verdict("sendmsg", 3, 0, 0)] == [eperm, allow]
    assert [verdict("sendmmsg", 3, 0, 1, fastopen), verdict("sendmmsg", 3, 0, 1, 0)] == [eperm, allow]
    read, i386 = (0 if machine == "x86_64" else 63), 0x40000003
    assert run_filter(rows, arch, read) == allow
    assert run_filter(rows, i386, read) == enosys and run_filter(rows, arch, 0x40000000 | read) == enosys


@pytest.mark.parametrize("machine, header", [
    ("x86_64", "/usr/include/x86_64-linux-gnu/asm/unistd_64.h"), ("aarch64", "/usr/include/asm-generic/unistd.h")])
def test_syscall_numbers_match_the_kernel_headers(machine: str, header: str) -> None:
    """The table against the kernel's own (linux-libc-dev); calls newer than those headers are left out."""
    text = Path(header).read_text()
    defined = {m[0]: int(m[1]) for m in re.findall(r"^#define __NR_(\w+)\s+(\d+)", text, re.M)}
    column = 0 if machine == "x86_64" else 1
    ours = {name: numbers[column] for name, numbers in seccomp.NUMBERS.items()}
    assert {name: nr for name, nr in ours.items() if name in defined} == {
        name: defined[name] for name in ours if name in defined}
    assert {name for name, nr in ours.items() if nr is None} == {name for name in ours if name not in defined} - {
        "open_tree_attr"}


def test_assembler_refuses_what_the_kernel_would() -> None:
    far, nowhere = seccomp.Assembler(), seccomp.Assembler()
    far.jump(seccomp.JEQ_K, 0, true="end")
    for _ in range(256):
        far.ret(seccomp.RET_ALLOW)
    far.label("end")
    nowhere.jump(seccomp.JEQ_K, 0, true="end")
    with pytest.raises(ValueError, match="out of range"):
        far.build()
    with pytest.raises(ValueError, match="undefined"):
        nowhere.build()
