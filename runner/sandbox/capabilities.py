"""What this kernel can enforce, found out once at start and reported (status, /healthz, the log)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from typing import Any

from runner.sandbox import seccomp
from runner.sandbox.landlock import abi_version

# Run in a throwaway process: enter the namespaces a run enters, then try pid_max inside them.
_PROBE = """
import os, sys
from runner.sandbox import isolating
entered = isolating.enter()
if not entered:
    print("none"); sys.exit()
pid = os.fork()
if pid == 0:
    try:
        isolating.enter_network(gateway=True)
        net = "net"
    except OSError:
        net = "-"
    print(",".join(entered + [net]), "pid_max" if isolating.limit_processes(64) else "-", flush=True)
    os._exit(0)
os.waitpid(pid, 0)
"""


@functools.cache
def detect() -> dict[str, Any]:
    abi = abi_version()
    namespaces, pid_max = _namespaces()
    isolated = "net" in namespaces
    return {
        "landlock_abi": abi,
        "filesystem": "landlock" if abi >= 1 else "none",
        "namespaces": namespaces,
        "network": "own namespace, egress proxy" if isolated else "landlock (TCP ports)" if abi >= 4 else "none",
        "scoping": "landlock (abstract sockets, signals)" if abi >= 6 else "none",
        "process_limit": "pid_max of the run's PID namespace" if pid_max
        else "RLIMIT_NPROC (binds a non-root daemon user only)",
        "seccomp": seccomp.describe() if seccomp.supported() else "none",
        "cgroups": _cgroups(),
        "rlimits": True,
        "no_new_privs": True,
    }


def _namespaces() -> tuple[list[str], bool]:
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True, timeout=20,
                              check=False, env={"PATH": os.defpath, "PYTHONPATH": os.pathsep.join(sys.path)})
    except (OSError, subprocess.TimeoutExpired):
        return [], False
    words = done.stdout.split()
    if not words or words[0] == "none":
        return [], False
    return [n for n in words[0].split(",") if n != "-"], words[-1] == "pid_max"


def _cgroups() -> str:
    """Reported, not used: per-run cgroups need a delegated cgroup v2 subtree (docs/security.md)."""
    if not os.path.exists("/sys/fs/cgroup/cgroup.controllers"):
        return "v1 (not used)" if os.path.isdir("/sys/fs/cgroup") else "none"
    try:
        with open("/proc/self/cgroup") as handle:
            own = handle.read().strip().rsplit(":", 1)[-1]
    except OSError:
        return "v2 (not used)"
    delegated = os.access(f"/sys/fs/cgroup{own}", os.W_OK)
    return f"v2, {'delegated' if delegated else 'not delegated'} (not used)"
