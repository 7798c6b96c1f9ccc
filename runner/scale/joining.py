"""Joining a Ray cluster, safely: reachable, and requiring Ray's token (docs/security.md).

The daemon refuses a cluster that answers a caller without the token, unless AGENT_ORCH_RAY_INSECURE is
set; it asks in a process of its own, since a process that has the token is let in either way. A daemon
without the token, or a head that is not there, is told so at once (Ray itself waits 20 s to minutes).
"""

from __future__ import annotations

import logging
import os
from typing import Any

from runner.errors import UsageError
from runner.settings import Settings

NAMESPACE = "agent-orchestrator"


def connect(settings: Settings) -> Any:
    """Join the cluster at RAY_ADDRESS, or raise UsageError saying why not. A cluster that does not
    require token authentication is refused unless AGENT_ORCH_RAY_INSECURE is set."""
    try:
        import ray
    except ImportError:
        raise UsageError("AGENT_ORCH_EXECUTOR=ray needs Ray: pip install 'agent-orchestrator[ray]'") from None
    if not ray.is_initialized():
        _reachable(settings.ray_address)
        if _host_port(settings.ray_address) and not _have_token():
            why = open_to_anyone(settings.ray_address)  # before joining: Ray takes 20 s to say "cannot connect"
            if why is None:
                raise UsageError(f"the Ray cluster at {settings.ray_address} requires token authentication and this "
                                 "daemon has no token: set RAY_AUTH_MODE=token and RAY_AUTH_TOKEN_PATH (or "
                                 "RAY_AUTH_TOKEN) as on the cluster's nodes (docs/scale-out.md)")
        try:
            ray.init(address=settings.ray_address, namespace=NAMESPACE, logging_level=logging.WARNING,
                     log_to_driver=False, configure_logging=False)
        except (ConnectionError, RuntimeError, ValueError) as exc:
            raise UsageError(f"cannot join the Ray cluster at RAY_ADDRESS={settings.ray_address}: {exc}") from None
    if not settings.ray_insecure:
        gcs = str(ray.get_runtime_context().gcs_address)
        why = open_to_anyone(gcs)
        if why is not None:
            ray.shutdown()
            raise UsageError(f"the Ray cluster at {gcs} {why}: anyone who reaches its ports runs code on its nodes. "
                             "Start every node with RAY_AUTH_MODE=token and the cluster's token (docs/scale-out.md), "
                             "or set AGENT_ORCH_RAY_INSECURE=1 for a cluster on a private network you trust")
    return ray


# Asks the cluster's GCS something without a token, in a process of its own (Ray reads its authentication
# mode once a process): a cluster that answers lets anyone in.
_PROBE = """
import os, sys
from ray._raylet import GcsClient
try:
    GcsClient(address=sys.argv[1]).internal_kv_get(b"session_name", namespace=b"session", timeout=10)
except Exception as exc:
    print("refused" if "auth" in (type(exc).__name__ + str(exc)).lower() else "error: " + str(exc)[:300])
else:
    print("open")
"""


def open_to_anyone(gcs_address: str) -> str | None:
    """None when the cluster at ``gcs_address`` refuses a caller without its token; else why it is not safe."""
    import subprocess
    import sys
    import tempfile

    with tempfile.TemporaryDirectory() as home:  # no ~/.ray/auth_token to find
        try:
            done = subprocess.run([sys.executable, "-c", _PROBE, gcs_address], capture_output=True, text=True,
                                  timeout=60, check=False, cwd=home,
                                  env={"PATH": os.defpath, "HOME": home, "RAY_AUTH_MODE": "disabled"})
        except subprocess.TimeoutExpired:
            return "did not answer a check of its authentication"
    said = (done.stdout.strip().splitlines() or ["no answer"])[-1]
    if said == "refused":
        return None
    if said == "open":
        return "does not require token authentication"
    return f"could not be checked for token authentication ({said})"


def _host_port(address: str) -> bool:
    return address not in ("", "auto") and "://" not in address


def _have_token() -> bool:
    """Whether this process joins with a token (Ray's rules: RAY_AUTH_MODE=token and a token from RAY_AUTH_TOKEN,
    RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; without RAY_AUTH_MODE, the last file alone turns it on)."""
    mode = os.environ.get("RAY_AUTH_MODE")
    home_token = os.path.exists(os.path.expanduser("~/.ray/auth_token"))
    if mode is None:
        return home_token
    path = os.environ.get("RAY_AUTH_TOKEN_PATH")
    return mode.strip().lower() == "token" and bool(os.environ.get("RAY_AUTH_TOKEN") or
                                                    (path and os.path.exists(path)) or home_token)


def _reachable(address: str) -> None:
    """Fail fast on a head that is not there: Ray itself waits minutes for a GCS that never answers."""
    import socket

    if not _host_port(address):
        return
    host, _, port = address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]") or "127.0.0.1", int(port)), timeout=10):
            pass
    except ValueError:
        raise UsageError(f"RAY_ADDRESS={address} is not HOST:PORT (or auto)") from None
    except OSError as exc:
        raise UsageError(f"cannot reach the Ray head at RAY_ADDRESS={address}: {exc.strerror or exc} (is "
                         "`ray start --head` running there, and its port open to this machine?)") from None


def auth_mode() -> str:
    """The authentication this process (and so the cluster it joined) uses: 'token' or 'disabled'. A
    process joins a cluster that requires tokens only with the token, and each node reports its own."""
    try:
        from ray._private.authentication.authentication_utils import is_token_auth_enabled
    except ImportError:  # Ray older than 2.52: no token authentication at all
        return "unsupported"
    return "token" if is_token_auth_enabled() else "disabled"
