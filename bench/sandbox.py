"""The sandbox's cost per run (issue 6): the same scripted run (5 file reads) launched warm with
AGENT_ORCH_SANDBOX=off and =strict, alternating in the same process. Goal: under 20 ms added.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

from bench import reader_repo
from runner.agent.launching import prepare, start, wait
from runner.reconcile.reconciling import open_source, reconcile
from runner.settings import Settings
from runner.state import connect

RUNS = int(os.environ.get("BENCH_RUNS", "20"))


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-sandbox-"))
    try:
        repo = reader_repo(root, "b")
        medians: dict[str, list[float]] = {"off": [], "strict": []}
        for mode in ("off", "strict", "off", "strict"):
            s = Settings.load(root / "home", source=str(repo), sandbox=mode)
            conn = connect(s.state_path)
            reconcile(s, conn, open_source(s), initiator="bench")
            source = open_source(s)
            times = []
            for _ in range(RUNS):
                t = time.perf_counter()
                row = wait(conn, start(conn, prepare(s, conn, source, "b")), kill_grace=1)
                times.append(time.perf_counter() - t)
                assert row.status == "succeeded", row.error
            medians[mode].append(sorted(times)[len(times) // 2])
        off, strict = min(medians["off"]), min(medians["strict"])
        print(f"sandbox: warm run without the sandbox (AGENT_ORCH_SANDBOX=off, baseline)  {off * 1000:7.1f} ms")
        print(f"sandbox: warm run with it (Landlock, namespaces, rlimits, clean env)     {strict * 1000:7.1f} ms   "
              f"added {(strict - off) * 1000:5.1f} ms (goal < 20 ms)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
