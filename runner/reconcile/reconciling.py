"""One reconcile, start to end: resolve the source, plan, apply, record. Used by the CLI and the daemon."""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

from runner.errors import SourceError
from runner.ledger.ingesting import flush
from runner.reconcile.applied import now
from runner.reconcile.applying import Outcome, apply_plan, record_failure
from runner.reconcile.planning import Plan, make_plan
from runner.settings import Settings
from runner.source.git import GitSource, Location, default_source_url


@dataclass(frozen=True)
class SourceOverride:
    source: str | None = None
    ref: str | None = None
    path: str | None = None


def location_of(settings: Settings, override: SourceOverride | None = None) -> Location:
    o = override or SourceOverride()
    url = o.source or settings.source or default_source_url()
    return Location(url=url, ref=o.ref or settings.source_ref, path=(o.path if o.path is not None
                                                                      else settings.source_path).strip("/"))


def open_source(settings: Settings, override: SourceOverride | None = None) -> GitSource:
    return GitSource(location_of(settings, override), settings.home / "sources" / settings.client_id)


def plan(settings: Settings, conn: sqlite3.Connection, source: GitSource, *, allow_empty: bool = False,
         fetch: bool = True) -> Plan:
    revision = source.revision(fetch=fetch)
    return make_plan(conn, source, revision, client_id=settings.client_id, home=str(settings.home),
                     allow_empty=allow_empty)


def reconcile(settings: Settings, conn: sqlite3.Connection, source: GitSource, *, initiator: str,
              allow_empty: bool = False, archive: bool = True) -> tuple[Plan, Outcome | None]:
    """Plan and apply. A refused plan (it would delete every agent) applies nothing. With ``archive``,
    the ledger rows it wrote are flushed into DuckDB at once (the CLI with no daemon: the daemon's own
    flusher is the ledger's one writer while it runs).

    Raises SourceError (after recording it) when the source cannot be read: nothing is deleted then.
    It is SourceUnavailable (transient, with the wait it asks for) or a permanent kind (SourceMissing,
    FileTooLarge): the caller decides when to try again by its class.
    """
    started = now()
    try:
        p = plan(settings, conn, source, allow_empty=allow_empty)
    except SourceError as exc:
        record_failure(conn, settings.client_id, source.location.describe(), exc.message, initiator=initiator,
                       started_at=started)
        if archive:
            flush(conn, settings.ledger_path)
        raise
    if p.refused:
        record_failure(conn, settings.client_id, source.location.describe(), p.refused, initiator=initiator,
                       started_at=started)
        if archive:
            flush(conn, settings.ledger_path)
        return p, None
    outcome = apply_plan(conn, p, initiator=initiator, started_at=started)
    if archive:
        flush(conn, settings.ledger_path)
    return p, outcome
