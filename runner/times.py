"""The one timestamp format: UTC, ISO 8601, to the millisecond, with ``Z`` (2026-11-28T18:00:00.123Z).

Every row, event, log line and answer says times this way. Times compare as text as well as times
(same width, same zone), which the live store's queries rely on.
"""

from __future__ import annotations

from datetime import UTC, datetime


def utcnow() -> str:
    return stamp(datetime.now(UTC))


def stamp(moment: datetime, timespec: str = "milliseconds") -> str:
    """``moment`` in the one format; a naive time is taken as UTC (DuckDB hands TIMESTAMPs back naive)."""
    moment = moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
    return moment.replace(tzinfo=None).isoformat(timespec=timespec) + "Z"


def parse(text: str) -> datetime:
    """A time as written by ``stamp`` (or without the Z, as older rows have it), as an aware UTC datetime."""
    moment = datetime.fromisoformat(text.replace("Z", "+00:00") if text.endswith("Z") else text)
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
