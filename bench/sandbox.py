"""The sandbox's cost per run (issue 6): the same scripted run launched warm with
AGENT_ORCH_SANDBOX=off and =strict, alternating in the same process. Goal: under 20 ms added.

Two runs: five file reads (no network: a namespace with nothing in it), and five ``http_get`` calls
to a web server on this machine (a namespace with a loopback, the egress proxy, each request checked
and journaled; with the sandbox off they go straight to the server).
"""

from __future__ import annotations

import os
import shutil
import socket
import statistics
import tempfile
import threading
import time
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

from bench import commit_all, reader_repo
from runner.agent.launching import run_foreground
from runner.agent.local import LocalExecutor
from runner.reconcile.reconciling import open_source, reconcile
from runner.sandbox.access import HostRule
from runner.sandbox.egress import EgressPolicy, EgressProxy
from runner.settings import Settings
from runner.state import connect

RUNS = int(os.environ.get("BENCH_RUNS", "20"))


class _Page(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self.send_response(200)
        self.send_header("Content-Length", "5")
        self.end_headers()
        self.wfile.write(b"hello")

    def log_message(self, *_args: Any) -> None:
        pass


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-sandbox-"))
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        repo = reader_repo(root, "b")
        url = f"http://127.0.0.1:{server.server_address[1]}/"
        (repo / "specs" / "web.yaml").write_text(
            "name: web\ndescription: fetches five pages\nmodel: scripted:_scripts/web.yaml\n"
            "tools:\n  - name: http_get\nconstraints:\n  allowed_domains: [local]\n")
        calls = ", ".join(f"{{name: http_get, args: {{url: '{url}'}}}}" for _ in range(5))
        (repo / "specs" / "_scripts" / "web.yaml").write_text(f"turns:\n  - tool_calls: [{calls}]\n"
                                                                "  - content: done\n")
        commit_all(repo)
        files = _medians(root, repo, "b")
        web = _medians(root, repo, "web")
        for what, (off, strict) in (("five file reads", files), ("five http_get via the proxy", web)):
            print(f"sandbox: {what:28s} without the sandbox (AGENT_ORCH_SANDBOX=off, baseline) {off * 1000:6.1f} ms")
            print(f"sandbox: {what:28s} with it (Landlock, namespaces, rlimits, clean env)    {strict * 1000:6.1f} ms"
                  f"   added {(strict - off) * 1000:5.1f} ms (goal < 20 ms)")
        direct, proxied = _per_request(url)
        print(f"sandbox: one HTTP request, direct (baseline)                                  {direct * 1000:6.2f} ms")
        print(f"sandbox: one HTTP request through the egress proxy                            {proxied * 1000:6.2f} ms"
              f"   added {(proxied - direct) * 1000:5.2f} ms")
    finally:
        server.shutdown()
        shutil.rmtree(root, ignore_errors=True)


def _per_request(url: str, n: int = 100) -> tuple[float, float]:
    """Mean time of one GET, straight to the server and through an egress proxy, alternating."""
    proxy = EgressProxy(EgressPolicy(frozenset(), HostRule(("local",), False)))
    listener = socket.create_server(("127.0.0.1", 0))
    proxy.serve(listener)
    openers = {"direct": urllib.request.build_opener(urllib.request.ProxyHandler({})),
               "proxy": urllib.request.build_opener(urllib.request.ProxyHandler(
                   {"http": f"http://127.0.0.1:{listener.getsockname()[1]}"}))}
    times: dict[str, list[float]] = {"direct": [], "proxy": []}
    try:
        for _ in range(3):
            for name, opener in openers.items():
                t = time.perf_counter()
                for _ in range(n):
                    opener.open(url).read()
                times[name].append((time.perf_counter() - t) / n)
    finally:
        proxy.close()
    return min(times["direct"]), min(times["proxy"])


def _medians(root: Path, repo: Path, agent: str) -> tuple[float, float]:
    """The best of two median run times, sandbox off and strict, alternating, forked by one warm zygote
    as the daemon's runs are."""
    medians: dict[str, list[float]] = {"off": [], "strict": []}
    executor = LocalExecutor(kill_grace=1)
    for mode in ("off", "strict", "off", "strict"):
        s = Settings.load(root / "home", source=str(repo), sandbox=mode)
        conn = connect(s.state_path)
        reconcile(s, conn, open_source(s), initiator="bench")
        source = open_source(s)
        times = []
        for _ in range(RUNS):
            t = time.perf_counter()
            row = run_foreground(s, source, agent, executor=executor, archive=False)
            times.append(time.perf_counter() - t)
            assert row.status == "succeeded", row.error
        medians[mode].append(statistics.median(times))
        conn.close()
    executor.close()
    return min(medians["off"]), min(medians["strict"])


if __name__ == "__main__":
    main()
