"""The warm parent that runs are forked from, and the first steps of every run process.

Why a separate process: whatever a run's parent holds at the fork, the run holds too - its open
descriptors (Landlock does not restrict those), its memory (settings, secrets, other runs' inputs)
and the environment it was exec'd with (``/proc/self/environ``). So runs are never forked from the
daemon or the CLI. They are forked from this one, which is exec'd with a clean environment, loads the
code (LangChain's import and first-use costs are paid once here), opens nothing, reads no settings,
and never sees a plan: each run receives its plan on its own channel, after the fork.

Protocol on the control socket (SOCK_SEQPACKET, one JSON object per message):
- supervisor -> zygote: ``{"op": "fork", "run_id": ID}`` with one descriptor, the run's channel;
- zygote -> supervisor: ``{"op": "ready"}`` once warm; ``{"op": "started", "run_id", "pid"}`` with a
  pidfd of the run process; ``{"op": "exited", "run_id", "status"}`` (a wait status) when it is reaped.
EOF on the control socket ends the zygote; its runs die with it (PR_SET_PDEATHSIG).

The run process (``run_child``) then, before any agent code:
1. keeps only its channel, with /dev/null as its stdio, in a session of its own (no terminal);
2. reads its plan from the channel;
3. enters its namespaces (user where not root, PID, IPC, UTS, mount) and forks PID 1 of them, which
   runs the agent; the outer process waits for it and passes its exit on;
4. as PID 1: its process limit, its network namespace (the egress listener goes to the supervisor
   over the channel), a size-capped tmpfs as its scratch folder; then ``confine`` (environment,
   rlimits, output capture, capabilities, Landlock, seccomp) and ``execute``.
"""

from __future__ import annotations

import gc
import json
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from collections.abc import Callable
from typing import Any

from runner.errors import OrchestratorError

CHILD_FAILED = 70
CONTROL_MESSAGE = 4096
READY_TIMEOUT = 120.0  # seconds for the zygote to import what runs need (LangChain: a few on a busy machine)


def main() -> None:
    control = socket.socket(fileno=int(sys.argv[1]))
    supervisor = int(next((a.split("=", 1)[1] for a in sys.argv if a.startswith("--supervisor=")), "0"))
    _die_with_parent(expected=supervisor or None)
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # the supervisor decides when runs stop
    wake_r, wake_w = os.pipe()
    os.set_blocking(wake_w, False)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    # The BLAS and OpenMP libraries NumPy loads start no thread pool: the zygote stays single-threaded, so
    # a clone leaves no lock or pool behind that only another thread could release (see _spawn). Read
    # when they load, then dropped: runs see only PATH and LANG.
    threads = {"OPENBLAS_NUM_THREADS": "1", "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    os.environ.update(threads)
    from runner.agent.warming import warm
    from runner.sandbox.confining import warm as warm_sandbox

    warm()
    warm_sandbox()
    for name in threads:
        del os.environ[name]
    gc.freeze()  # what the zygote built stays shared: a run's collections never touch (and copy) its pages
    alive = os.pipe()  # the zygote holds both ends while it lives: EOF on the read end says it died
    try:
        control.sendall(json.dumps({"op": "ready", "pid": os.getpid()}).encode())
    except OSError:  # the supervisor is gone already
        return
    children: dict[int, str] = {}
    while True:
        ready, _, _ = select.select([control.fileno(), wake_r], [], [])
        if wake_r in ready:
            os.read(wake_r, 4096)
        _reap(control, children)
        if control.fileno() not in ready:
            continue
        try:
            data, fds, _flags, _addr = socket.recv_fds(control, CONTROL_MESSAGE, 1)
        except OSError:
            break
        if not data:
            break
        request = json.loads(data)
        if request.get("op") != "fork" or len(fds) != 1:
            for fd in fds:
                os.close(fd)
            continue
        run_id = str(request["run_id"])
        me, ids = os.getpid(), (os.getuid(), os.getgid())
        pid, entered = _spawn(bool(request.get("isolate")))
        if pid == 0:
            control.close()
            os.close(wake_r)
            os.close(wake_w)
            run_child(fds[0], zygote=me, entered=entered, ids=ids, alive=alive)
        os.close(fds[0])
        children[pid] = run_id
        pidfd = os.pidfd_open(pid)
        try:
            socket.send_fds(control, [json.dumps({"op": "started", "run_id": run_id, "pid": pid}).encode()], [pidfd])
        except OSError:
            break
        finally:
            os.close(pidfd)
    for pid in children:  # the supervisor is gone: so are its runs
        _kill(pid)


def _reap(control: socket.socket, children: dict[int, str]) -> None:
    """Report each run process that has exited, with what it used (``usage``). Before reaping it, kill
    what is left of its process group (a run without a PID namespace may leave some): until it is
    reaped its PID, and so the group's id, cannot be reused, so the signal reaches nobody else."""
    while children:
        try:
            info = os.waitid(os.P_ALL, 0, os.WEXITED | os.WNOHANG | os.WNOWAIT)
        except ChildProcessError:
            return
        if info is None:
            return
        _kill(info.si_pid)
        written = _bytes_written(info.si_pid)  # a zombie's counts include the children it reaped
        pid, status, rusage = os.wait4(info.si_pid, 0)
        run_id = children.pop(pid, None)
        if run_id is not None:
            usage = {"cpu_seconds": round(rusage.ru_utime + rusage.ru_stime, 4),
                     "max_rss_mb": round(rusage.ru_maxrss / 1024, 1), "bytes_written": written}
            try:
                control.sendall(json.dumps({"op": "exited", "run_id": run_id, "status": status,
                                            "usage": usage}).encode())
            except OSError:
                pass


def _bytes_written(pid: int) -> int | None:
    """Bytes the process and its reaped children passed to write calls (files, tmpfs, pipes: ``wchar``)."""
    try:
        with open(f"/proc/{pid}/io", "rb") as io:
            fields = dict(line.split(b":", 1) for line in io.read().splitlines() if b":" in line)
        return int(fields[b"wchar"])
    except (OSError, KeyError, ValueError):
        return None


# The clone system call by architecture (the raw call: Python has no clone with namespace flags).
SYS_CLONE = {"x86_64": 56, "aarch64": 220, "riscv64": 220}.get(os.uname().machine)


def _spawn(isolate: bool) -> tuple[int, list[str]]:
    """Fork a run process. With ``isolate``, straight into new PID, IPC, UTS and mount namespaces (and a
    user namespace when not root): the run process is PID 1 of its own PID namespace, so one process per
    run, not a waiting parent beside it. Where the kernel refuses (or the architecture is not known), a
    plain fork: the run then enters what it can itself (``isolating.enter``) and forks once more.
    Returns (pid, the namespaces the child is in)."""
    if isolate and SYS_CLONE is not None and _single_threaded():
        from runner.sandbox import isolating

        user = os.geteuid() != 0
        flags = isolating.CLONE_NEWPID | isolating.CLONE_NEWIPC | isolating.CLONE_NEWUTS | isolating.CLONE_NEWNS | \
            (isolating.CLONE_NEWUSER if user else 0)
        pid = _clone(flags)
        if pid >= 0:
            return pid, [*(["user"] if user else []), "pid", "ipc", "uts", "mnt"]
    return os.fork(), []


def _single_threaded() -> bool:
    """Whether this process has one thread: the raw clone runs no atfork handler, so a library whose
    threads hold a lock, or which must stop its threads before a fork, would leave the child stuck."""
    try:
        return len(os.listdir("/proc/self/task")) == 1
    except OSError:
        return False


def _clone(flags: int) -> int:
    """clone(2) as os.fork does fork(2): the interpreter's before and after hooks around it. The zygote
    is single-threaded, so nothing it holds is half-taken in the child. Returns the pid (0 in the
    child), or -errno."""
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)
    call = libc.syscall
    call.restype = ctypes.c_long
    call.argtypes = [ctypes.c_long] * 6
    api = ctypes.pythonapi
    api.PyOS_BeforeFork()
    pid = call(SYS_CLONE, flags | signal.SIGCHLD, 0, 0, 0, 0)
    error = ctypes.get_errno()
    if pid == 0:
        api.PyOS_AfterFork_Child()
    else:
        api.PyOS_AfterFork_Parent()
    return int(pid) if pid >= 0 else -error


def run_child(channel_fd: int, zygote: int, entered: list[str] | None = None, ids: tuple[int, int] = (0, 0),
              alive: tuple[int, int] | None = None) -> None:
    """The run process: never returns. ``entered``: the namespaces it was cloned into (``_spawn``)."""
    code = CHILD_FAILED
    entered = entered or []
    try:
        signal.set_wakeup_fd(-1)
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGCHLD):
            signal.signal(sig, signal.SIG_DFL)
        if "user" in entered:
            from runner.sandbox import isolating

            isolating.map_user(*ids)
        if alive is not None:
            os.close(alive[1])
        # PID 1 of a new namespace sees no parent pid to check: the zygote's pipe says whether it died first.
        _die_with_parent(expected=None if entered else zygote)
        if entered and alive is not None and select.select([alive[0]], [], [], 0)[0]:
            os._exit(CHILD_FAILED)
        os.setsid()  # no controlling terminal, and a process group the supervisor signals as one
        channel_fd = _keep_only(channel_fd)
        channel = socket.socket(fileno=channel_fd)
        plan = _receive_plan(channel)
        code = _run(plan, channel, entered)
    except BaseException:
        code = CHILD_FAILED
    finally:
        os._exit(code)


def _keep_only(channel_fd: int) -> int:
    """The channel as fd 3, /dev/null as stdin, stdout and stderr, and nothing else open. (The
    zygote's own stdio is open, so the channel is never 0, 1 or 2.)"""
    if channel_fd != 3:
        os.dup2(channel_fd, 3)
    null = os.open(os.devnull, os.O_RDWR)
    for target in (0, 1, 2):
        os.dup2(null, target)
    os.closerange(4, _max_fd())
    os.set_inheritable(3, False)
    return 3


def _max_fd() -> int:
    try:
        return max(int(name) for name in os.listdir("/proc/self/fd")) + 1
    except (OSError, ValueError):
        return os.sysconf("SC_OPEN_MAX")


def _receive_plan(channel: socket.socket) -> Any:
    from runner.agent.channel import VERSION
    from runner.plan import RunPlan

    buf = bytearray()
    while not buf.endswith(b"\n"):
        chunk = channel.recv(1 << 20)
        if not chunk:
            raise EOFError("the supervisor closed the channel before sending the plan")
        buf += chunk
    message = json.loads(bytes(buf))
    if message.get("v") != VERSION or message.get("t") != "plan":
        raise EOFError("the supervisor sent no plan of this channel's version")
    return RunPlan.from_json(message["plan"])


def _run(plan: Any, channel: socket.socket, entered: list[str]) -> int:
    from runner.sandbox import isolating

    if entered:  # PID 1 of its namespaces already (cloned into them): it runs the agent itself
        signal.signal(signal.SIGTERM, lambda *_: os._exit(143))  # PID 1 ignores signals it does not handle
        return _agent(plan, channel, entered)
    sandboxed = plan.settings.sandbox != "off"
    namespaces = isolating.enter() if sandboxed else []
    if namespaces:  # PID 1 of the new namespaces runs the agent; this process waits for it
        alive_r, alive_w = os.pipe()  # EOF on it: this process is gone
        inner = os.fork()
        if inner:
            channel.close()
            os.close(alive_r)
            signal.signal(signal.SIGTERM, lambda *_: os.kill(inner, signal.SIGKILL))
            _pid, status = os.waitpid(inner, 0)
            return os.waitstatus_to_exitcode(status) & 0xFF
        os.close(alive_w)
        _die_with_parent()
        # PID 1 of a new namespace sees no parent pid to check; the pipe says whether it died first.
        if select.select([alive_r], [], [], 0)[0]:
            os._exit(CHILD_FAILED)
        os.close(alive_r)
        signal.signal(signal.SIGTERM, lambda *_: os._exit(143))  # PID 1 ignores signals it does not handle
    return _agent(plan, channel, namespaces)


def _agent(plan: Any, channel: socket.socket, namespaces: list[str]) -> int:
    from runner.agent.channel import encode
    from runner.agent.running import RunResult, execute
    from runner.errors import DeniedError, OrchestratorError
    from runner.sandbox.confining import confine, isolate, output_tail

    def sink(message: dict[str, Any]) -> None:
        channel.sendall(encode(message))
        if select.select([channel], [], [], 0)[0]:  # the supervisor said something: only 'stop' comes now
            os._exit(143)

    asked = iter(range(1, 1 << 62))
    pending = bytearray()

    def ask(question: dict[str, Any]) -> dict[str, Any]:
        """Ask the control plane and wait for its answer (a 'stop' instead ends the run)."""
        ask_id = next(asked)
        channel.sendall(encode({"t": "ask", "id": ask_id, **question}))
        while b"\n" not in pending:
            chunk = channel.recv(1 << 20)
            if not chunk:
                os._exit(143)
            pending.extend(chunk)
        line, _, rest = bytes(pending).partition(b"\n")
        pending[:] = rest
        answer = json.loads(line)
        if answer.get("t") != "answer" or answer.get("id") != ask_id:
            os._exit(143)
        if answer.get("error"):  # refused by policy (a host, the depth, the budget), or failed
            raise (DeniedError if answer.get("denied") else OrchestratorError)(str(answer["error"]))
        return dict(answer)

    isolation = isolate(plan, namespaces, channel)
    try:
        sandbox = confine(plan, isolation)
    except OrchestratorError as exc:
        result = RunResult("failed", error=f"sandbox: {exc.message}")
    else:
        result = execute(isolation.get("plan", plan), sink, sandbox=sandbox, ask=ask)
    tail = output_tail(plan)
    if tail is not None:
        sink({"t": "event", "kind": "log", "name": "output", "decision": None, "detail": tail})
    sink({"t": "result", **json.loads(result.to_json())})
    return 0


def _die_with_parent(sig: int = signal.SIGKILL, expected: int | None = None) -> None:
    """Ask the kernel to send ``sig`` to this process when its parent dies. If the parent (``expected``,
    as this process saw it before the fork) died before the request, nobody would send it: exit now."""
    import ctypes

    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, int(sig), 0, 0, 0)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        pass
    if expected is not None and os.getppid() != expected:
        os._exit(CHILD_FAILED)


def _kill(pid: int) -> None:
    try:
        os.killpg(pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


class Zygote:
    """The supervisor's side: starts the zygote and asks it for run processes. Thread-safe."""

    def __init__(self, on_exit: Callable[[str], None] | None = None) -> None:
        """``on_exit(run_id)`` is called (from the reader thread) when the zygote has reaped a run."""
        self.on_exit = on_exit
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        raise_open_files_limit()
        # -I: no working directory (nor PYTHON* variables) on the zygote's path, and so none in what a
        # run may read; cwd "/": a run starts nowhere in particular.
        self.proc = subprocess.Popen(
            [sys.executable, "-I", "-m", "runner.agent.spawning", str(theirs.fileno()),
             f"--supervisor={os.getpid()}"],
            env=clean_environment(), pass_fds=[theirs.fileno()], stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, cwd="/")
        theirs.close()
        self.control = ours
        self._send = threading.Lock()
        self._cond = threading.Condition()
        self._started: dict[str, tuple[int, int]] = {}
        self._exited: dict[str, tuple[int, dict[str, Any]]] = {}
        self._gone = False
        self._ready = threading.Event()
        self.reader = threading.Thread(target=self._read, name="zygote-reader", daemon=True)
        self.reader.start()

    def fork(self, run_id: str, channel: socket.socket, isolate: bool = True) -> tuple[int, int]:
        """A new run process with ``channel`` as its channel: (pid, pidfd). With ``isolate``, in namespaces
        of its own from the start (see ``_spawn``)."""
        if not self._ready.wait(READY_TIMEOUT) or self._gone:
            raise OrchestratorError(self._why_gone())
        with self._send:
            socket.send_fds(self.control, [json.dumps({"op": "fork", "run_id": run_id, "isolate": isolate}).encode()],
                            [channel.fileno()])
        with self._cond:
            if not self._cond.wait_for(lambda: run_id in self._started or self._gone, READY_TIMEOUT):
                raise OrchestratorError("the zygote did not fork the run in time")
            if run_id not in self._started:
                raise OrchestratorError(self._why_gone())
            return self._started.pop(run_id)

    def exited(self, run_id: str, timeout: float = 5.0) -> tuple[int | None, dict[str, Any]]:
        """The run process's wait status and usage, once the zygote has reaped it ((None, {}) if it does
        not say in ``timeout`` seconds)."""
        with self._cond:
            self._cond.wait_for(lambda: run_id in self._exited or self._gone, timeout)
            return self._exited.pop(run_id, (None, {}))

    def close(self) -> None:
        try:
            self.control.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
        try:
            self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.reader.join(timeout=5)
        self.control.close()

    def _read(self) -> None:
        while True:
            try:
                data, fds, _flags, _addr = socket.recv_fds(self.control, CONTROL_MESSAGE, 1)
            except OSError:
                data, fds = b"", []
            if not data:
                break
            message = json.loads(data)
            with self._cond:
                if message["op"] == "ready":
                    self._ready.set()
                elif message["op"] == "started" and fds:
                    self._started[message["run_id"]] = (int(message["pid"]), fds[0])
                elif message["op"] == "exited":
                    self._exited[message["run_id"]] = (int(message["status"]), dict(message.get("usage") or {}))
                self._cond.notify_all()
            if message["op"] == "exited" and self.on_exit is not None:
                self.on_exit(message["run_id"])
        with self._cond:
            self._gone = True
            self._ready.set()
            self._cond.notify_all()

    def _why_gone(self) -> str:
        code = self.proc.poll()
        return f"the zygote that forks runs is not running (exit status {code}; the log above says why)"


def raise_open_files_limit() -> None:
    """A supervisor serves every run's channel and egress proxy: let it have the descriptors its hard
    limit allows (systemd's soft default is 1,024). Runs set their own, lower, limit."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass


def clean_environment() -> dict[str, str]:
    """What the zygote is exec'd with, and so what every run's /proc/self/environ shows: no secrets."""
    return {"PATH": os.defpath, "LANG": "C.UTF-8"}


if __name__ == "__main__":
    main()
