"""What this kernel can enforce, found out once at start and reported (status, /healthz, the log)."""

from __future__ import annotations

import functools
import os
import subprocess
import sys
from typing import Any

from runner.sandbox.landlock import abi_version


@functools.cache
def detect() -> dict[str, Any]:
    abi = abi_version()
    return {
        "landlock_abi": abi,
        "filesystem": "landlock" if abi >= 1 else "none",
        "network": "landlock (TCP ports)" if abi >= 4 else "none",
        "scoping": "landlock (abstract sockets, signals)" if abi >= 6 else "none",
        "user_namespaces": _userns(),
        "rlimits": True,
        "no_new_privs": True,
    }


def _userns() -> bool:
    try:
        probe = "import ctypes, sys; sys.exit(ctypes.CDLL(None).unshare(0x10000000) != 0)"  # CLONE_NEWUSER
        done = subprocess.run([sys.executable, "-c", probe],
                              capture_output=True, timeout=10, check=False, env={"PATH": os.defpath})
        return done.returncode == 0
    except (OSError, subprocess.TimeoutExpired):
        return False
