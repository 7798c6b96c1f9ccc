"""API throughput (issue 5): GET /agents (1,000 agents applied) and GET /runs?limit=50 (100,000 runs),
50 concurrent keep-alive clients in another process, beside waitress serving a trivial Falcon resource
in the same run. Requests per second, p50 and p99 latency, errors. Goal: at least half the trivial
resource's throughput, no errors.

List pages are cached for a second (runner.api.app.PageCache), as dashboards poll the same URLs; the
load here hits the same URL, so it mostly measures the cached path plus auth, audit and metrics.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench import ENV
from bench.daemon import make_repo

CLIENTS = 50
SECONDS = float(os.environ.get("BENCH_API_SECONDS", "10"))
RUNS = int(os.environ.get("BENCH_API_RUNS", "100000"))

LOAD = r"""
import http.client, json, sys, threading, time
host, port, path, token = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
clients, seconds = int(sys.argv[5]), float(sys.argv[6])
lat, errors, lock = [], [0], threading.Lock()
stop = time.monotonic() + seconds
def worker():
    conn = http.client.HTTPConnection(host, port, timeout=30)
    mine = []
    while time.monotonic() < stop:
        t = time.perf_counter()
        try:
            conn.request("GET", path, headers={"Authorization": "Bearer " + token} if token else {})
            resp = conn.getresponse(); resp.read()
            if resp.status != 200:
                with lock: errors[0] += 1
        except Exception:
            with lock: errors[0] += 1
            conn = http.client.HTTPConnection(host, port, timeout=30)
        mine.append(time.perf_counter() - t)
    with lock: lat.extend(mine)
threads = [threading.Thread(target=worker) for _ in range(clients)]
[t.start() for t in threads]; [t.join() for t in threads]
lat.sort()
print(json.dumps({"n": len(lat), "rps": len(lat) / seconds, "p50": lat[len(lat)//2],
                  "p99": lat[int(len(lat)*0.99)], "errors": errors[0]}))
"""

TRIVIAL = r"""
import falcon, sys
from waitress import serve
class Ping:
    def on_get(self, req, resp):
        resp.media = {"ok": True}
app = falcon.App(); app.add_route("/ping", Ping())
serve(app, host="127.0.0.1", port=int(sys.argv[1]), threads=8, _quiet=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_http(port: int, path: str) -> None:
    import urllib.request

    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=2):
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"nothing answered on {port}")


def load(port: int, path: str, token: str = "") -> dict[str, float]:
    out = subprocess.run([sys.executable, "-c", LOAD, "127.0.0.1", str(port), path, token, str(CLIENTS),
                          str(SECONDS)], capture_output=True, text=True, check=True)
    result: dict[str, float] = json.loads(out.stdout)
    return result


def fill_runs(home: Path, n: int) -> None:
    """n finished runs of 10 agents, as the daemon leaves them once archived: in the ledger only (the live
    store keeps runs in flight)."""
    import duckdb

    from runner.ledger.ingesting import ensure_schema

    ddb = duckdb.connect(str(home / "runs.duckdb"))
    ensure_schema(ddb)
    ddb.execute("INSERT INTO runs (run_id, client_id, agent, spec_revision, trigger, status, started_at, ended_at, "
                "input_tokens, output_tokens, model_calls, tool_calls, output) "
                "SELECT printf('%012x%012x', 1700000000000 + i, i), 'default', printf('a%04d', i % 10), "
                "repeat('0', 40), 'schedule', CASE WHEN i % 7 = 0 THEN 'failed' ELSE 'succeeded' END, "
                f"TIMESTAMP '2026-01-01', TIMESTAMP '2026-01-01 00:00:01', 100, 20, 2, 1, 'done' FROM range({n}) t(i)")
    ddb.execute("CHECKPOINT")
    ddb.close()


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-api-"))
    procs: list[subprocess.Popen[bytes]] = []
    try:
        repo = make_repo(root, 1000)
        home = root / "home"
        home.mkdir()
        subprocess.run([sys.executable, "-m", "runner", "--home", str(home), "apply"], check=True,
                       env={**os.environ, **ENV, "AGENT_ORCH_SOURCE": str(repo)}, capture_output=True)
        fill_runs(home, RUNS)
        token = subprocess.run([sys.executable, "-m", "runner", "--home", str(home), "token", "create", "--role",
                                "viewer"], check=True, capture_output=True, text=True).stdout.strip()
        port, trivial_port = free_port(), free_port()
        procs.append(subprocess.Popen([sys.executable, "-m", "runner", "--home", str(home), "serve", "--port",
                                       str(port)], env={**os.environ, "AGENT_ORCH_SOURCE": str(repo),
                                                        "AGENT_ORCH_SYNC_INTERVAL": "3600"},
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        procs.append(subprocess.Popen([sys.executable, "-c", TRIVIAL, str(trivial_port)],
                                      stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_http(port, "/healthz")
        wait_http(trivial_port, "/ping")
        base = load(trivial_port, "/ping")
        for label, path in (("GET /agents (1,000 agents; a page of 50)", "/agents/v1/agents"),
                            ("GET /agents?limit=1000 (all 1,000)", "/agents/v1/agents?limit=1000"),
                            (f"GET /runs?limit=50 ({RUNS:,} runs)", "/agents/v1/runs?limit=50")):
            got = load(port, path, token)
            print(f"api: {label:45s} {got['rps']:7.0f} req/s  p50 {got['p50'] * 1000:6.1f} ms  "
                  f"p99 {got['p99'] * 1000:6.1f} ms  errors {got['errors']:.0f}   ratio {got['rps'] / base['rps']:.2f} "
                  f"of trivial (goal >= 0.5)")
        print(f"api: trivial Falcon resource under waitress (baseline)   {base['rps']:7.0f} req/s  "
              f"p50 {base['p50'] * 1000:6.1f} ms  p99 {base['p99'] * 1000:6.1f} ms  errors {base['errors']:.0f}")
    finally:
        for p in procs:
            p.terminate()
            p.wait(timeout=60)
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
