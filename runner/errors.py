"""The exception tree. Each class has one meaning; callers decide by class, never by message.

Every exception this project raises on purpose is defined here. Two kinds stay where they are: the
private control-flow sentinels a module raises and catches itself (``ingesting._Busy``,
``loading._TooComplex``, the egress proxy's ``Unreachable``), and the API's HTTP answers in
``runner/api/errors.py``, which are responses with a status, not domain errors (the API maps this
tree onto them in one place).

    Exception
    ├── OrchestratorError                the base of ours; ``code`` names the kind in JSON answers
    │   ├── UsageError                   the command line, settings or a query someone wrote are wrong
    │   │   └── SqlError                 ``agentctl history --sql``: DuckDB's own words
    │   ├── SpecError                    the desired state is wrong (a bad spec, a bad request body)
    │   ├── DeniedError                  refused by policy (a path outside a tool's, a missing role)
    │   │   └── SymlinkError             a sandbox rule's path has a symbolic link in it
    │   ├── NotFoundError                the thing asked for does not exist
    │   ├── UnauthenticatedError         no proof of a secret an open endpoint asks for (a webhook's)
    │   ├── ConflictError                it changed under the caller, or someone else holds it
    │   │   └── DaemonRunningError       another daemon serves this home
    │   ├── LedgerError                  the ledger file cannot be opened (not a lock: broken)
    │   ├── ModelUnavailable             a run's model cannot be reached or has no such model
    │   ├── MemoryError_                 an agent's memory store refuses (another embedder, dims)
    │   ├── PermanentError               retrying the same call gives the same answer: fix something
    │   ├── TransientError               worth retrying; ``delay`` is the wait, in seconds
    │   │   └── StorageFullError         the disk holding the home is full (delay 30 s)
    │   └── SourceError                  the spec source cannot be read; one of:
    │       ├── SourceUnavailable        + TransientError: a clone, fetch or ls-tree failed
    │       ├── SourceMissing            + PermanentError: ref, repository, folder or file not there
    │       │   └── FolderMissing        the source folder does not exist at the revision
    │       └── FileTooLarge             + PermanentError: a file over its size limit, refused unread
    ├── LandlockError (OSError)          the kernel refused a Landlock call
    ├── ExpressionError (ValueError)     a workflow expression that cannot be read or evaluated
    └── ChannelError (ValueError)        a run broke its channel; recorded as the run's error

Permanent or transient. A ``TransientError`` (a network fault, a busy repository, a full disk)
carries ``delay``, the seconds to wait before the same call can succeed, set where it is raised: the
daemon waits exactly that before its next reconcile (and the API sends a full disk's as
``Retry-After``). A ``PermanentError`` (a ref not found, not a git repository, a folder removed) fails
the same way until someone changes the source or the settings: the daemon keeps the last good state,
says "fix the source", and tries again with its own exponential backoff (up to 5 minutes), never in
a hot loop. ``except SourceError`` catches both kinds; an error that is neither (a bug) is retried
with the backoff too, its traceback logged.

``StorageFullError.of`` is the one place that recognises a full disk in what SQLite, DuckDB and the
OS raise. The CLI maps the tree to exit codes (2 for all of ours) and the API to HTTP statuses, each
in one place.
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


class SqlError(UsageError):
    """A query someone wrote did not run: DuckDB's own words, which name what is wrong."""

    code = "sql"


class SpecError(OrchestratorError):
    code = "invalid_spec"


class DeniedError(OrchestratorError):
    code = "denied"


class SymlinkError(DeniedError):
    """A rule's path has a symbolic link in it and the rule was asked not to follow links."""

    def __init__(self, path: str, link: str | None, target: str | None) -> None:
        where = f" ({link} -> {target})" if link else ""
        super().__init__(f"path {path} contains a symbolic link{where}; name the real folder")
        self.path, self.link, self.target = path, link, target


class NotFoundError(OrchestratorError):
    code = "not_found"


class UnauthenticatedError(OrchestratorError):
    """A request without the proof its endpoint asks for (a webhook's signature or bearer secret)."""

    code = "unauthorized"


class ConflictError(OrchestratorError):
    code = "conflict"


class DaemonRunningError(ConflictError):
    """Another daemon already serves this home (the CLI exits 2 with this message)."""


class LedgerError(OrchestratorError):
    code = "ledger"


class ModelUnavailable(OrchestratorError):
    code = "model_unavailable"


class MemoryError_(OrchestratorError):
    code = "memory"


class PermanentError(OrchestratorError):
    """A fault that retrying will not cure: the same call fails the same way until someone changes
    the source or the settings. A marker base: the concrete kinds also say what failed."""

    code = "permanent"


class TransientError(OrchestratorError):
    """A fault worth retrying later; ``delay`` is the wait in seconds before the same call can succeed
    (the daemon waits exactly that). Give it where the error is raised: the raiser knows the fault."""

    code = "unavailable"

    def __init__(self, message: str, *, delay: float = 5.0, details: list[str] | None = None) -> None:
        super().__init__(message, details=details)
        self.delay = delay


class SourceError(OrchestratorError):
    """The spec source cannot be read. Raised only as one of its kinds below, transient or permanent;
    ``except SourceError`` catches both."""

    code = "source_error"


class SourceUnavailable(SourceError, TransientError):
    """The source is there but could not be read just now: a clone or fetch failed (the network, the
    remote host), or git failed on the repository (a gc or another writer holds it)."""

    code = "source_unavailable"


class SourceMissing(SourceError, PermanentError):
    """What the source names is not there: the ref, the repository (or the path is no git repository),
    the folder, or a file at a revision."""

    code = "source_missing"


class FolderMissing(SourceMissing):
    """The source folder does not exist at the revision (every spec under it was removed, or a typo)."""


class FileTooLarge(SourceError, PermanentError):
    """A file in the source is over its size limit: refused by its size, unread."""

    code = "file_too_large"


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


class LandlockError(OSError):
    """The kernel refused a Landlock call (or has no Landlock): an OSError, with its errno where it gave one."""


class ExpressionError(ValueError):
    """A workflow expression or template that cannot be read or evaluated; its message says why."""


class ChannelError(ValueError):
    """The other end broke the channel: the reason is recorded as the run's error."""
