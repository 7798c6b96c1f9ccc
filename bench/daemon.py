"""The daemon (issue 4): dispatch latency, throughput, idle cost. Each beside a baseline of the same run.

- dispatch: from a run being submitted to its first line of agent code (the run's first log line),
  warm, beside a cold `python -c "import langchain_core..., langchain_openai, langchain_ollama"`.
  Goal (issue 12): at least 100x faster than cold.
- throughput: 1,000 scripted runs of a trivial agent through a real daemon with MAX_AGENTS=10, sandbox
  strict; runs per second and every ledger row present, beside a cold process per run (what cron and a
  LangChain script do), and where the CPU of a run goes. Goal (issue 12): at least 150 runs/s on 2 cores.
- idle: a daemon with 1,000 applied agents for a minute: its RSS and CPU, beside an idle
  `python -c "import time; time.sleep(60)"`.
"""

from __future__ import annotations

import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import duckdb

from bench import commit_all
from runner.supervise.control import call, socket_path

RUNS = int(os.environ.get("BENCH_DAEMON_RUNS", "1000"))
IDLE_SECONDS = float(os.environ.get("BENCH_IDLE_SECONDS", "60"))


def make_repo(root: Path, agents: int, schedule: bool = False) -> Path:
    repo = root / "repo"
    (repo / "specs" / "_scripts").mkdir(parents=True)
    (repo / "specs" / "_scripts" / "done.yaml").write_text("turns:\n  - content: done\n")
    for i in range(agents):
        trig = "triggers:\n  - type: schedule\n    cron: \"0 3 * * *\"\n" if schedule else ""
        (repo / "specs" / f"a{i:04d}.yaml").write_text(
            f"name: a{i:04d}\ndescription: trivial\nmodel: scripted:_scripts/done.yaml\noverlap: queue\n{trig}")
    commit_all(repo, "agents")
    return repo


def start_daemon(home: Path, repo: Path, *, python: tuple[str, ...] = ("-m", "runner"), serve: tuple[str, ...] = (),
                 out: Path | None = None, **env: str) -> subprocess.Popen[bytes]:
    """`serve` on ``home`` from ``repo`` (``python``: what runs it, ``serve``: its options, ``out``: where its output
    goes, else nowhere), once it answers on its control socket."""
    with open(out, "wb") if out is not None else open(os.devnull, "wb") as sink:
        proc = subprocess.Popen([sys.executable, *python, "--home", str(home), "serve", *serve],
                                env={**os.environ, "AGENT_ORCH_SOURCE": str(repo), "AGENT_ORCH_SYNC_INTERVAL": "3600",
                                     **env}, stdout=sink, stderr=subprocess.STDOUT)
    sock = socket_path(home, "default")
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and proc.poll() is None:
        try:
            if call(sock, {"op": "ping"}, timeout=2):
                return proc
        except OSError:
            pass
        time.sleep(0.05)
    proc.kill()
    said = f"; its output: {out.read_text(errors='replace')[-2000:]}" if out is not None else ""
    raise RuntimeError(f"the daemon did not start{said}")


def stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(timeout=120)


def cold_import() -> float:
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", "import langchain_core.language_models, langchain_core.tools, "
                    "langchain_openai, langchain_ollama"], check=True)
    return time.perf_counter() - t


def dispatch(root: Path) -> None:
    repo = make_repo(root / "d", 1)
    home = root / "d" / "home"
    proc = start_daemon(home, repo)
    sock = socket_path(home, "default")
    try:
        latencies = []
        for _ in range(20):
            before = time.time()
            answer = call(sock, {"op": "run", "agent": "a0000", "wait": True})
            assert answer and answer["status"] == "succeeded", answer
            log = (home / "logs" / "agents" / "a0000.log").read_text().splitlines()
            first = next(line for line in log if f"run={answer['run_id']}" in line)
            started = datetime.fromisoformat(first.split()[0].replace("Z", "+00:00")).timestamp()
            latencies.append(started - before)
    finally:
        stop(proc)
    warm = statistics.median(latencies)
    cold = min(cold_import() for _ in range(3))
    print(f"daemon: dispatch, submit to first line of agent code (median of 20)  {warm * 1000:8.1f} ms")
    print(f"daemon: cold python importing LangChain (best of 3, baseline)         {cold * 1000:8.1f} ms   "
          f"ratio {cold / max(warm, 1e-4):.0f}x faster (goal >= 100x)")


def throughput(root: Path) -> None:
    repo = make_repo(root / "t", 10)
    home = root / "t" / "home"
    proc = start_daemon(home, repo, MAX_AGENTS="10")
    sock = socket_path(home, "default")
    zygote = next(p for p in _children(proc.pid)[1:] if b"runner.agent.spawning" in
                  Path(f"/proc/{p}/cmdline").read_bytes())
    try:
        before = _split(proc.pid, zygote)
        t = time.perf_counter()
        for i in range(RUNS):
            answer = call(sock, {"op": "run", "agent": f"a{i % 10:04d}", "wait": False})
            assert answer and answer.get("ok"), answer
        while True:  # the daemon says when nothing is queued or running any more
            answer = call(sock, {"op": "ping"})
            if answer and answer["running"] + answer["queued"] == 0:
                break
            time.sleep(0.05)
        elapsed = time.perf_counter() - t
        after = _split(proc.pid, zygote)
    finally:
        stop(proc)  # the daemon flushes the ledger as it stops
    con = duckdb.connect(str(home / "runs.duckdb"), read_only=True)
    rows = _one(con, "SELECT count(*) FROM runs WHERE status = 'succeeded'")
    failed = _one(con, "SELECT count(*) FROM runs WHERE status != 'succeeded'")
    events = _one(con, "SELECT count(*) FROM run_events")
    con.close()
    cold = _cold_rate()
    print(f"daemon: {RUNS} runs through the daemon, MAX_AGENTS=10, sandbox strict: {elapsed:6.1f} s = "
          f"{RUNS / elapsed:6.1f} runs/s (goal >= 150); {rows} succeeded rows in the ledger, {events} events, "
          f"{failed} not succeeded")
    print(f"daemon: baseline, a cold process per run (cron and a LangChain script), 2 at a time: {cold:6.1f} runs/s   "
          f"ratio {RUNS / elapsed / cold:.0f}x")
    used = {k: (after[k] - before[k]) * 1000 / RUNS for k in before}
    other = used["machine"] - used["daemon"] - used["zygote"] - used["runs"]
    print(f"daemon: CPU per run (ms): daemon {used['daemon']:.1f} (submit, plan, channel, live store, ledger flush), "
          f"zygote {used['zygote']:.1f} (clone, reap), run process {used['runs']:.1f} (its own rusage), "
          f"everything else on the machine {other:.1f} (kernel work done later: namespaces torn down; and "
          f"whatever else runs here); total {used['machine']:.1f} = {2000 / max(used['machine'], 0.01):.0f} runs/s "
          f"on 2 cores at most")


def _one(con: Any, sql: str) -> int:
    """The first column of the first row (a DuckDB or a SQLite connection)."""
    row = con.execute(sql).fetchone()
    return int(row[0]) if row else 0


def _cold_rate(n: int = 10) -> float:
    """Runs per second of what cron does: a new Python importing LangChain each time, two at once (2 cores)."""
    t = time.perf_counter()
    for _ in range(n // 2):
        procs = [subprocess.Popen([sys.executable, "-c", "import langchain_core.language_models, "
                                   "langchain_core.tools"]) for _ in range(2)]
        for p in procs:
            p.wait()
    return n / (time.perf_counter() - t)


def _split(daemon: int, zygote: int) -> dict[str, float]:
    """CPU seconds so far: the daemon's own, the zygote's own, the runs' (reaped children of the zygote),
    and the machine's (all CPUs, busy time)."""
    ticks = os.sysconf("SC_CLK_TCK")

    def stat(pid: int) -> list[str]:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()

    d, z = stat(daemon), stat(zygote)
    cpu = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return {"daemon": (int(d[11]) + int(d[12])) / ticks, "zygote": (int(z[11]) + int(z[12])) / ticks,
            "runs": (int(z[13]) + int(z[14])) / ticks, "machine": (sum(cpu) - cpu[3] - cpu[4]) / ticks}


def _cpu_rss(pids: list[int]) -> tuple[float, float]:
    ticks = os.sysconf("SC_CLK_TCK")
    cpu = rss = 0.0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
            cpu += (int(fields[11]) + int(fields[12])) / ticks
            rss += int(fields[21]) * os.sysconf("SC_PAGE_SIZE") / 1e6
        except FileNotFoundError:
            pass
    return cpu, rss


def _children(pid: int) -> list[int]:
    out = [pid]
    for task in Path(f"/proc/{pid}/task").iterdir():
        children = (task / "children").read_text().split()
        for child in children:
            out.extend(_children(int(child)))
    return out


def idle(root: Path) -> None:
    repo = make_repo(root / "i", 1000, schedule=True)
    home = root / "i" / "home"
    proc = start_daemon(home, repo)
    baseline = subprocess.Popen([sys.executable, "-c", f"import time; time.sleep({IDLE_SECONDS + 5})"])
    try:
        time.sleep(2)
        pids = _children(proc.pid)
        cpu0, _ = _cpu_rss(pids)
        base0, _ = _cpu_rss([baseline.pid])
        time.sleep(IDLE_SECONDS)
        cpu1, rss = _cpu_rss(pids)
        base1, base_rss = _cpu_rss([baseline.pid])
    finally:
        stop(proc)
        baseline.kill()
    print(f"daemon: idle with 1000 agents for {IDLE_SECONDS:.0f} s: CPU {(cpu1 - cpu0) / IDLE_SECONDS * 100:5.2f}% "
          f"of a core, RSS {rss:6.1f} MB (daemon and zygote); baseline sleeping python: "
          f"CPU {(base1 - base0) / IDLE_SECONDS * 100:5.2f}%, RSS {base_rss:5.1f} MB")


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-daemon-"))
    try:
        dispatch(root)
        throughput(root)
        idle(root)
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
