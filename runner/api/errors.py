"""HTTP errors: each class carries its status; one handler renders one JSON shape for all of them."""

from __future__ import annotations

import json
import logging
import re
from http import HTTPStatus
from typing import Any

import falcon

from runner.errors import ConflictError, DeniedError, NotFoundError, OrchestratorError, SpecError, TransientError

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
    (NotFoundError, NotFound), (ConflictError, Conflict), (SpecError, Unprocessable), (DeniedError, Forbidden),
    (TransientError, Unavailable), (OrchestratorError, BadRequest),
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
