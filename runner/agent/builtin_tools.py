"""The builtin tools. Each is a plain function of (context, arguments) that checks before it acts.

A check that fails raises DeniedError; the toolbox turns it into a tool error for the model and a
``denied`` event for the ledger. Nothing is read before the check passes, so denied content never
reaches the model, the logs or the ledger.
"""

from __future__ import annotations

import glob
import os
import re
import shlex
import shutil
import stat
import subprocess
import threading
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from runner.agent.memory import Remembers
from runner.errors import DeniedError
from runner.sandbox.access import HostRule, PathRule

MAX_READ = 256 * 1024  # bytes of a file given to the model
MAX_LIST = 500  # entries of a folder listing
MAX_HTTP = 1024 * 1024  # bytes of an HTTP body
MAX_OUTPUT = 64 * 1024  # bytes of a shell command's output
MAX_ROWS = 200  # rows of a data_analyzer result
MAX_REDIRECTS = 5
MAX_SCAN = 10_000  # files and folders looked at for hard links under data_analyzer's folders, per query


@dataclass
class ToolEnv:
    """What a tool may use: its own paths and limits, the run's domains, memory and scratch folder."""

    paths: PathRule
    commands: list[str] = field(default_factory=list)
    timeout: float = 30.0
    allowed_domains: list[str] = field(default_factory=list)
    remote_enabled: bool = False
    memory: Remembers | None = None
    run_id: str = ""
    scratch: str = "/tmp"


ToolFn = Callable[..., str]


def file_reader(env: ToolEnv, path: str) -> str:
    """Read a text file, or list a folder."""
    real = env.paths.check(path)
    if os.path.isdir(real):
        entries = sorted(os.listdir(real))
        shown = [e + ("/" if os.path.isdir(os.path.join(real, e)) else "") for e in entries[:MAX_LIST]]
        more = f"\n... and {len(entries) - MAX_LIST} more" if len(entries) > MAX_LIST else ""
        return "\n".join(shown) + more if shown else "(empty folder)"
    fd = os.open(real, os.O_RDONLY | os.O_NOFOLLOW)
    with os.fdopen(fd, "rb") as handle:
        data = handle.read(MAX_READ + 1)
    text = data[:MAX_READ].decode("utf-8", "replace")
    return text + ("\n... (truncated)" if len(data) > MAX_READ else "")


def file_writer(env: ToolEnv, path: str, content: str) -> str:
    """Write a text file (replacing it); its folder must exist."""
    real = env.paths.check(path)
    if os.path.isdir(real):
        raise DeniedError(f"'{path}' is a folder")
    fd = os.open(real, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW, 0o640)
    with os.fdopen(fd, "w", encoding="utf-8") as handle:
        handle.write(content)
    return f"wrote {len(content.encode())} bytes to {path}"


_PATH_LITERAL = re.compile(r"'((?:/|~|\.)[^']*)'")


def data_analyzer(env: ToolEnv, query: str) -> str:
    """Run one read-only DuckDB SQL query; files are named by absolute path in it."""
    # Imported by the run that calls it, not by the zygote: DuckDB starts a thread when it loads, and the
    # zygote must stay single-threaded to clone runs into their namespaces (runner.agent.spawning._spawn).
    import duckdb

    statements = duckdb.extract_statements(query)
    if len(statements) != 1 or statements[0].type != duckdb.StatementType.SELECT:
        kinds = ", ".join(s.type.name for s in statements) or "nothing"
        raise DeniedError(f"only one SELECT statement is allowed (got {kinds})")
    named: list[str] = []
    for literal in _PATH_LITERAL.findall(query):
        matches = glob.glob(literal) if any(c in literal for c in "*?[") else [literal]
        for one in matches or [literal]:
            # realpath: a symlink inside the paths cannot lead out
            named += [os.path.abspath(one), env.paths.check(one, what="file")]
    folders, files = _duckdb_grants(env.paths.roots, named)
    con = duckdb.connect(":memory:", config={"autoinstall_known_extensions": False,
                                             "autoload_known_extensions": False})
    try:
        con.execute("SET allowed_directories = ?", [folders])
        con.execute("SET allowed_paths = ?", [files])
        con.execute("SET enable_external_access = false")
        con.execute("SET lock_configuration = true")
        timer = threading.Timer(env.timeout, con.interrupt)
        timer.start()
        try:
            cur = con.execute(query)
            names = [d[0] for d in cur.description or []]
            rows = cur.fetchmany(MAX_ROWS + 1)
        except duckdb.InterruptException:
            raise DeniedError(f"query took longer than {env.timeout:.0f}s") from None
        except duckdb.PermissionException as exc:
            raise DeniedError(str(exc).splitlines()[0]) from None
        finally:
            timer.cancel()
    finally:
        con.close()
    lines = [",".join(names)] + [",".join("" if v is None else str(v) for v in r) for r in rows[:MAX_ROWS]]
    return "\n".join(lines) + (f"\n... (more than {MAX_ROWS} rows)" if len(rows) > MAX_ROWS else "")


def _duckdb_grants(roots: tuple[str, ...], named: list[str]) -> tuple[list[str], list[str]]:
    """The folders and the files DuckDB may open for one query.

    DuckDB resolves symlinks against its allowed folders, but a hard link in one looks like any other
    file to it, and a path built in SQL (``'/data/' || 'x.csv'``) is not a literal we can check. So when
    a folder holds a hard-linked file (or more files than we look at), DuckDB gets no folders, only the
    files the query names, each of them checked already.
    """
    folders = [r for r in roots if not os.path.isfile(r)]
    files = [r for r in roots if os.path.isfile(r) and os.stat(r).st_nlink == 1]
    if any(_holds_hard_link(folder) for folder in folders):
        return [], files + named
    return [f.rstrip("/") + "/" for f in folders], files


def _holds_hard_link(folder: str) -> bool:
    """Whether a regular file under ``folder`` has more than one link (also True past MAX_SCAN files)."""
    seen = 0
    for base, _dirs, names in os.walk(folder):  # a symlinked folder is DuckDB's to refuse or to resolve
        seen += 1 + len(names)
        if seen > MAX_SCAN:
            return True
        for name in names:
            try:
                info = os.lstat(os.path.join(base, name))
            except OSError:
                continue
            if stat.S_ISREG(info.st_mode) and info.st_nlink > 1:
                return True
    return False


def http_get(env: ToolEnv, url: str) -> str:
    """Fetch a URL on the allowed domains; each redirect hop is checked like the first request."""
    for _hop in range(MAX_REDIRECTS + 1):
        parts = urllib.parse.urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise DeniedError(f"only http and https URLs are allowed, not '{url}'")
        HostRule(tuple(env.allowed_domains), env.remote_enabled).check(parts.hostname)
        request = urllib.request.Request(url, headers={"User-Agent": "agent-orchestrator"})
        try:
            # Built per call: the opener takes the proxy (the run's way out) from the environment.
            with urllib.request.build_opener(_NoRedirect()).open(request, timeout=env.timeout) as resp:
                body = resp.read(MAX_HTTP + 1)
                text = body[:MAX_HTTP].decode(resp.headers.get_content_charset() or "utf-8", "replace")
                return f"HTTP {resp.status}\n{text}" + ("\n... (truncated)" if len(body) > MAX_HTTP else "")
        except urllib.error.HTTPError as exc:
            if exc.code in (301, 302, 303, 307, 308) and exc.headers.get("Location"):
                url = urllib.parse.urljoin(url, exc.headers["Location"])
                continue
            return f"HTTP {exc.code} {exc.reason}"
        except (urllib.error.URLError, OSError) as exc:
            return f"error: {getattr(exc, 'reason', exc)}"
    raise DeniedError(f"more than {MAX_REDIRECTS} redirects")


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None  # we follow redirects ourselves, checking each hop



def shell(env: ToolEnv, command: str) -> str:
    """Run one allow-listed program (no shell: no pipes, no redirection), with a timeout."""
    try:
        argv = shlex.split(command)
    except ValueError as exc:
        raise DeniedError(f"cannot parse command: {exc}") from None
    if not argv:
        raise DeniedError("empty command")
    program = argv[0]
    resolved = _listed_program(program, env.commands)
    if resolved is None:
        return f"error: {program}: not found"
    cwd = env.paths.roots[0] if env.paths.roots and os.path.isdir(env.paths.roots[0]) else env.scratch
    # The command stays in the run's process group (no new session): the launcher ends a run by
    # signalling that group, and a command in a group of its own would outlive a timed-out run.
    try:
        done = subprocess.run([resolved, *argv[1:]], cwd=cwd, capture_output=True, timeout=env.timeout,
                              env={"PATH": os.defpath, "LANG": "C.UTF-8", "HOME": env.scratch,
                                   **{k: v for k, v in os.environ.items() if k.lower().endswith("_proxy")}},
                              stdin=subprocess.DEVNULL, check=False)
    except subprocess.TimeoutExpired:
        return f"error: timed out after {env.timeout:.0f}s"
    out = (done.stdout[:MAX_OUTPUT] + done.stderr[:MAX_OUTPUT]).decode("utf-8", "replace")
    return f"exit {done.returncode}\n{out}"


def _listed_program(program: str, commands: list[str]) -> str | None:
    """The executable ``program`` names when the allow-list lets it run (None: listed but not installed).

    A listed name is looked up on the default PATH; a path runs only when it is listed itself, or is
    where a listed name is found. A path that merely ends in a listed name (``/tmp/x/echo``, ``bin/echo``)
    is another program, so it is refused.
    """
    if program in commands:
        return program if "/" in program else shutil.which(program, path=os.defpath)
    name = os.path.basename(program)
    if "/" in program and name in commands:
        found = shutil.which(name, path=os.defpath)
        if found is not None and os.path.realpath(program) == os.path.realpath(found):
            return program
    raise DeniedError(f"'{program}' is not in the tool's commands ({', '.join(sorted(commands))})")


def memory_search(env: ToolEnv, query: str, k: int = 5) -> str:
    """Search the agent's memory for what is nearest to the query."""
    if env.memory is None:
        return "this agent has no memory"
    found = env.memory.search(query, max(1, min(int(k), 50)))
    return "\n".join(f"- ({m.created_at}) {m.text}" for m in found) or "nothing remembered yet"


def memory_save(env: ToolEnv, text: str) -> str:
    """Save a text to the agent's memory."""
    if env.memory is None:
        return "this agent has no memory"
    env.memory.add(text[:8000], kind="note", run_id=env.run_id)
    return "saved"


BUILTINS: dict[str, ToolFn] = {
    "file_reader": file_reader, "file_writer": file_writer, "data_analyzer": data_analyzer,
    "http_get": http_get, "shell": shell, "memory_search": memory_search, "memory_save": memory_save,
}
