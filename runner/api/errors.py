"""HTTP errors: each class carries its status; one handler renders one JSON shape for all of them."""

from __future__ import annotations

import json
import logging
import re
import threading
import time
from http import HTTPStatus
from typing import Any

import falcon

from runner.errors import (
    ConflictError,
    DeniedError,
    NotFoundError,
    OrchestratorError,
    SourceError,
    SpecError,
    StorageFullError,
    TransientError,
    UnauthenticatedError,
)

log = logging.getLogger("runner.api")


class ApiError(Exception):
    status = 400
    code = "bad_request"

    def __init__(self, message: str, details: list[Any] | None = None, code: str | None = None) -> None:
        super().__init__(message)
        self.message, self.details = message, details or []
        if code:
            self.code = code


class BadRequest(ApiError):
    pass


class Unauthorized(ApiError):
    status, code = 401, "unauthorized"


class Forbidden(ApiError):
    status, code = 403, "forbidden"


class NotFound(ApiError):
    status, code = 404, "not_found"


class MethodNotAllowed(ApiError):
    status, code = 405, "method_not_allowed"


class Conflict(ApiError):
    status, code = 409, "conflict"


class PreconditionRequired(ApiError):
    status, code = 428, "precondition_required"


class TooLarge(ApiError):
    status, code = 413, "too_large"


class Unprocessable(ApiError):
    status, code = 422, "invalid_spec"


class Unavailable(ApiError):
    status, code = 503, "unavailable"


# Our own exception tree, mapped in one place.
STATUS_OF: list[tuple[type[OrchestratorError], type[ApiError]]] = [
    (NotFoundError, NotFound), (UnauthenticatedError, Unauthorized), (ConflictError, Conflict),
    (SpecError, Unprocessable), (DeniedError, Forbidden),
    (TransientError, Unavailable), (SourceError, Unavailable),  # the daemon's source is broken: not the caller's fault
    (OrchestratorError, BadRequest),
]


def render(resp: falcon.Response, status: int, code: str, message: str, details: list[Any] | None = None) -> None:
    resp.status = status
    resp.content_type = falcon.MEDIA_JSON
    resp.text = json.dumps({"error": {"code": code, "message": without_credentials(message),
                                      "details": details or []}})


_USERINFO = re.compile(r"(\b[a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s'\"]+@")


def without_credentials(text: str) -> str:
    """``text`` with the user and password of every URL in it masked: a source URL may carry a token
    (https://user:TOKEN@host/repo.git), and git's messages quote the URL."""
    return _USERINFO.sub(r"\1***@", text)


def handle_any(req: falcon.Request, resp: falcon.Response, exc: Exception, params: dict[str, Any]) -> None:
    if isinstance(exc, ApiError):
        render(resp, exc.status, exc.code, exc.message, exc.details)
        return
    full = StorageFullError.of(exc)  # SQLite, DuckDB or the OS out of space, wherever it was raised
    if full is not None:
        FULL_DISK.refused(req, full)
        render(resp, Unavailable.status, full.code, full.message, full.details)
        resp.set_header("Retry-After", str(int(full.delay)))
        return
    if isinstance(exc, OrchestratorError):
        api = next(api for ours, api in STATUS_OF if isinstance(exc, ours))
        render(resp, api.status, exc.code, exc.message, exc.details)
        return
    if isinstance(exc, falcon.HTTPError):  # Falcon's own (405 from routing, for one): same shape, same headers
        status = exc.status_code
        phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "error"
        render(resp, status, phrase.lower().replace(" ", "_").replace("-", "_"), str(exc.description or phrase))
        if exc.headers:
            resp.set_headers(exc.headers)
        return
    log.exception("internal error on %s %s", req.method, req.path)
    render(resp, 500, "internal", "internal error (logged)")


class FullDiskNotice:
    """One log line for a full disk, not one per request: every request that needs to write fails while it
    lasts, and each would otherwise log the same thing (on that same full disk). The first refusal is
    logged, then at most one line a minute, with how many requests were refused in between."""

    EVERY = 60.0

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.logged_at: float | None = None
        self.unlogged = 0

    def refused(self, req: falcon.Request, full: StorageFullError) -> None:
        now = time.monotonic()
        with self.lock:
            self.unlogged += 1
            if self.logged_at is not None and now - self.logged_at < self.EVERY:
                return
            self.logged_at, count, self.unlogged = now, self.unlogged, 0
        log.warning("disk full (%s): answering 503 storage_full (%s %s%s) until space is freed on the disk "
                    "holding the home", full.details[0] if full.details else "", req.method, req.path,
                    f", and {count - 1} more request(s) since the last line" if count > 1 else "")


FULL_DISK = FullDiskNotice()
