"""The sandbox's cost per run (issue 6): the same scripted run (5 file reads) launched warm with
AGENT_ORCH_SANDBOX=off and =strict, alternating in the same process. Goal: under 20 ms added.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from runner.agent.launching import prepare, start, wait
from runner.reconcile.reconciling import open_source, reconcile
from runner.settings import Settings
from runner.state import connect

RUNS = int(os.environ.get("BENCH_RUNS", "20"))
ENV = {"GIT_AUTHOR_NAME": "b", "GIT_AUTHOR_EMAIL": "b@x.invalid", "GIT_COMMITTER_NAME": "b",
       "GIT_COMMITTER_EMAIL": "b@x.invalid"}


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-sandbox-"))
    try:
        data = root / "data"
        data.mkdir()
        for i in range(5):
            (data / f"f{i}.txt").write_text("x\n")
        repo = root / "repo"
        (repo / "specs" / "_scripts").mkdir(parents=True)
        (repo / "specs" / "b.yaml").write_text("name: b\ndescription: d\nmodel: scripted:_scripts/b.yaml\n"
                                               f"tools:\n  - name: file_reader\n    paths: ['{data}']\n")
        calls = ", ".join(f"{{name: file_reader, args: {{path: '{data}/f{i}.txt'}}}}" for i in range(5))
        (repo / "specs" / "_scripts" / "b.yaml").write_text(f"turns:\n  - tool_calls: [{calls}]\n  - content: done\n")
        for args in (["init", "-q"], ["add", "-A"], ["commit", "-qm", "x"]):
            subprocess.run(["git", *args], cwd=repo, env={**os.environ, **ENV}, check=True, capture_output=True)
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
