"""Drop every capability of the calling process for good, so a run of a root daemon holds no privilege.

A daemon running as root starts its runs as root: uid 0 with every capability, which lets a run set
the clock, load a module or open a raw socket whatever its files say. Inside a user namespace a run
has every capability of that namespace. ``drop_capabilities`` empties all five capability sets and
locks the door behind them, in this order (each step needs what the next one takes away):

1. securebits (CAP_SETPCAP): SECBIT_NOROOT, so exec'ing anything as uid 0 grants no capability;
   SECBIT_NO_SETUID_FIXUP, so changing uid does not touch the (empty) sets; SECBIT_KEEP_CAPS off and
   SECBIT_NO_CAP_AMBIENT_RAISE on; all of them locked, so no later call undoes them;
2. the bounding set (CAP_SETPCAP), one capability at a time up to /proc/sys/kernel/cap_last_cap: the
   limit on what any later exec could gain, from a setuid-root or file-capability program alike;
3. the ambient set (no privilege needed), which exec would otherwise carry over;
4. effective, permitted and inheritable with ``capset`` (lowering needs no privilege);
5. no_new_privs, so exec never raises privileges again (setuid bits and file capabilities ignored).

For an unprivileged process there is nothing to drop: steps 1 and 2 fail with EPERM and are
recorded as such, and its bounding set, though full, can never be used: no capability can reach the
permitted set without an exec that no_new_privs makes inert. Capabilities and securebits belong to a
thread: call this while the process has one thread (as the run's process does before its agent
starts), and every thread and process it starts after inherits the result.
"""

from __future__ import annotations

import ctypes
import errno
import os
from typing import Any

PR_CAPBSET_DROP, PR_GET_SECUREBITS, PR_SET_SECUREBITS = 24, 27, 28
PR_SET_NO_NEW_PRIVS, PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL = 38, 47, 4
SECBIT_NOROOT, SECBIT_NOROOT_LOCKED = 1 << 0, 1 << 1
SECBIT_NO_SETUID_FIXUP, SECBIT_NO_SETUID_FIXUP_LOCKED = 1 << 2, 1 << 3
SECBIT_KEEP_CAPS, SECBIT_KEEP_CAPS_LOCKED = 1 << 4, 1 << 5
SECBIT_NO_CAP_AMBIENT_RAISE, SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED = 1 << 6, 1 << 7
LOCKED_SECUREBITS = (SECBIT_NOROOT | SECBIT_NOROOT_LOCKED | SECBIT_NO_SETUID_FIXUP | SECBIT_NO_SETUID_FIXUP_LOCKED
                     | SECBIT_KEEP_CAPS_LOCKED | SECBIT_NO_CAP_AMBIENT_RAISE | SECBIT_NO_CAP_AMBIENT_RAISE_LOCKED)
LINUX_CAPABILITY_VERSION_3 = 0x20080522  # 64-bit sets, as two 32-bit halves
SETS = {"CapInh": "inheritable", "CapPrm": "permitted", "CapEff": "effective", "CapBnd": "bounding",
        "CapAmb": "ambient"}

_libc = ctypes.CDLL(None, use_errno=True)


class _CapHeader(ctypes.Structure):
    _fields_ = [("version", ctypes.c_uint32), ("pid", ctypes.c_int)]


class _CapData(ctypes.Structure):
    _fields_ = [("effective", ctypes.c_uint32), ("permitted", ctypes.c_uint32), ("inheritable", ctypes.c_uint32)]


def drop_capabilities() -> dict[str, Any]:
    """Empty every capability set of this thread, lock the securebits, set no_new_privs. Returns what
    holds afterwards, for the run's record: each set as "empty" or its mask (with why it was kept),
    the securebits, no_new_privs. Raises OSError only when a step that needs no privilege fails."""
    record: dict[str, Any] = {}
    record["securebits"] = _lock_securebits()
    bounding_error = _drop_bounding_set()
    _prctl(PR_CAP_AMBIENT, PR_CAP_AMBIENT_CLEAR_ALL, check="clearing the ambient capabilities")
    header = _CapHeader(LINUX_CAPABILITY_VERSION_3, 0)
    empty = (_CapData * 2)()
    if _libc.capset(ctypes.byref(header), empty) != 0:
        raise _os_error("capset to no capabilities")
    _prctl(PR_SET_NO_NEW_PRIVS, 1, check="setting no_new_privs")
    held = current()
    for name in ("bounding", "permitted", "effective", "inheritable", "ambient"):
        record[name] = "empty" if held[name] == 0 else f"{held[name]:#x}"
    if held["bounding"] and bounding_error:
        record["bounding"] += f" (kept: {bounding_error}; unusable under no_new_privs)"
    record["no_new_privs"] = bool(held["no_new_privs"])
    return record


def current() -> dict[str, int]:
    """This thread's capability sets as masks (bounding, permitted, effective, inheritable, ambient),
    its securebits and its no_new_privs flag, from /proc/thread-self/status."""
    path = "/proc/thread-self/status" if os.path.exists("/proc/thread-self") else "/proc/self/status"
    held: dict[str, int] = {}
    with open(path) as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in SETS:
                held[SETS[key]] = int(value.strip(), 16)
            elif key == "NoNewPrivs":
                held["no_new_privs"] = int(value.strip())
    held["securebits"] = max(0, _call(PR_GET_SECUREBITS))
    return held


def _lock_securebits() -> str:
    """Best effort (needs CAP_SETPCAP). Bits already locked keep their value: the kernel refuses to
    unlock or flip them, so the new value is the old one with ours added and KEEP_CAPS cleared where
    it is not locked."""
    old = _call(PR_GET_SECUREBITS)
    if old < 0:
        return f"unchanged ({os.strerror(ctypes.get_errno())})"
    new = old | LOCKED_SECUREBITS
    if not old & SECBIT_KEEP_CAPS_LOCKED:
        new &= ~SECBIT_KEEP_CAPS
    if _call(PR_SET_SECUREBITS, new) != 0:
        return f"unchanged, {old:#x} ({os.strerror(ctypes.get_errno())})"
    return "noroot, no_setuid_fixup, no_cap_ambient_raise, keep_caps off: locked"


def _drop_bounding_set() -> str | None:
    """Drop each capability from the bounding set; the first error, or None. Without cap_last_cap,
    drop until the kernel answers EINVAL: past the last capability it knows."""
    try:
        with open("/proc/sys/kernel/cap_last_cap") as handle:
            last: int | None = int(handle.read())
    except (OSError, ValueError):
        last = None
    error = None
    for cap in range(64 if last is None else last + 1):
        if _call(PR_CAPBSET_DROP, cap) != 0:
            code = ctypes.get_errno()
            if code == errno.EINVAL and last is None:
                break
            error = error or f"{os.strerror(code)} dropping capability {cap}"
    return error


def _prctl(option: int, value: int, *, check: str) -> None:
    if _call(option, value) != 0:
        raise _os_error(check)


def _call(option: int, value: int = 0) -> int:
    """prctl with every argument a full unsigned long: it is variadic, and the kernel checks that
    the unused ones are zero."""
    return int(_libc.prctl(option, *(ctypes.c_ulong(v) for v in (value, 0, 0, 0))))


def _os_error(doing: str) -> OSError:
    code = ctypes.get_errno()
    return OSError(code, f"{doing}: {os.strerror(code)}")


def lock_down_helper() -> dict[str, Any]:
    """Confine a helper process of the daemon that needs nothing of the machine once it has loaded its code (the
    workflow expressions' worker): no capabilities and no_new_privs, no file or network access (Landlock with
    every access handled and none allowed, where the kernel has it), the runs' seccomp filter and one more that
    refuses any socket, new process, exec or new session, no core dumps, no file it could write, few descriptors.
    Returns what holds, for the log."""
    import resource

    from runner.sandbox import landlock, seccomp

    record = drop_capabilities()
    try:
        landlock.Ruleset(network=True, scope=True).enforce()
        record["landlock"] = "no file or network access"
    except (OSError, landlock.LandlockError) as exc:
        record["landlock"] = f"not enforced ({exc})"
    record["seccomp"] = seccomp.install() and seccomp.install_helper()  # the runs' filter, then no process, no socket
    for limit, value in ((resource.RLIMIT_CORE, 0), (resource.RLIMIT_FSIZE, 0), (resource.RLIMIT_NOFILE, 16)):
        resource.setrlimit(limit, (value, value))
    return record
