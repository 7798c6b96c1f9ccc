"""The exception tree. Each class has one meaning; callers decide by class, never by message.

- ``SpecError``: the desired state is wrong (a bad spec, a bad request body). Retrying will not help;
  the user must change something.
- ``DeniedError``: an action was refused by policy (a tool call outside its paths, a missing role).
- ``SourceError``: the spec source cannot be read as a whole (fetch failed, ref missing). Transient:
  the reconciler keeps the last good state and retries with backoff.
- ``NotFoundError`` / ``ConflictError``: the thing asked for does not exist / changed under the caller.
- ``UsageError``: the command line or settings are wrong.

The CLI maps them to exit codes and the API to HTTP statuses, each in one place.
"""

from __future__ import annotations


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
