"""The dashboard (issue 16): each page's time on a ledger of 100,000 runs (BENCH_UI_RUNS), 1,000 agents applied,
beside the API's GET /runs?limit=50 on the same daemon in the same run. Goal: every page under 200 ms.

Each page is fetched BENCH_UI_REPEAT (20) times one after another, on one keep-alive connection, with the session
cookie a login sets (the token itself; docs/dashboard.md): the median and the slowest are printed. The ledger is
filled as bench/api.py fills it (archived runs of 10 agents, 1 in 7 failed).
"""

from __future__ import annotations

import http.client
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import ENV
from bench.api import fill_runs, free_port, wait_http
from bench.daemon import make_repo
from runner.api.app import SESSION_COOKIE

RUNS = int(os.environ.get("BENCH_UI_RUNS", "100000"))
REPEAT = int(os.environ.get("BENCH_UI_REPEAT", "20"))
GOAL_MS = 200.0


def _times(port: int, path: str, headers: dict[str, str]) -> list[float]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    out = []
    for _ in range(REPEAT + 1):  # the first warms the page's caches and is not counted
        t = time.perf_counter()
        conn.request("GET", path, headers=headers)
        resp = conn.getresponse()
        resp.read()
        if resp.status != 200:
            raise RuntimeError(f"GET {path}: {resp.status}")
        out.append(time.perf_counter() - t)
    conn.close()
    return out[1:]


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-ui-"))
    proc = None
    try:
        repo = make_repo(root, 1000)
        home = root / "home"
        home.mkdir()
        env = {**os.environ, **ENV, "AGENT_ORCH_SOURCE": str(repo)}
        subprocess.run([sys.executable, "-m", "runner", "--home", str(home), "apply"], check=True, env=env,
                       capture_output=True)
        fill_runs(home, RUNS)
        token = subprocess.run([sys.executable, "-m", "runner", "--home", str(home), "token", "create", "--role",
                                "operator"], check=True, capture_output=True, text=True, env=env).stdout.strip()
        port = free_port()
        proc = subprocess.Popen([sys.executable, "-m", "runner", "--home", str(home), "serve", "--port", str(port)],
                                env={**env, "AGENT_ORCH_SYNC_INTERVAL": "3600"}, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL)
        wait_http(port, "/healthz")
        import duckdb

        con = duckdb.connect(str(home / "runs.duckdb"), read_only=True)
        (run_id,) = con.execute("SELECT max(run_id) FROM runs").fetchone()  # type: ignore[misc]
        con.close()
        cookie = {"Cookie": f"{SESSION_COOKIE}={token}"}
        base = _times(port, "/agents/v1/runs?limit=50", {"Authorization": f"Bearer {token}"})
        pages = ["/ui/", "/ui/agents/a0001", "/ui/runs", "/ui/runs?agent=a0003&status=failed", f"/ui/runs/{run_id}",
                 "/ui/workflows", "/ui/approvals", "/ui/activity", "/ui/health"]
        results = {page: _times(port, page, cookie) for page in pages}
    finally:
        if proc is not None:
            proc.terminate()
            proc.wait(timeout=60)
        shutil.rmtree(root, ignore_errors=True)
    ms = 1000
    slowest = max(max(t) for t in results.values())
    for page, times in results.items():
        print(f"ui: {page:40s} median {statistics.median(times) * ms:6.1f} ms  slowest {max(times) * ms:6.1f} ms  "
              f"({statistics.median(times) / statistics.median(base):.1f}x the API's page of runs)")
    met = "met" if slowest * ms < GOAL_MS else "NOT met"
    print(f"ui: baseline GET /agents/v1/runs?limit=50 ({RUNS:,} runs): median {statistics.median(base) * ms:.1f} ms | "
          f"slowest page load {slowest * ms:.1f} ms (goal < {GOAL_MS:.0f} ms: {met})")


if __name__ == "__main__":
    main()
