"""Schedules across daylight-saving changes: a slot fires once, a nonexistent local time is not invented."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from runner.supervise.scheduling import last_fire, next_fire

BERLIN = ZoneInfo("Europe/Berlin")


def _slots(cron: str, tz: str, start: datetime, n: int) -> list[datetime]:
    out, t = [], start
    for _ in range(n):
        t = next_fire(cron, tz, t)
        out.append(t)
    return out


def test_spring_forward_skips_the_missing_hour() -> None:
    # 2026-03-29 02:30 does not exist in Berlin (02:00 -> 03:00).
    slots = _slots("30 2 * * *", "Europe/Berlin", datetime(2026, 3, 28, 12, tzinfo=UTC), 2)
    local = [s.astimezone(BERLIN) for s in slots]
    assert [(d.month, d.day, d.hour, d.minute) for d in local] == [(3, 30, 2, 30), (3, 31, 2, 30)]


def test_fall_back_fires_the_repeated_hour_once() -> None:
    # 2026-10-25: 02:00-03:00 happens twice in Berlin. An hourly schedule fires at 02:00 once.
    slots = _slots("0 * * * *", "Europe/Berlin", datetime(2026, 10, 24, 22, 30, tzinfo=UTC), 6)
    local_hours = [s.astimezone(BERLIN).hour for s in slots]
    assert local_hours == [1, 2, 3, 4, 5, 6]
    assert all(b - a >= timedelta(hours=1) for a, b in itertools.pairwise(slots))


def test_seconds_field_and_utc() -> None:
    slots = _slots("*/10 * * * * *", "UTC", datetime(2026, 1, 1, 0, 0, 5, tzinfo=UTC), 3)
    assert [s.second for s in slots] == [10, 20, 30]


def test_last_fire_for_catching_up() -> None:
    before = datetime(2026, 6, 1, 12, 34, tzinfo=UTC)
    assert last_fire("0 * * * *", "UTC", before) == datetime(2026, 6, 1, 12, 0, tzinfo=UTC)
    assert last_fire("0 3 * * *", "Europe/Berlin", before) == datetime(2026, 6, 1, 1, 0, tzinfo=UTC)
