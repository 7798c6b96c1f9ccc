"""Plan speed on a repository of 10,000 specs (issue 2).

Figures, each beside the bare ``yaml.safe_load`` of the same files measured in the same run:
- full plan: nothing applied, an empty cache: every blob read from git, parsed, validated;
- one-change plan: everything applied, then one spec changed and committed.
Goals: full plan <= 1.5x the bare parse; one-change plan <= 0.1x the full plan.
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from pathlib import Path

import yaml

from bench import best, commit_all, git
from runner.reconcile.reconciling import open_source, plan, reconcile
from runner.settings import Settings
from runner.state import connect

N = int(os.environ.get("BENCH_SPECS", "10000"))
SPEC = """\
name: agent-{i:05d}
description: "Processes and analyzes data files for team {team}"
instructions: |
  Read the new files in the incoming folder, summarise them, and write a report.
model: llama2
tools:
  - name: file_reader
    description: "Reads data files"
    permissions: ["read"]
    paths: ["/srv/clients/${{CLIENT_ID}}/data/{team}/"]
  - name: data_analyzer
    description: "Analyzes data"
    permissions: ["read", "execute"]
    paths: ["/srv/clients/${{CLIENT_ID}}/data/{team}/"]
memory:
  type: vector_db
  collection: "agent_{i:05d}_memory"
triggers:
  - type: file_change
    path: "/srv/clients/${{CLIENT_ID}}/data/{team}/incoming/"
    patterns: ["*.csv"]
  - type: schedule
    cron: "{minute} * * * *"
    timezone: Europe/Berlin
constraints:
  max_runtime: 600
  max_tokens: {tokens}
  allowed_domains: ["local"]
"""

def make_repo(root: Path) -> Path:
    repo = root / "repo"
    (repo / "specs").mkdir(parents=True)
    for i in range(N):
        text = SPEC.format(i=i, team=f"team{i % 50}", minute=i % 60, tokens=8000 + i)
        (repo / "specs" / f"agent-{i:05d}.yaml").write_text(text)
    commit_all(repo, "10k specs")
    return repo



def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="bench-plan-"))
    try:
        print(f"plan: generating a repository of {N} specs ...", flush=True)
        repo = make_repo(root)
        files = sorted((repo / "specs").glob("*.yaml"))

        def bare_parse() -> None:
            for f in files:
                yaml.safe_load(f.read_bytes())

        def bare_parse_c() -> None:
            for f in files:
                yaml.load(f.read_bytes(), Loader=yaml.CSafeLoader)

        def full_plan() -> None:
            home = Path(tempfile.mkdtemp(dir=root))
            settings = Settings.load(home, source=str(repo))
            conn = connect(settings.state_path)
            p = plan(settings, conn, open_source(settings))
            assert p.count("create") == N, p.count("create")
            conn.close()

        base = best(bare_parse)
        base_c = best(bare_parse_c)
        full = best(full_plan)

        # One change after everything is applied.
        home = root / "applied"
        settings = Settings.load(home, source=str(repo))
        conn = connect(settings.state_path)
        reconcile(settings, conn, open_source(settings), initiator="bench")
        times = []
        for k in range(3):
            target = repo / "specs" / f"agent-{k:05d}.yaml"
            target.write_text(target.read_text().replace("max_tokens: ", "max_tokens: 1"))
            git(repo, "commit", "-q", "-am", f"change {k}")
            src = open_source(settings)
            t = time.perf_counter()
            p = plan(settings, conn, src)
            times.append(time.perf_counter() - t)
            assert [c.action for c in p.changes] == ["update"], p.changes
            reconcile(settings, conn, src, initiator="bench")
        one = min(times)

        print(f"plan: yaml.safe_load of {N} files (baseline)      {base:8.3f} s")
        print(f"plan: yaml.load CSafeLoader of {N} files (info)    {base_c:8.3f} s")
        print(f"plan: full plan of {N} specs                      {full:8.3f} s  "
              f"ratio {full / base:.2f}x the bare parse (goal <= 1.5x)")
        print(f"plan: plan after one spec changed                   {one:8.3f} s  "
              f"ratio {one / full:.3f}x the full plan (goal <= 0.1x)")
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
