"""Memory per concurrent run: a real daemon (sandbox strict, MAX_AGENTS=100) with 100 runs of 100 agents
in flight at once, each waiting on a scripted model that sleeps. Goal: at most 8 MB a run; the daemon
itself under 100 MB.

Everything is observed from outside: the daemon's process tree in /proc, the runs in flight on its
/metrics. Memory is PSS (/proc/PID/smaps_rollup): a page shared by k processes counts 1/k in each, so
the sum over the daemon and all its descendants is what the tree costs the machine, and a run's cost is
what that sum grows by over the same daemon idle, measured in the same run before the runs were
submitted (the zygote's pages, shared with every run, are then counted once, whatever the number of
runs). Beside it: a bare python, and one that imports langchain_core. Then each process of a run, on
average: its PSS and its private dirty pages, what it wrote after it was forked (its own objects, and
the zygote's pages it touched, refcounts included, copied on write). Page tables are not in PSS: they
are printed apart (VmPTE), and so is the kernel's slab (namespaces, sockets), machine-wide.

BENCH_RUNMEM_RUNS scales it (default 100).
"""

from __future__ import annotations

import os
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from bench import commit_all
from bench.api import free_port
from bench.daemon import start_daemon
from runner.supervise.control import call, socket_path

RUNS = int(os.environ.get("BENCH_RUNMEM_RUNS", "100"))
SLEEP = 300  # seconds the model takes on its first turn: more than the bench lasts; the runs are stopped
START_TIMEOUT = 180.0
FIELDS = ("Rss", "Pss", "Pss_Anon", "Pss_File", "Shared_Clean", "Shared_Dirty", "Private_Clean", "Private_Dirty")


@dataclass
class Proc:
    pid: int
    ppid: int
    cpu: int  # utime + stime, clock ticks
    start: int  # start time after boot, clock ticks: with the pid, names one process
    children: list[int] = field(default_factory=list)


def make_repo(root: Path, agents: int) -> Path:
    """``agents`` agents whose scripted model sleeps SLEEP seconds, then answers."""
    repo = root / "repo"
    (repo / "specs" / "_scripts").mkdir(parents=True)
    (repo / "specs" / "_scripts" / "slow.yaml").write_text(f"turns:\n  - sleep: {SLEEP}\n    content: done\n")
    for i in range(agents):
        (repo / "specs" / f"r{i:04d}.yaml").write_text(
            f"name: r{i:04d}\ndescription: waits on a slow model\nmodel: scripted:_scripts/slow.yaml\n")
    commit_all(repo, "agents")
    return repo


def processes() -> dict[int, Proc]:
    """Every process on the machine (thread group leaders), with its parent, CPU time and children."""
    out: dict[int, Proc] = {}
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:  # gone
            continue
        out[int(entry)] = Proc(int(entry), int(fields[1]), int(fields[11]) + int(fields[12]), int(fields[19]))
    for p in out.values():
        if p.ppid in out:
            out[p.ppid].children.append(p.pid)
    return out


def subtree(procs: dict[int, Proc], pid: int) -> list[int]:
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        if p in procs:
            out.append(p)
            todo.extend(procs[p].children)
    return out


def rollup(pid: int) -> dict[str, int]:
    """smaps_rollup of ``pid`` in kB, with VmPTE (its page tables); empty if it is gone or a zombie."""
    try:
        text = Path(f"/proc/{pid}/smaps_rollup").read_text()
        status = Path(f"/proc/{pid}/status").read_text()
    except OSError:
        return {}
    out = {}
    for line in [*text.splitlines()[1:], *status.splitlines()]:
        name, _, rest = line.partition(":")
        if name in (*FIELDS, "VmPTE"):
            out[name] = int(rest.split()[0])
    return out if "Pss" in out else {}


def total(rolls: dict[int, dict[str, int]], pids: list[int], key: str = "Pss") -> float:
    """``key`` summed over ``pids``, in MB."""
    return sum(rolls.get(p, {}).get(key, 0) for p in pids) / 1024


def slab() -> float:
    """The kernel's slab, machine-wide, in MB."""
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("Slab:"):
            return int(line.split()[1]) / 1024
    return 0.0


def in_flight(port: int) -> int:
    """Runs in flight, as the daemon's /metrics says (every client's)."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    found = re.findall(r"^agent_orch_runs_in_flight(?:\{[^}]*\})? ([0-9.e+]+)$", text, re.M)
    return int(sum(float(v) for v in found))


def zygote_of(procs: dict[int, Proc], daemon: int) -> int:
    """The daemon's long-lived child that forks runs: a child running the daemon's own interpreter (not,
    say, a git it started), the one with the most descendants, the oldest of those."""
    if daemon not in procs:
        raise RuntimeError("the daemon exited")
    exe = os.readlink(f"/proc/{daemon}/exe")

    def same_exe(pid: int) -> bool:
        try:
            return os.readlink(f"/proc/{pid}/exe") == exe
        except OSError:
            return False

    kids = [k for k in procs[daemon].children if same_exe(k)]
    if not kids:
        raise RuntimeError("the daemon has no child running python: no zygote")
    return min(kids, key=lambda k: (-len(subtree(procs, k)), procs[k].start))


def idle_zygote(daemon: int, timeout: float = 120.0) -> None:
    """Until the zygote is there and has used no CPU for a second (it warms up after the daemon answers)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        procs = processes()
        try:
            zygote = zygote_of(procs, daemon)
        except RuntimeError:
            if daemon not in procs:
                raise
            time.sleep(0.2)
            continue
        time.sleep(1)
        after = processes().get(zygote)
        if after is not None and after.cpu == procs[zygote].cpu:
            return
    raise RuntimeError(f"the zygote was not idle within {timeout:.0f} s")


def wait_running(daemon: int, port: int) -> tuple[dict[int, Proc], int]:
    """Until RUNS runs are in flight on /metrics, the zygote has RUNS children with as many processes
    each, and none of those processes has used CPU for two seconds (they wait on the model). Then: the
    process table and the zygote's pid."""
    deadline = time.monotonic() + START_TIMEOUT
    still = 0
    last: dict[int, int] = {}
    while time.monotonic() < deadline:
        time.sleep(0.5)
        procs = processes()
        zygote = zygote_of(procs, daemon)
        runs = procs[zygote].children
        cpu = {p: procs[p].cpu for p in subtree(procs, zygote) if p != zygote}
        settled = len(runs) == RUNS and len({len(subtree(procs, r)) for r in runs}) == 1 and cpu == last
        try:
            settled = settled and in_flight(port) == RUNS
        except OSError:
            settled = False
        still = still + 1 if settled else 0
        last = cpu
        if still >= 4:
            return procs, zygote
    raise RuntimeError(f"{RUNS} runs were not all waiting on the model within {START_TIMEOUT:.0f} s")


def python_pss(code: str) -> float:
    """PSS in MB of a fresh ``python -c CODE`` once it has run CODE."""
    proc = subprocess.Popen([sys.executable, "-c", f"{code}\nimport time\nprint(flush=True)\ntime.sleep(60)"],
                            stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None
        proc.stdout.readline()
        return rollup(proc.pid).get("Pss", 0) / 1024
    finally:
        proc.kill()
        proc.wait()


def describe(pid: int) -> str:
    """Where one of a run's processes stands: its PID namespace and its threads."""
    try:
        status = Path(f"/proc/{pid}/status").read_text().splitlines()
    except OSError:
        return "gone"
    nspid = next((line.split()[1:] for line in status if line.startswith("NSpid:")), [])
    threads = next((line.split()[1] for line in status if line.startswith("Threads:")), "?")
    where = f"pid {nspid[-1]} of its own PID namespace" if len(nspid) > 1 else "in the daemon's PID namespace"
    return f"{where}, {threads} thread(s)"


def leftovers(seen: dict[int, int], timeout: float = 30.0) -> list[int]:
    """Which of the processes ``seen`` (pid: start time) are still there after ``timeout`` seconds."""
    deadline = time.monotonic() + timeout
    while True:
        now = processes()
        left = sorted(p for p, start in seen.items() if p in now and now[p].start == start)
        if not left or time.monotonic() > deadline:
            return left
        time.sleep(0.1)


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-runmem-"))
    proc: subprocess.Popen[bytes] | None = None
    seen: dict[int, int] = {}  # every process of the daemon's tree we saw: pid -> start time
    try:
        repo = make_repo(root, RUNS)
        home = root / "home"
        port = free_port()
        bare = python_pss("pass")
        langchain = python_pss("import langchain_core")
        langchain_run = python_pss("import langchain_core.language_models, langchain_core.tools")
        proc = start_daemon(home, repo, MAX_AGENTS=str(RUNS), AGENT_ORCH_PORT=str(port),
                            AGENT_ORCH_SHUTDOWN_GRACE="1")
        idle_zygote(proc.pid)
        procs = processes()
        idle_tree = subtree(procs, proc.pid)
        seen.update((p, procs[p].start) for p in idle_tree)
        idle = {p: rollup(p) for p in idle_tree}
        idle_slab = slab()

        sock = socket_path(home, "default")
        t = time.perf_counter()
        for i in range(RUNS):
            answer = call(sock, {"op": "run", "agent": f"r{i:04d}", "wait": False})
            assert answer and answer.get("ok"), answer
        procs, zygote = wait_running(proc.pid, port)
        settled = time.perf_counter() - t
        tree = subtree(procs, proc.pid)
        seen.update((p, procs[p].start) for p in tree)
        rolls = {p: rollup(p) for p in tree}
        busy_slab = slab()
        runs = procs[zygote].children
        run_procs = [p for r in runs for p in subtree(procs, r)]
        others = [p for p in tree if p not in (proc.pid, zygote) and p not in run_procs]
        # Each run's processes, level by level: the run process, then what it forked, and so on.
        levels: list[list[int]] = []
        level = list(runs)
        while level:
            levels.append(level)
            level = [c for p in level for c in procs[p].children]
        labels = []
        pid = runs[0]
        for _ in levels:
            labels.append(describe(pid))
            pid = procs[pid].children[0] if procs[pid].children else pid
    finally:
        if proc is not None:
            if proc.poll() is None:
                now = processes()
                seen.update((p, now[p].start) for p in subtree(now, proc.pid))
            proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=120)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        left = leftovers(seen)
        for p in left:  # ours, by pid and start time: not to be left behind
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        shutil.rmtree(root, ignore_errors=True)
    if left:
        raise RuntimeError(f"processes of the daemon's tree left running 30 s after it stopped: {left}")

    assert proc is not None
    all_mb, idle_mb = total(rolls, tree), total(idle, idle_tree)
    daemon_mb, zygote_mb = total(rolls, [proc.pid]), total(rolls, [zygote])
    runs_mb = total(rolls, run_procs)
    per_run = len(run_procs) // RUNS
    print(f"runmem: {RUNS} runs waiting on a slow model: total PSS {all_mb:7.1f} MB = "
          f"{(all_mb - idle_mb) / RUNS:5.2f} MB per run over the idle daemon and zygote (goal <= 8 MB); "
          f"daemon {daemon_mb:5.1f} MB (goal < 100 MB); zygote {zygote_mb:5.1f} MB; {per_run} processes per run "
          f"(settled {settled:.1f} s after the first submission)")
    print(f"runmem: idle, before the runs (baseline): daemon {total(idle, [proc.pid]):5.1f} MB, zygote "
          f"{total(idle, [zygote]):5.1f} MB, together {idle_mb:5.1f} MB; a bare python {bare:5.1f} MB, "
          f"importing langchain_core {langchain:5.1f} MB, its language_models and tools {langchain_run:5.1f} MB")
    print(f"runmem: the runs' processes alone {runs_mb:7.1f} MB = {runs_mb / RUNS:5.2f} MB per run, of which "
          f"private dirty {total(rolls, run_procs, 'Private_Dirty') / RUNS:5.2f} MB; the daemon grew "
          f"{(daemon_mb - total(idle, [proc.pid])) * 1024 / RUNS:4.0f} kB per run; other descendants of the "
          f"daemon: {len(others)}, {total(rolls, others):5.1f} MB")
    print(f"runmem: not in PSS: the runs' page tables {total(rolls, run_procs, 'VmPTE') / RUNS * 1024:4.0f} kB "
          f"per run; the kernel's slab grew {(busy_slab - idle_slab) / RUNS * 1024:4.0f} kB per run "
          f"(namespaces, sockets; machine-wide, so whatever else runs here counts too)")
    for depth, pids in enumerate(levels):
        what = "run process" if depth == 0 else f"its child (depth {depth})"
        rows = [rolls[p] for p in pids if rolls.get(p)]
        mean = {k: statistics.mean(r.get(k, 0) for r in rows) / 1024 for k in (*FIELDS, "VmPTE")}
        print(f"runmem:   {what:22s} x{len(rows):<4d} {labels[depth]:42s} PSS {mean['Pss']:5.2f} MB "
              f"(anon {mean['Pss_Anon']:5.2f}, file {mean['Pss_File']:4.2f}); private dirty "
              f"{mean['Private_Dirty']:5.2f} MB, clean {mean['Private_Clean']:4.2f}; shared "
              f"{mean['Shared_Clean'] + mean['Shared_Dirty']:5.1f} MB; RSS {mean['Rss']:5.1f} MB; "
              f"page tables {mean['VmPTE'] * 1024:4.0f} kB")


if __name__ == "__main__":
    main()
