"""Pages from templates, the static files, and errors as pages.

Every page is rendered with autoescaping on, so a name, an input or an answer from a run is text, never
markup. Values for scripts travel in ``data-`` attributes as JSON (escaped there like any attribute), read
by the one static ``dashboard.js``: the pages hold no inline script or style, and the CSP forbids both.
"""

from __future__ import annotations

import hashlib
import json
import threading
from importlib import resources
from typing import Any
from urllib.parse import quote

import falcon
import jinja2

from runner import __version__, tokens
from runner.api.app import UI, Resource
from runner.api.errors import ApiError, NotFound, Unauthorized
from runner.api.ui.session import session_csrf
from runner.supervise.runtime import Runtime

STATIC = {  # what /ui/static/ serves: nothing else, so no path from a URL ever reaches the disk
    "htmx.min.js": ("vendor/htmx.min.js", "text/javascript; charset=utf-8"),
    "uPlot.iife.min.js": ("vendor/uPlot.iife.min.js", "text/javascript; charset=utf-8"),
    "uPlot.min.css": ("vendor/uPlot.min.css", "text/css; charset=utf-8"),
    "htmx.LICENSE": ("vendor/htmx.LICENSE", "text/plain; charset=utf-8"),
    "uPlot.LICENSE": ("vendor/uPlot.LICENSE", "text/plain; charset=utf-8"),
    "dashboard.js": ("dashboard.js", "text/javascript; charset=utf-8"),
    "dashboard.css": ("dashboard.css", "text/css; charset=utf-8"),
}
NAV = [("Agents", f"{UI}/"), ("Runs", f"{UI}/runs"), ("Workflows", f"{UI}/workflows"),
       ("Approvals", f"{UI}/approvals"), ("Activity", f"{UI}/activity"), ("Health", f"{UI}/health")]

_env = jinja2.Environment(loader=jinja2.PackageLoader("runner.api.ui", "templates"), autoescape=True,
                          trim_blocks=True, lstrip_blocks=True)  # a step's optional fields: absent is empty
_files: dict[str, tuple[bytes, str]] = {}
_files_lock = threading.Lock()


class Page(Resource):
    """A dashboard page: the session's principal and its client's runtime, or the way to log in. ``fragment``: the
    live part of the page alone (what htmx polls while a run goes on), for pages that have one."""

    def __init__(self, api: Any, fragment: bool = False) -> None:
        super().__init__(api)
        self.fragment = fragment

    def session(self, req: falcon.Request) -> tuple[tokens.Principal, Runtime]:
        principal: tokens.Principal | None = req.context.get("principal")
        if principal is None:
            raise Unauthorized("log in with an API token")  # error_page sends the browser to the login page
        return principal, self.api.runtimes[principal.client_id]


def render(req: falcon.Request, resp: falcon.Response, template: str, *, status: int = 200,
           **context: Any) -> None:
    principal: tokens.Principal | None = req.context.get("principal")
    resp.status = status
    resp.content_type = "text/html; charset=utf-8"
    resp.text = _env.get_template(template).render(
        principal=principal, operator=bool(principal and principal.may("operator")), csrf=session_csrf(req),
        static=static_url, nav=NAV, here=req.path, version=__version__, **context)


def error_page(req: falcon.Request, resp: falcon.Response, exc: Exception) -> None:
    """An error the API's handler has rendered as JSON, as a page (or, for no session, the way to log in)."""
    status = int(str(resp.status).split()[0]) if not isinstance(resp.status, int) else resp.status
    try:
        message = json.loads(resp.text or "{}")["error"]["message"]
    except (ValueError, KeyError, TypeError):
        message = "error"
    shown = status
    if status == 401:
        target = f"{UI}/login" + (f"?next={quote(req.relative_uri, safe='')}" if req.method == "GET" else "")
        if req.get_header("HX-Request"):  # a fragment's poll: htmx sends the whole page there
            resp.set_header("HX-Redirect", target)
        else:
            shown = 303
            resp.location = target
    render(req, resp, "error.html", status=shown, code=status, message=message, not_found=isinstance(exc, NotFound),
           known=isinstance(exc, ApiError))


def static_url(name: str) -> str:
    """The file's URL with its content's hash in it, so it can be cached for ever and still never be stale."""
    data, _ = _static(name)
    return f"{UI}/static/{name}?v={hashlib.sha256(data).hexdigest()[:16]}"


class Static:
    """/ui/static/{name}: the vendored and our own files, open (the login page needs them)."""

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        if name not in STATIC:
            raise NotFound(f"no static file '{name}'")
        data, media = _static(name)
        resp.data, resp.content_type = data, media
        version = req.get_param("v")
        fresh = version == hashlib.sha256(data).hexdigest()[:16]
        resp.set_header("Cache-Control", "public, max-age=31536000, immutable" if fresh else "no-cache")


def _static(name: str) -> tuple[bytes, str]:
    with _files_lock:
        if name not in _files:
            rel, media = STATIC[name]
            _files[name] = ((resources.files("runner.api.ui") / "static" / rel).read_bytes(), media)
        return _files[name]


def fmt_json(value: Any) -> str:
    return json.dumps(value, indent=2, ensure_ascii=False, default=str)


_env.filters["json"] = fmt_json
_env.filters["compact"] = lambda value: json.dumps(value, ensure_ascii=False, default=str)
