"""The dashboard (docs/dashboard.md): server-rendered pages under /ui/ on the API's own app, tokens and roles.

Its pages read what the API reads and act through what the API calls; what is its own is how a browser
is let in (``session``: the token in an HttpOnly cookie, a CSRF token in every form) and the security
headers every page carries (``Headers``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import falcon

from runner.api.app import UI, Api, is_ui
from runner.api.ui import actions, activity, pages, rendering, workflow_pages

# Scripts and styles only from here; no inline script or style, no plugin, no framing, forms post here only.
CSP = ("default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; object-src 'none'; "
       "base-uri 'none'; frame-ancestors 'none'; form-action 'self'")

ErrorHandler = Callable[[falcon.Request, falcon.Response, Exception, dict[str, Any]], None]


def install(app: falcon.App[Any, Any], api: Api) -> None:
    app.add_route(UI, pages.Agents(api))
    app.add_route(f"{UI}/login", pages.Login(api))
    app.add_route(f"{UI}/logout", pages.Logout(api))
    app.add_route(f"{UI}/static/{{name}}", rendering.Static())
    app.add_route(f"{UI}/agents/{{name}}", pages.Agent(api))
    app.add_route(f"{UI}/runs", pages.Runs(api))
    app.add_route(f"{UI}/runs/{{run_id}}", pages.Run(api))
    app.add_route(f"{UI}/runs/{{run_id}}/transcript", pages.Run(api, fragment=True))
    app.add_route(f"{UI}/workflows", workflow_pages.Workflows(api))
    app.add_route(f"{UI}/workflow-runs/{{workflow_run_id}}", workflow_pages.WorkflowRun(api))
    app.add_route(f"{UI}/workflow-runs/{{workflow_run_id}}/dag", workflow_pages.WorkflowRun(api, fragment=True))
    app.add_route(f"{UI}/approvals", workflow_pages.Approvals(api))
    app.add_route(f"{UI}/activity", activity.Activity(api))
    app.add_route(f"{UI}/health", pages.Health(api))
    for path, action in actions.ROUTES.items():
        app.add_route(f"{UI}{path}", action(api))


class Headers:
    """The security headers of every dashboard answer (docs/dashboard.md), pages and errors alike."""

    def process_response(self, req: falcon.Request, resp: falcon.Response, resource: object,
                         req_succeeded: bool) -> None:
        if not is_ui(req.path):
            return
        resp.set_header("Content-Security-Policy", CSP)
        resp.set_header("X-Content-Type-Options", "nosniff")
        resp.set_header("Referrer-Policy", "no-referrer")
        resp.set_header("X-Frame-Options", "DENY")  # frame-ancestors, for browsers that predate it
        if not resp.get_header("Cache-Control"):
            resp.set_header("Cache-Control", "no-store")


def pages_or(handle: ErrorHandler) -> ErrorHandler:
    """The app's one error handler, with the dashboard's errors as pages: the same status for the same
    error (``handle`` decides it), shown as HTML, and a missing session as the way to the login page."""

    def handle_error(req: falcon.Request, resp: falcon.Response, exc: Exception, params: dict[str, Any]) -> None:
        handle(req, resp, exc, params)
        if is_ui(req.path) and not req.path.startswith(f"{UI}/static/"):
            rendering.error_page(req, resp, exc)

    return handle_error
