"""Confine the run process before any agent code runs: environment, limits, Landlock.

Order matters: the environment is cleaned and the limits set first (they need no privilege), then
Landlock is enforced last, after which the process can open only what its rules allow:

- read and execute: the Python installation (the run's own code and libraries), the system's
  libraries and programs (/usr, /lib, /bin), and a handful of /etc files programs need (TLS roots,
  time zone, resolver) - not /etc as a whole, so not /etc/shadow;
- read: the paths of the spec's tools that may read;
- read and write: the paths of tools that may write, and the run's scratch folder
  (not the state database, not the logs: the run reports its steps to its launcher over a pipe);
- TCP: connect only to the egress proxy, on the loopback of the run's own network namespace
  (``isolating``, ``egress``); nothing at all when the run needs no network;
- signals and abstract unix sockets: only within the run (Landlock scoping, ABI 6);
- unix sockets by path: none, since the run cannot make a unix socket (``seccomp``).
Everything else - the home's other files, other agents' memory, the settings, /proc/1 - is denied.
"""

from __future__ import annotations

import dataclasses
import functools
import os
import resource
import socket
import sys
import sysconfig
import urllib.parse
from typing import Any

from runner.errors import DeniedError
from runner.plan import RunPlan
from runner.sandbox import isolating, landlock, privileges, seccomp
from runner.sandbox.egress import MODEL_HOST, Upstream, proxy_environment
from runner.specs.catalog import effective_permissions, path_access
from runner.specs.checking import expand, overlap_reason
from runner.specs.custom_tools import tool_info

ETC_FILES = ("ssl", "ca-certificates", "pki", "localtime", "timezone", "hosts", "resolv.conf", "nsswitch.conf",
             "host.conf", "gai.conf", "mime.types", "protocols", "services", "ld.so.cache", "ld.so.conf",
             "ld.so.conf.d", "os-release", "debian_version")
SYSTEM = ("/usr", "/lib", "/lib64", "/lib32", "/bin", "/sbin")
DEVICES = ("/dev/null", "/dev/zero", "/dev/urandom", "/dev/random", "/dev/full")
# What runtimes read about the machine (memory and CPU limits): harmless, and DuckDB aborts without it.
SYSTEM_INFO = ("/sys/fs/cgroup", "/sys/devices/system/cpu", "/proc/meminfo", "/proc/cpuinfo", "/proc/stat")
MiB = 1024 * 1024


def warm() -> None:
    """Work out the runtime's paths once in the launcher; forked runs inherit the answer."""
    _runtime_paths()
    landlock.abi_version()


def confine(plan: RunPlan, isolation: dict[str, Any] | None = None) -> dict[str, Any]:
    """Apply the sandbox; returns what is enforced (recorded with the run). ``isolation`` is what
    ``isolate`` entered: namespaces, pid_max, the egress proxy's port, the scratch tmpfs. Raises DeniedError
    when the spec needs a guarantee this kernel cannot give and the settings do not allow running
    without it."""
    s = plan.settings
    isolation = isolation or {"namespaces": []}
    plan.scratch.mkdir(parents=True, exist_ok=True)
    enforced: dict[str, Any] = {"mode": s.sandbox, "namespaces": isolation["namespaces"]}
    if s.sandbox == "off":
        return enforced
    isolated = "net" in isolation["namespaces"]
    if not isolated and s.sandbox == "strict":
        raise DeniedError("this kernel cannot give the run a network namespace of its own "
                          f"({isolation.get('network_error', 'no namespaces')}); the run is refused. Allow user "
                          "namespaces (sysctl kernel.unprivileged_userns_clone=1, or on Ubuntu "
                          "kernel.apparmor_restrict_unprivileged_userns=0), run the daemon as root, or set "
                          "AGENT_ORCH_SANDBOX=permissive to run it on the host's network (recorded as such)")
    port = isolation.get("egress_port")
    _capture_output(plan)
    _clean_environment(plan, port)
    enforced["environment"] = "clean"
    enforced["scratch"] = isolation.get("scratch", "on disk, removed when the run ends")
    enforced["limits"] = _limits(plan)
    enforced["processes"] = ({"pid_max": isolation["pid_max"]} if isolation.get("pid_max")
                             else {"RLIMIT_NPROC": enforced["limits"].get("RLIMIT_NPROC")})
    enforced["network"] = _network(plan, isolated, port)
    abi = landlock.abi_version()
    if abi == 0:
        if s.sandbox == "strict":
            raise DeniedError("this kernel cannot enforce file access limits (no Landlock); the run is refused. "
                              "AGENT_ORCH_SANDBOX=permissive runs it unconfined (recorded as such)")
        enforced["landlock"] = "unavailable: unconfined (AGENT_ORCH_SANDBOX=permissive)"
        enforced["capabilities"] = privileges.drop_capabilities()
        enforced["seccomp"] = seccomp.describe() if seccomp.install() else "unavailable"
        return enforced
    # In its own namespace the run may connect to the proxy only; on the host's network (permissive),
    # to the model's port, or anywhere when it has network tools.
    rules = landlock.Ruleset(network=isolated or not network_tools(plan))
    readable, writable = _paths(plan)
    own = _own_folders(plan)
    for path in runtime_paths(plan):
        rules.allow_path(path, landlock.READ_EXEC)
    for path in readable:
        rules.allow_path(path, landlock.READ, follow=False)
    for path in writable:
        rules.allow_path(path, landlock.READ | landlock.WRITE, follow=False)
    for path in own:
        rules.allow_path(path, landlock.READ | landlock.WRITE)
    for dev in DEVICES:
        rules.allow_path(dev, landlock.READ | landlock.WRITE_FILE)
    # /proc/self, resolved: inside a PID namespace getpid() is 1, and /proc/1 is the machine's init.
    rules.allow_path(os.path.realpath("/proc/self"), landlock.READ)
    for info in SYSTEM_INFO:
        rules.allow_path(info, landlock.READ)
    ports = ({port} if port else set()) if isolated else {p for _host, p in model_endpoints(plan)}
    rules.allow_ports(ports)
    enforced["capabilities"] = privileges.drop_capabilities()  # even a root daemon's run keeps none
    rules.enforce()  # with no_new_privs, which the seccomp filter needs too
    enforced["landlock"] = {"abi": abi, "read": sorted(readable), "write": sorted(writable | own),
                            "tcp_connect": sorted(ports) if rules.net else "not restricted (network tools)"}
    enforced["seccomp"] = seccomp.describe() if seccomp.install() else "unavailable"
    return enforced


def isolate(plan: RunPlan, namespaces: list[str], channel: socket.socket) -> dict[str, Any]:
    """In the process that will run the agent (PID 1 of its namespaces), while it still has the
    privileges to: its process limit, its network namespace (the egress listener goes to the
    supervisor over ``channel``), and a size-capped tmpfs as its scratch folder. Returns what it
    entered, for ``confine``; ``plan`` in it is the plan the run goes on with (model URL via the proxy)."""
    isolation: dict[str, Any] = {"namespaces": list(namespaces)}
    if plan.settings.sandbox == "off":
        return isolation
    limit = ceiling(plan.spec.constraints.max_processes, plan.settings.max_processes)
    if "pid" in namespaces:
        isolation["pid_max"] = isolating.limit_processes(limit)
    gateway = needs_network(plan)
    try:
        listener = isolating.enter_network(gateway=gateway)
        isolation["namespaces"].append("net")
    except OSError as exc:
        listener, isolation["network_error"] = None, str(exc)
    if listener is not None:
        try:
            socket.send_fds(channel, [b'{"v": 1, "t": "egress"}\n'], [listener.fileno()])
            isolation["egress_port"] = listener.getsockname()[1]
        except OSError as exc:
            isolation["network_error"] = f"cannot hand the egress listener to the supervisor: {exc}"
        listener.close()
    if "mnt" in namespaces:
        isolation["scratch"] = isolating.mount_scratch(str(plan.scratch), plan.settings.max_scratch_mb)
    port = isolation.get("egress_port")
    url = plan.settings.langchain_api_url
    if port and plan.spec.model.startswith("openai:") and MODEL_HOST not in url:  # permissive, yet isolated
        isolation["plan"] = dataclasses.replace(plan, settings=plan.settings.model_copy(
            update={"langchain_api_url": proxied_model_url(url)}))
    return isolation


def run_view(plan: RunPlan) -> RunPlan:
    """The plan as the run receives it (on the supervisor's side): no spec source, no credentials in
    the model servers' URLs, and, where the run is sure to reach its proxy (strict: no namespace, no
    run), the OpenAI-compatible endpoint by the proxy's name, so the run never learns where it is
    or how to log in there. Secret settings are masked by their type already."""
    s = plan.settings
    update: dict[str, Any] = {"source": "", "langchain_api_url": _without_userinfo(s.langchain_api_url),
                              "ollama_host": _without_userinfo(s.ollama_host)}
    if plan.spec.model.startswith("openai:") and s.sandbox == "strict":
        update["langchain_api_url"] = proxied_model_url(s.langchain_api_url)
    return dataclasses.replace(plan, settings=s.model_copy(update=update))


def proxied_model_url(url: str) -> str:
    return urllib.parse.urlunsplit(("http", MODEL_HOST, urllib.parse.urlsplit(url).path, "", ""))


def _without_userinfo(url: str) -> str:
    parts = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    if "@" not in parts.netloc:
        return url
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rsplit("@", 1)[1]))


def model_upstream(plan: RunPlan) -> Upstream | None:
    """Where the proxy sends the run's requests for MODEL_HOST, with the key the run never sees: the
    OpenAI-compatible endpoint of an ``openai:`` model."""
    if not plan.spec.model.startswith("openai:"):
        return None
    s = plan.settings
    parts = urllib.parse.urlsplit(s.langchain_api_url)
    host, port = _host_port(s.langchain_api_url)
    key = s.openai_api_key.get_secret_value()
    return Upstream(parts.scheme or "http", host, port, f"Bearer {key}" if key else None)


def output_tail(plan: RunPlan, limit: int = 4096) -> dict[str, Any] | None:
    """The size and the last ``limit`` bytes of the run's captured stdout and stderr, for its record
    (the scratch folder, and the file with it, is gone when the run ends)."""
    path = plan.scratch / "output.txt"
    try:
        size = path.stat().st_size
        if size == 0:
            return None
        with open(path, "rb") as handle:
            handle.seek(max(0, size - limit))
            return {"bytes": size, "tail": handle.read().decode("utf-8", "replace")}
    except OSError:
        return None


def confine_probe(module_dir: str) -> list[str]:
    """Confine this process before it imports a pushed tool module to see whether it loads (reconcile):
    pushed code never runs outside a sandbox. Namespaces (user where not root, PID, IPC, UTS, mount,
    and a network namespace with nothing in it), no capabilities, rlimits, and Landlock allowing only
    reads of the runtime and of ``module_dir``: no writes, no TCP. Forks once for the PID namespace:
    returns in the child, PID 1 of it; the parent waits and exits with its status. Raises DeniedError
    when Landlock is missing (the caller reports the tool as not probed)."""
    namespaces = isolating.enter()
    if namespaces:
        child = os.fork()
        if child:
            _pid, status = os.waitpid(child, 0)
            os._exit(os.waitstatus_to_exitcode(status) & 0xFF)
    try:
        isolating.enter_network(gateway=False)
        namespaces.append("net")
    except OSError:
        pass
    for name, value in (("RLIMIT_AS", 2048 * MiB), ("RLIMIT_CPU", 60), ("RLIMIT_FSIZE", 0), ("RLIMIT_CORE", 0),
                        ("RLIMIT_NPROC", 64)):
        kind = getattr(resource, name)
        try:
            resource.setrlimit(kind, (value, value))
        except (ValueError, OSError):
            pass
    if landlock.abi_version() == 0:
        raise DeniedError("no Landlock on this kernel: pushed tool modules are not imported before their first run")
    rules = landlock.Ruleset(network=True)
    for path in _runtime_paths():
        rules.allow_path(path, landlock.READ_EXEC)
    rules.allow_path(module_dir, landlock.READ)
    for dev in DEVICES:
        rules.allow_path(dev, landlock.READ | landlock.WRITE_FILE)
    privileges.drop_capabilities()
    rules.enforce()
    seccomp.install()
    return namespaces


def _network(plan: RunPlan, isolated: bool, port: int | None) -> dict[str, Any]:
    if not isolated:
        return {"namespace": False, "egress": "the host's network (AGENT_ORCH_SANDBOX=permissive)"}
    if port is None:
        return {"namespace": True, "egress": "none"}
    allowed = sorted(f"{host}:{p}" for host, p in model_endpoints(plan))
    if network_tools(plan):
        allowed += list(plan.spec.constraints.allowed_domains)
    return {"namespace": True, "egress": f"proxy at 127.0.0.1:{port}", "allowed": allowed}


def network_tools(plan: RunPlan) -> bool:
    """Any tool granted 'network' (a custom tool: by its spec, else by the PERMISSIONS it declares)."""
    for t in plan.spec.tools:
        if t.agent or t.remote_agent:
            continue  # asked through the control plane: the run opens no connection for it
        if "network" in effective_permissions(tool_info(t.name, plan.custom_sources), t.permissions):
            return True
    return False


def _capture_output(plan: RunPlan) -> None:
    """The run's stdout and stderr go to a file in its scratch folder (bounded by RLIMIT_FSIZE), never
    to the terminal of `agentctl run` or to the daemon's log: a tool printing gigabytes fills only that."""
    fd = os.open(plan.scratch / "output.txt", os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.close(fd)


def needs_network(plan: RunPlan) -> bool:
    """False when the run can live without any network: no model server and no network tools."""
    return network_tools(plan) or bool(model_endpoints(plan))


def _clean_environment(plan: RunPlan, egress_port: int | None) -> None:
    os.environ.clear()  # the zygote's was clean already; this also drops what the run's own code set
    scratch = str(plan.scratch)
    os.environ.update({"PATH": os.defpath, "HOME": scratch, "TMPDIR": scratch, "LANG": "C.UTF-8"})
    if egress_port:
        os.environ.update(proxy_environment(egress_port))


def _limits(plan: RunPlan) -> dict[str, int]:
    c = plan.spec.constraints
    wanted = {
        "RLIMIT_CORE": 0,
        "RLIMIT_NOFILE": 1024,
        "RLIMIT_FSIZE": int(ceiling(c.max_file_mb, plan.settings.max_file_mb) * MiB),
        "RLIMIT_AS": int(ceiling(c.max_memory_mb, plan.settings.max_memory_mb) * MiB),
        "RLIMIT_CPU": int(plan.deadline_seconds * 2 + 10),
        "RLIMIT_NPROC": int(ceiling(c.max_processes, plan.settings.max_processes)),
    }
    applied = {}
    for name, value in wanted.items():
        kind = getattr(resource, name)
        _soft, hard = resource.getrlimit(kind)
        value = value if hard == resource.RLIM_INFINITY else min(value, hard)
        try:
            resource.setrlimit(kind, (value, value))
            applied[name] = value
        except (ValueError, OSError):
            pass
    return applied


def spec_paths(plan: RunPlan) -> list[tuple[str, str, set[str]]]:
    """(tool, path, permissions) of every path the spec gives a tool, expanded, as written. Only tools that
    use paths get them (``path_access``): a memory tool's or http_get's paths give nothing."""
    out = []
    for tool in plan.spec.tools:
        if tool.agent or tool.remote_agent:
            continue  # no paths: the agent asked has its own
        perms = set(path_access(tool_info(tool.name, plan.custom_sources), tool.permissions))
        if not perms:
            continue
        out += [(tool.name, os.path.normpath(os.path.abspath(expand(raw, plan.variables))), perms)
                for raw in tool.paths]
    return out


def check_paths(plan: RunPlan, protected: list[tuple[str, str]]) -> None:
    """On the supervisor's side, before the run starts: no spec path overlaps the runner's or the
    system's folders now (the settings, or a link on the way, may have changed since validation;
    after this, the run's rules refuse any link, so what was checked is what the rules get)."""
    for tool, path, _perms in spec_paths(plan):
        reason = overlap_reason(path, protected)
        if reason:
            raise DeniedError(f"tool {tool}: {reason}")


def ceiling(asked: int | None, operator: int) -> int:
    """What a spec asks for, but never more than the operator's setting: AGENT_ORCH_MAX_* are the
    default and the ceiling (a spec is the attacker's to write)."""
    return min(asked, operator) if asked else operator


def _paths(plan: RunPlan) -> tuple[set[str], set[str]]:
    """The spec's read and write paths, as written (not resolved: the rules refuse a symbolic link on
    the way, which an earlier run could have planted in a write path)."""
    readable: set[str] = set()
    writable: set[str] = set()
    for _tool, path, perms in spec_paths(plan):
        if "write" in perms:
            writable.add(path)
        elif perms & {"read", "execute"}:
            readable.add(path)
    return readable, writable


def _own_folders(plan: RunPlan) -> set[str]:
    """The run's scratch folder: in the home, made by the runner, never by a run, so its rule may
    follow links (a home reached through one keeps working)."""
    # No state database, no log folder and no memory store: the run reports its steps over its channel,
    # and asks its memory of the control plane there (runner.agent.asking).
    return {str(plan.scratch)}


@functools.cache
def _runtime_paths() -> frozenset[str]:
    """What a run reads and executes: the interpreter and its libraries, the runner's own package, the
    system's libraries and programs, a few /etc files. Not sys.path's other entries: an interpreter
    started with ``-m`` puts its working directory there (a daemon's is often its home)."""
    import runner

    paths = {sys.prefix, sys.base_prefix, sys.exec_prefix, os.path.dirname(os.path.realpath(sys.executable)),
             os.path.dirname(os.path.realpath(runner.__file__))}
    for key in ("stdlib", "platstdlib", "purelib", "platlib"):
        paths.add(sysconfig.get_paths()[key])
    paths.update(p for p in sys.path if p and os.path.isdir(p) and os.path.isabs(p)
                 and os.path.realpath(p) != os.path.realpath(os.getcwd()))
    paths.update(SYSTEM)
    paths.update(f"/etc/{name}" for name in ETC_FILES)
    return frozenset(p for p in paths if os.path.exists(p))


def runtime_paths(plan: RunPlan) -> list[str]:
    """``_runtime_paths`` without any that overlaps the runner's own files (a venv that holds the home,
    say): those a run does without."""
    return sorted(p for p in _runtime_paths() if overlap_reason(p, plan.private) is None)


def runtime_overlaps(private: list[tuple[str, str]]) -> list[tuple[str, str]]:
    """Those of the runner's own folders that overlap a runtime path (a venv holding the home, say):
    the only ones a run is told of, so that it leaves those runtime paths out."""
    return [p for p in private if any(overlap_reason(r, [p]) for r in _runtime_paths())]


def model_endpoints(plan: RunPlan, *, tls: bool = False) -> set[tuple[str, int]]:
    """(host, port) of the model servers the run talks to: its chat model's (none for a scripted
    model; memory's embeddings are the control plane's). ``tls``: only those on https."""
    s = plan.settings
    urls = []
    if not plan.spec.model.startswith("scripted:"):
        urls.append(s.langchain_api_url if plan.spec.model.startswith("openai:") else s.ollama_host)
    return {_host_port(url) for url in urls if not tls or url.startswith("https://")}


def _host_port(url: str) -> tuple[str, int]:
    parsed = urllib.parse.urlsplit(url if "://" in url else f"http://{url}")
    host = (parsed.hostname or "localhost").lower()
    host = "127.0.0.1" if host in ("0.0.0.0", "::") else host  # a listening address clients reach on loopback
    return host, parsed.port or (443 if parsed.scheme == "https" else 80)
