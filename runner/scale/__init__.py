"""Runs past one machine: the Ray executor (``cluster``) and the runner on each node (``node``)."""

from __future__ import annotations

from typing import Any

from runner.settings import Settings


def shared_executor(settings: Settings) -> Any:
    """The executor every client of a daemon shares, or None for the local one (each table makes its own).
    Raises UsageError when the Ray cluster cannot be used."""
    if settings.executor != "ray":
        return None
    from runner.scale.cluster import RayExecutor

    return RayExecutor(settings)
