"""When a schedule trigger fires, correct across daylight-saving changes.

croniter walks naive local wall-clock times; we convert each candidate with zoneinfo ourselves:
- a local time that does not exist (spring forward gap) is skipped, never invented;
- a local time that happens twice (fall back) fires once, at its first occurrence (fold=0).
"""

from __future__ import annotations

from datetime import UTC, datetime
from zoneinfo import ZoneInfo

from croniter import croniter


def next_fire(cron: str, timezone: str, after: datetime) -> datetime:
    """The first slot strictly after ``after`` (aware), as an aware UTC datetime."""
    zone = ZoneInfo(timezone)
    expr = cron.strip()
    local_after = after.astimezone(zone).replace(tzinfo=None)
    it = croniter(expr, local_after, second_at_beginning=len(expr.split()) == 6)
    for _ in range(100_000):
        candidate: datetime = it.get_next(datetime)
        aware = candidate.replace(tzinfo=zone, fold=0)
        if aware.astimezone(UTC).astimezone(zone).replace(tzinfo=None) != candidate:
            continue  # in a spring-forward gap: this wall-clock time never happens
        utc = aware.astimezone(UTC)
        if utc > after:
            return utc
    raise ValueError(f"cron expression {cron!r} has no next time")


def last_fire(cron: str, timezone: str, before: datetime) -> datetime | None:
    """The latest slot at or before ``before`` (for catching up one missed slot after downtime)."""
    zone = ZoneInfo(timezone)
    expr = cron.strip()
    local_before = before.astimezone(zone).replace(tzinfo=None)
    it = croniter(expr, local_before, second_at_beginning=len(expr.split()) == 6, is_prev=True)
    for _ in range(100_000):
        try:
            candidate: datetime = it.get_prev(datetime)
        except (StopIteration, ValueError):
            return None
        aware = candidate.replace(tzinfo=zone, fold=0)
        if aware.astimezone(UTC).astimezone(zone).replace(tzinfo=None) != candidate:
            continue
        utc = aware.astimezone(UTC)
        if utc <= before:
            return utc
    return None
