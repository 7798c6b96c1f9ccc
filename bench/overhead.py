"""Runner overhead (issue 3): a scripted run of 5 tool calls, timed end to end (plan read from git, row
written, process forked, model and tools run, every step recorded, final row written), beside the same
5 tool calls made as bare function calls in the same run. Goal (issue 12): at most 15 ms of overhead per run.

Moving the rows into DuckDB is timed apart: the daemon does it in batches (one flush for many runs),
`agentctl run` once per run.
"""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path

from bench import reader_repo
from runner.agent.builtin_tools import ToolEnv, file_reader
from runner.agent.launching import run_foreground
from runner.agent.local import LocalExecutor
from runner.ledger.ingesting import flush
from runner.reconcile.reconciling import open_source, reconcile
from runner.sandbox.access import PathRule
from runner.settings import Settings
from runner.state import connect

RUNS = int(os.environ.get("BENCH_RUNS", "20"))


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-overhead-"))
    try:
        repo = reader_repo(root)
        data = root / "data"
        settings = Settings.load(root / "home", source=str(repo))
        reconcile(settings, connect(settings.state_path), open_source(settings), initiator="bench")
        source = open_source(settings)
        run_foreground(settings, source, "bench")  # warm: imports, schema, ledger file

        conn = connect(settings.state_path)
        executor = LocalExecutor(kill_grace=1)  # warm, as the daemon's: runs are forked from its zygote
        times, flushes = [], []
        for _ in range(RUNS):
            t = time.perf_counter()
            row = run_foreground(settings, source, "bench", executor=executor, archive=False)
            times.append(time.perf_counter() - t)
            assert row.status == "succeeded", row.error
            t = time.perf_counter()
            flush(conn, settings.ledger_path)
            flushes.append(time.perf_counter() - t)
        executor.close()
        env_ = ToolEnv(paths=PathRule.of([str(data)]))
        bare = []
        for _ in range(RUNS):
            t = time.perf_counter()
            for i in range(5):
                file_reader(env_, str(data / f"f{i}.txt"))
            bare.append(time.perf_counter() - t)
        run, tools = statistics.median(times), statistics.median(bare)
        print(f"overhead: scripted run, 5 tool calls, end to end (median of {RUNS})  {run * 1000:8.2f} ms")
        print(f"overhead: the same 5 tool calls as bare function calls (baseline) {tools * 1000:8.2f} ms")
        print(f"overhead: runner overhead per run {(run - tools) * 1000:8.2f} ms (goal <= 15 ms)")
        print(f"overhead: one ledger flush of a run's rows into DuckDB (median) "
              f"{statistics.median(flushes) * 1000:8.2f} ms (batched by the daemon)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
