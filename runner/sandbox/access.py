"""Whether a tool may touch a path: resolve first, then compare.

A path is resolved with ``realpath`` before it is checked, so ``..``, symlinks (including ones created
inside an allowed folder, and ``/proc/self/root/...``) are judged by where they really lead. The
check is against the calling tool's own paths: a folder allowed to the reader is not writable through
the writer unless the writer names it too. A regular file with more than one hard link is refused:
a hard link inside an allowed folder can carry a file from anywhere on the same filesystem.

What remains is the race between check and use (a symlink swapped in between); the run's sandbox
(Landlock, issue 6) closes it in the kernel. Here we narrow it by opening with O_NOFOLLOW.
"""

from __future__ import annotations

import ipaddress
import os
import re
import socket
from dataclasses import dataclass
from typing import Any

from runner.errors import DeniedError
from runner.specs import domains


@dataclass(frozen=True)
class PathRule:
    roots: tuple[str, ...]  # resolved absolute folders or files

    @classmethod
    def of(cls, paths: list[str]) -> PathRule:
        return cls(tuple(os.path.realpath(p) for p in paths))

    def check(self, requested: str, *, what: str = "path") -> str:
        """The resolved path when it lies under one of the roots; DeniedError otherwise."""
        if not isinstance(requested, str) or not requested or "\0" in requested:
            raise DeniedError(f"{what} must be a non-empty path")
        if not os.path.isabs(requested):
            raise DeniedError(f"{what} '{requested}' must be absolute")
        resolved = os.path.realpath(requested)
        if not any(_within(resolved, root) for root in self.roots):
            allowed = ", ".join(self.roots) or "nothing"
            raise DeniedError(f"'{requested}' resolves to '{resolved}', outside the allowed paths ({allowed})")
        try:
            st = os.stat(resolved)
        except FileNotFoundError:
            return resolved
        if not os.path.isdir(resolved) and st.st_nlink > 1:
            raise DeniedError(f"'{requested}' has {st.st_nlink} hard links; hard-linked files are refused")
        return resolved


def _within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip("/") + "/")


SECRET_KEY = re.compile(r"(^|[_-])(pass(word)?|passwd|secret|token|api[_-]?key|apikey|authorization|cookie|"
                        r"credentials?|private[_-]?key)$", re.IGNORECASE)
SECRET_VALUE = re.compile(r"(?i)(bearer\s+[A-Za-z0-9._~+-]+=*|sk-[A-Za-z0-9_-]{8,}|ghp_[A-Za-z0-9]{20,}|"
                          r"xox[baprs]-[A-Za-z0-9-]{10,}|AKIA[0-9A-Z]{16})")
# key=value in URLs and command lines: ?token=..., &api_key=..., --password=...
SECRET_PARAM = re.compile(
    r"(?i)\b((?:access_|auth_|api_|refresh_)?(?:token|key|apikey|password|passwd|secret)=)[^&\s]+")


def redact(value: Any) -> Any:
    """A copy of ``value`` with secrets replaced by '[redacted]' (by key name and by shape)."""
    if isinstance(value, dict):
        return {k: "[redacted]" if isinstance(k, str) and SECRET_KEY.search(k) else redact(v)
                for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [redact(v) for v in value]
    if isinstance(value, str):
        return SECRET_PARAM.sub(r"\1[redacted]", SECRET_VALUE.sub("[redacted]", value))
    return value


@dataclass(frozen=True)
class HostRule:
    """Which hosts the network tools may reach: ``allowed_domains``, with ``local`` meaning this machine.

    Used twice: by ``http_get`` before it asks (a clear denial for the model), and by the egress proxy,
    which resolves the name itself and connects only to the addresses it checked. Inside a run's
    network namespace names do not resolve, so the tool judges by name and the proxy decides.
    """

    allowed_domains: tuple[str, ...]
    remote_enabled: bool

    def check(self, host: str, addresses: list[str] | None = None) -> list[str]:
        """The addresses to connect to for ``host``; raises DeniedError.

        Decided on the name first: a name that no rule allows is refused before anything resolves it,
        since a lookup would carry the name out through DNS (``<secret>.attacker.example``). ``local``
        allows this machine's names (localhost, *.localhost, its host name) and loopback addresses;
        a named domain, hosts beyond this machine. The lookup then has to agree."""
        host = host.lower().rstrip(".")
        literal = _literal(host)
        local = domains.is_local(host)
        refused = domains.refusal(host, self.allowed_domains, self.remote_enabled)
        if refused:
            raise DeniedError(refused)
        if addresses is None:  # a local name is not looked up: *.localhost would go to the DNS server
            addresses = [literal] if literal else ["127.0.0.1"] if local else lookup(host)
        kinds = {_loopback(a) for a in addresses}
        if local and False in kinds:
            raise DeniedError(f"'{host}' resolves beyond this machine; refused")
        if not local and True in kinds:
            raise DeniedError(f"'{host}' points at this machine; only 'local' allows that")
        return addresses


_literal = domains.literal_address
local_name = domains.local_name


def lookup(host: str) -> list[str]:
    """The addresses of ``host`` (itself when it is one; none when it does not resolve)."""
    host = host.strip("[]")
    try:
        return [str(ipaddress.ip_address(host))]
    except ValueError:
        pass
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return []
    return list(dict.fromkeys(str(i[4][0]).split("%")[0] for i in infos))


_loopback = loopback = domains.loopback
