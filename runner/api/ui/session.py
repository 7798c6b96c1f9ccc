"""How a browser is let in: the API token in a cookie, and a CSRF token in every form.

The session is the token itself, in an ``HttpOnly; SameSite=Strict`` cookie scoped to ``/ui``, ``Secure`` unless
the page came over plain HTTP to this machine itself (behind the Caddyfile's TLS proxy the Host is the public
name, so the cookie is Secure there, and a browser never sends it over plain HTTP). Nothing is kept on the
server, so a token revoked or expired is refused at the next page exactly as at the next API call
(``tokens.lookup`` runs for each request).

SameSite=Strict already keeps other sites' requests from carrying the cookie; the CSRF token is the second
lock, for browsers or set-ups where that does not hold. It is an HMAC of the cookie's value under a key made
when the process starts: a form of one session is refused in another, and nothing about it is stored. A
restart makes a fresh key, so a page loaded before it asks to be reloaded before its form works.

The login form has its own pair: a random value in a short-lived cookie and its HMAC in the form, so a
login cannot be forged either (another site logging the browser in with the other site's token).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from urllib.parse import parse_qs

import falcon

from runner.api.app import MAX_BODY, SESSION_COOKIE, UI
from runner.api.errors import BadRequest, Forbidden, TooLarge

KEY = secrets.token_bytes(32)  # this process's: CSRF tokens of an earlier one are refused
LOGIN_COOKIE = "ao_login"
SESSION_HOURS = 12  # the cookie's life; the token's own expiry applies within it
FORM = "application/x-www-form-urlencoded"


def csrf_token(secret: str, purpose: str = "session") -> str:
    return hmac.new(KEY, f"{purpose}:{secret}".encode(), hashlib.sha256).hexdigest()


def session_csrf(req: falcon.Request) -> str:
    """The CSRF token of this request's session, for its forms ('' without a session)."""
    cookie = _cookie(req, SESSION_COOKIE)
    return csrf_token(cookie) if cookie else ""


def read_form(req: falcon.Request) -> dict[str, str]:
    """A urlencoded form body, each field's first value; bounded as JSON bodies are."""
    media = (req.content_type or "").split(";", 1)[0].strip().lower()
    if req.content_length and media != FORM:
        raise BadRequest(f"send the form as {FORM}", code="bad_form")
    raw = req.bounded_stream.read(MAX_BODY + 1)
    if len(raw) > MAX_BODY:
        raise TooLarge(f"the body is over {MAX_BODY} bytes")
    try:
        fields = parse_qs(raw.decode("utf-8"), keep_blank_values=True, strict_parsing=False, max_num_fields=100)
    except (UnicodeDecodeError, ValueError):
        raise BadRequest("the form is not valid UTF-8 urlencoded text", code="bad_form") from None
    return {k: v[0] for k, v in fields.items()}


def checked_form(req: falcon.Request, purpose: str = "session") -> dict[str, str]:
    """The form of a POST, after its CSRF check (403 when the token is missing or not this session's)."""
    if (req.get_header("Sec-Fetch-Site") or "").lower() == "cross-site":
        raise Forbidden("a form from another site is refused", code="csrf")
    form = read_form(req)
    secret = _cookie(req, SESSION_COOKIE if purpose == "session" else LOGIN_COOKIE)
    sent = form.get("csrf", "")
    if not secret or not sent or not hmac.compare_digest(sent, csrf_token(secret, purpose)):
        raise Forbidden("the form's CSRF token is missing or not this session's: reload the page and try again",
                        code="csrf")
    return form


def login_csrf(req: falcon.Request, resp: falcon.Response) -> str:
    """The login form's CSRF token, with its cookie set (a new one unless the browser has one)."""
    secret = _cookie(req, LOGIN_COOKIE)
    if not secret or len(secret) > 100:
        secret = secrets.token_urlsafe(24)
        _set(req, resp, LOGIN_COOKIE, secret, max_age=3600, path=f"{UI}/login")
    return csrf_token(secret, "login")


def start(req: falcon.Request, resp: falcon.Response, token: str) -> None:
    _set(req, resp, SESSION_COOKIE, token, max_age=SESSION_HOURS * 3600, path=UI)
    resp.unset_cookie(LOGIN_COOKIE, same_site="Strict", path=f"{UI}/login")


def end(resp: falcon.Response) -> None:
    resp.unset_cookie(SESSION_COOKIE, same_site="Strict", path=UI)  # empty, and expired now
    resp.set_header("Clear-Site-Data", '"cache"')  # Back after logging out shows nothing the session saw


def plain_http_elsewhere(req: falcon.Request) -> bool:
    """The page came over plain HTTP to a name that is not this machine's loopback: a Secure cookie will not be
    kept, so logging in cannot work (and should not: the token would cross the network in clear)."""
    return req.scheme != "https" and not _loopback(req.host)


def _loopback(host: str) -> bool:
    host = host.strip("[]").lower()
    return host in ("localhost", "::1") or host.endswith(".localhost") or host.startswith("127.")


def _set(req: falcon.Request, resp: falcon.Response, name: str, value: str, *, max_age: int, path: str) -> None:
    resp.set_cookie(name, value, max_age=max_age, path=path, http_only=True, same_site="Strict",
                    secure=not (req.scheme == "http" and _loopback(req.host)))


def _cookie(req: falcon.Request, name: str) -> str:
    return next(iter(req.get_cookie_values(name) or []), "")
