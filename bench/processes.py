"""Finding the processes a local Ray cluster left: the benchmark's and the Ray tests' one way of cleaning up
(a killed node's processes are no longer anyone's children, so they are found by a marker in their
environment too)."""

from __future__ import annotations

import os
import signal
from pathlib import Path


def descendants(root: int) -> set[int]:
    """Every process below ``root``, from /proc."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                ppid = int(Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            children.setdefault(ppid, []).append(int(entry))
    found, todo = set(), [root]
    while todo:
        for child in children.get(todo.pop(), []):
            if child not in found:
                found.add(child)
                todo.append(child)
    return found


def with_marker(name: str, value: str) -> set[int]:
    """The live processes whose environment has NAME=VALUE."""
    return {int(e) for e in os.listdir("/proc") if e.isdigit() and has_marker(int(e), name, value)}


def has_marker(pid: int, name: str, value: str) -> bool:
    try:
        return f"{name}={value}".encode() in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    except OSError:
        return False


def kill_all(pids: set[int]) -> None:
    """SIGKILL to each (never this process)."""
    for pid in pids - {os.getpid()}:
        try:
            os.kill(pid, signal.SIGKILL)
        except OSError:
            pass
