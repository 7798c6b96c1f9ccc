"""``allowed_domains`` read by name: the first step of the egress rules, shared by validation (a
``remote_agent``'s host must be allowed) and by the sandbox's ``HostRule``, which then checks the
addresses a name resolves to. Nothing here resolves a name: a lookup would carry it out through DNS.
"""

from __future__ import annotations

import ipaddress
import socket
from collections.abc import Iterable


def refusal(host: str, domains: Iterable[str], remote_enabled: bool | None = True) -> str | None:
    """Why ``domains`` do not allow ``host`` by its name, or None when they do. ``local`` allows this
    machine's names and loopback addresses; a named domain (or ``*.domain``), hosts beyond it, which also
    need ENABLE_REMOTE_TOOLS (``remote_enabled``; None: not known here, not checked)."""
    host = host.lower().rstrip(".")
    domains = tuple(domains)
    if is_local(host):
        return None if "local" in domains else f"'{host}' is this machine; only 'local' in allowed_domains allows that"
    if not named(host, domains):
        return f"'{host}' is not in allowed_domains ({', '.join(domains) or 'none'})"
    if remote_enabled is False:
        return f"'{host}' is beyond this machine and ENABLE_REMOTE_TOOLS is off"
    return None


def named(host: str, domains: Iterable[str]) -> bool:
    """Whether a named domain (not ``local``) allows ``host``: equal, or under a ``*.domain``."""
    host = host.lower().rstrip(".")
    return any(host == d or (d.startswith("*.") and host.endswith(d[1:])) for d in domains if d != "local")


def is_local(host: str) -> bool:
    """This machine by name (localhost, *.localhost, its host name) or a loopback address."""
    host = host.lower().rstrip(".")
    literal = literal_address(host)
    return local_name(host) or (literal is not None and loopback(literal))


def local_name(host: str) -> bool:
    return host in ("localhost", socket.gethostname().lower()) or host.endswith(".localhost")


def literal_address(host: str) -> str | None:
    try:
        return str(ipaddress.ip_address(host.strip("[]")))
    except ValueError:
        return None


def loopback(address: str) -> bool:
    """This machine: loopback, the unspecified address (Linux connects 0.0.0.0 and :: to the local
    host), and their IPv4-mapped IPv6 forms."""
    ip = ipaddress.ip_address(address)
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    return ip.is_loopback or ip.is_unspecified
