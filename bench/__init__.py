"""Benchmarks: `make bench`. Each figure is printed beside a baseline measured in the same run."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

ENV = {"GIT_AUTHOR_NAME": "bench", "GIT_AUTHOR_EMAIL": "bench@example.invalid",
       "GIT_COMMITTER_NAME": "bench", "GIT_COMMITTER_EMAIL": "bench@example.invalid"}


def best(fn: Callable[[], Any], repeat: int = 3) -> float:
    """The fastest of ``repeat`` timings of ``fn()``, in seconds (the least disturbed by a noisy machine)."""
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return min(times)


def git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True, env={**os.environ, **ENV})


def commit_all(repo: Path, message: str = "bench") -> None:
    """Make ``repo`` a git repository (if it is not one) holding everything in it."""
    if not (repo / ".git").exists():
        git(repo, "init", "-q")
    git(repo, "add", "-A")
    git(repo, "commit", "-q", "-m", message)


def reader_repo(root: Path, name: str = "bench") -> Path:
    """A spec repository with one scripted agent ``name`` that reads five files, then answers."""
    data = root / "data"
    data.mkdir()
    for i in range(5):
        (data / f"f{i}.txt").write_text(f"file {i}\n" * 20)
    repo = root / "repo"
    (repo / "specs" / "_scripts").mkdir(parents=True)
    (repo / "specs" / f"{name}.yaml").write_text(
        f"name: {name}\ndescription: reads five files\nmodel: scripted:_scripts/{name}.yaml\n"
        f"tools:\n  - name: file_reader\n    paths: ['{data}']\n")
    calls = ", ".join(f"{{name: file_reader, args: {{path: '{data}/f{i}.txt'}}}}" for i in range(5))
    (repo / "specs" / "_scripts" / f"{name}.yaml").write_text(f"turns:\n  - tool_calls: [{calls}]\n"
                                                              "  - content: done\n")
    commit_all(repo)
    return repo
