"""The exception tree. Each class has one meaning; callers decide by class, never by message.

- ``SpecError``: the desired state is wrong (a bad spec, a bad request body). Retrying will not help;
  the user must change something.
- ``DeniedError``: an action was refused by policy (a tool call outside its paths, a missing role).
- ``SourceError``: the spec source cannot be read as a whole (fetch failed, ref missing). Transient:
  the reconciler keeps the last good state and retries with backoff.
- ``NotFoundError`` / ``ConflictError``: the thing asked for does not exist / changed under the caller.
- ``UsageError``: the command line or settings are wrong.
- ``StorageFullError``: the disk holding the home is full (or the quota is used up). Transient: the
  same call succeeds once space is freed. ``StorageFullError.of`` is the one place that recognises a
  full disk in what SQLite, DuckDB and the OS raise.

The CLI maps them to exit codes and the API to HTTP statuses, each in one place.
"""

from __future__ import annotations

import errno
import sqlite3


class OrchestratorError(Exception):
    """Base of every error this project raises on purpose."""

    code = "error"

    def __init__(self, message: str, *, details: list[str] | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.details = details or []


class UsageError(OrchestratorError):
    code = "usage"


class SpecError(OrchestratorError):
    code = "invalid_spec"


class DeniedError(OrchestratorError):
    code = "denied"


class NotFoundError(OrchestratorError):
    code = "not_found"


class ConflictError(OrchestratorError):
    code = "conflict"


class TransientError(OrchestratorError):
    """A fault worth retrying later; ``delay`` is the suggested wait in seconds."""

    code = "unavailable"

    def __init__(self, message: str, *, delay: float = 5.0, details: list[str] | None = None) -> None:
        super().__init__(message, details=details)
        self.delay = delay


class SourceError(TransientError):
    code = "source_unavailable"


class StorageFullError(TransientError):
    """The disk holding the home is full: nothing more can be written there until space is freed."""

    code = "storage_full"

    # How each layer says it: the OS by errno; SQLite by its result code, SQLITE_FULL for a write and
    # SQLITE_IOERR_SHMSIZE ("disk I/O error") when a process opening a WAL database cannot size its -shm file
    # (any process, even a reader, once the last one to close it has removed it); DuckDB and git only in the
    # text of their errors (DuckDB raises IOException or TransactionException, depending on the step).
    ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT})
    SQLITE_CODES = frozenset({sqlite3.SQLITE_FULL, sqlite3.SQLITE_IOERR_SHMSIZE})
    TEXTS = ("no space left on device", "disk quota exceeded", "database or disk is full")

    @classmethod
    def of(cls, exc: BaseException) -> StorageFullError | None:
        """``exc`` as a StorageFullError when it, or what caused it, says the disk is full; else None."""
        seen: set[int] = set()
        cause: BaseException | None = exc
        while cause is not None and id(cause) not in seen:
            seen.add(id(cause))
            if isinstance(cause, StorageFullError):
                return cause
            if cls._says_full(cause):
                first = str(cause).strip().splitlines()[0] if str(cause).strip() else type(cause).__name__
                if isinstance(cause, sqlite3.Error) and getattr(cause, "sqlite_errorname", None):
                    first += f" ({cause.sqlite_errorname})"
                return cls("the disk holding the home (AGENT_ORCH_HOME) is full: free space on it (old files "
                           "under its data/ and logs/ folders, or whatever filled it) or grow it, then retry; "
                           "nothing recorded before is lost", details=[first[:300]], delay=30.0)
            cause = cause.__cause__ or cause.__context__
        return None

    @classmethod
    def _says_full(cls, exc: BaseException) -> bool:
        if isinstance(exc, OSError) and exc.errno in cls.ERRNOS:
            return True
        if isinstance(exc, sqlite3.Error) and getattr(exc, "sqlite_errorcode", None) is not None:
            return exc.sqlite_errorcode in cls.SQLITE_CODES
        if isinstance(exc, OrchestratorError):
            return False  # ours already say what they mean
        text = str(exc).lower()
        return any(t in text for t in cls.TEXTS)
