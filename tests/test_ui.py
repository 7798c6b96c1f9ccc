"""The dashboard, server side: a real `agentctl serve` on a free port, real spec repositories, plain HTTP.

A `Browser` here keeps cookies as a browser would (for the path they were set on) and reads pages with
html.parser: what a browser would be sent, and what it would be refused. One daemon serves the module, for
two clients: 'default' with agents and a workflow with an approval, and 'other', whose agent must never show.
Every wait is a bounded poll, never a sleep; no test times anything.
"""

from __future__ import annotations

import hashlib
import html
import json
import re
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from html.parser import HTMLParser
from http.cookies import SimpleCookie
from pathlib import Path
from typing import Any
from urllib.parse import urlencode

import pytest
from api_helpers import Reply, Served, make_repo, poll, request, scripted, two_clients
from conftest import ROOT
from daemon_helpers import wait_ledger

from runner.api.ui import CSP

STATIC = Path(__file__).resolve().parent.parent / "runner" / "api" / "ui" / "static"
ENDED = ("succeeded", "failed", "timed_out", "budget_exceeded", "stopped", "interrupted")


@pytest.fixture(scope="module")
def main(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Served]:
    base = tmp_path_factory.mktemp("ui")
    data = base / "data"
    data.mkdir()
    files: dict[str, Any] = {
        **scripted("echo", [{"content": "done", "usage": {"input_tokens": 12, "output_tokens": 3}}], overlap="queue"),
        **scripted("peeker", [{"tool_calls": [{"name": "file_reader", "args": {"path": "/etc/shadow"}}]},
                              {"content": "could not"}], tools=[{"name": "file_reader", "paths": [str(data)]}]),
        "specs/pipeline.yaml": {"kind": "workflow", "name": "pipeline", "description": "workflow pipeline",
                                "inputs": {"topic": {"type": "string", "default": "x"}},
                                "steps": [{"id": "first", "agent": "echo", "input": "Do {{ inputs.topic }}"},
                                          {"id": "gate", "needs": ["first"], "approval": {"timeout": 3600}},
                                          {"id": "last", "needs": ["gate"], "agent": "echo"}]},
    }
    default_repo = make_repo(base / "repo-default", files)
    other_repo = make_repo(base / "repo-other", scripted("theirs", [{"content": "theirs"}]))
    served = two_clients(base, default_repo, other_repo)
    try:
        served.tokens = {role: served.token(role, f"{role}-default") for role in ("viewer", "operator", "admin")}
        served.tokens["other-operator"] = served.token("operator", "operator-other", "other")
        poll(lambda: _agents(served) >= {"echo", "peeker"}, "the agents to be applied", 60)
        yield served
    finally:
        served.stop()


def _agents(served: Served) -> set[str]:
    reply = served.api("GET", "/agents", role="viewer")
    return {a["name"] for a in reply.json["agents"]} if reply.status == 200 else set()


# -- a browser, as far as the server can tell ------------------------------------------------------------


@dataclass
class Browser:
    port: int
    cookies: dict[str, tuple[str, str]] = field(default_factory=dict)  # name: (value, path)

    def go(self, method: str, path: str, form: dict[str, str] | None = None,
           headers: dict[str, str] | None = None) -> Reply:
        sent = dict(headers or {})
        jar = "; ".join(f"{k}={v}" for k, (v, p) in self.cookies.items() if _path_matches(path, p))
        if jar:
            sent["Cookie"] = jar
        data = None
        if form is not None:
            data = urlencode(form).encode()
            sent["Content-Type"] = "application/x-www-form-urlencoded"
        reply = request(self.port, method, path, data=data, headers=sent)
        for raw in reply.headers.get_all("Set-Cookie") or []:
            cookie = SimpleCookie()
            cookie.load(raw)
            for name, morsel in cookie.items():
                if morsel["max-age"] == "0" or morsel["expires"] or not morsel.value:  # expired: unset
                    self.cookies.pop(name, None)
                else:
                    self.cookies[name] = (morsel.value, morsel["path"] or "/")
        return reply

    def page(self, path: str) -> Page:
        reply = self.go("GET", path)
        assert reply.status == 200, (path, reply.status, reply.body[:500])
        return Page.of(reply)

    def login(self, token: str) -> Reply:
        form = self.page("/ui/login").form("login-form")
        return self.go("POST", "/ui/login", {**form, "token": token})


def _path_matches(path: str, cookie_path: str) -> bool:
    path = path.split("?", 1)[0]
    return path == cookie_path or path.startswith(cookie_path.rstrip("/") + "/")


class Page(HTMLParser):
    """A page's elements with their attributes, its forms with their fields, and its script elements."""

    def __init__(self) -> None:
        super().__init__()
        self.elements: list[tuple[str, dict[str, str]]] = []
        self.forms: list[dict[str, Any]] = []
        self.scripts: list[dict[str, str]] = []
        self.inline: list[str] = []  # inline script bodies, and style attributes or elements
        self._script: dict[str, str] | None = None
        self.text = ""

    @classmethod
    def of(cls, reply: Reply) -> Page:
        page = cls()
        page.feed(reply.text)
        page.text = reply.text
        return page

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = {k: v or "" for k, v in attrs}
        self.elements.append((tag, a))
        if "style" in a or tag == "style" or any(k.startswith("on") for k in a):
            self.inline.append(f"<{tag} {a}>")
        if tag == "script":
            self.scripts.append(a)
            self._script = a
        if tag == "form":
            self.forms.append({"attrs": a, "fields": {}, "buttons": []})
        if tag in ("input", "textarea", "select") and self.forms and a.get("name"):
            self.forms[-1]["fields"][a["name"]] = a.get("value", "")
        if tag == "button" and self.forms:
            self.forms[-1]["buttons"].append(a)

    def handle_data(self, data: str) -> None:
        if self._script is not None and data.strip():
            self.inline.append(data)

    def handle_endtag(self, tag: str) -> None:
        if tag == "script":
            self._script = None

    def form(self, form_id: str) -> dict[str, str]:
        found = [f for f in self.forms if f["attrs"].get("id") == form_id]
        assert found, f"no form #{form_id}"
        fields: dict[str, str] = found[0]["fields"]
        return dict(fields)

    def posts(self) -> list[str]:
        return [f["attrs"].get("action", "") for f in self.forms if f["attrs"].get("method", "get").lower() == "post"]

    def with_attr(self, name: str, value: str | None = None) -> list[dict[str, str]]:
        return [a for _, a in self.elements if name in a and (value is None or a[name] == value)]


def logged_in(main: Served, role: str) -> Browser:
    browser = Browser(main.port)
    reply = browser.login(main.tokens[role])
    assert reply.status == 303, reply.body
    return browser


def start_run(main: Served, agent: str = "echo") -> str:
    reply = main.api("POST", f"/agents/{agent}/runs", role="operator", body={"input": "hello"})
    assert reply.status == 202, reply.body
    return str(reply.json["run_id"])


def start_pipeline(main: Served) -> str:
    reply = main.api("POST", "/workflows/pipeline/runs", role="operator", body={"inputs": {"topic": "t"}})
    assert reply.status == 202, reply.body
    run_id = str(reply.json["workflow_run_id"])

    def waiting() -> bool:
        run = main.api("GET", f"/workflow-runs/{run_id}", role="viewer").json
        return any(s["step"] == "gate" and s["status"] == "waiting" for s in run["steps"])

    poll(waiting, "the gate to wait", 60)
    return run_id


# -- logging in -------------------------------------------------------------------------------------------


def test_login_sets_an_httponly_samesite_strict_cookie_scoped_to_the_dashboard(main: Served) -> None:
    browser = Browser(main.port)
    reply = browser.login(main.tokens["viewer"])
    assert reply.status == 303 and reply.headers["Location"] == "/ui/", (reply.status, reply.headers)
    [raw] = [c for c in reply.headers.get_all("Set-Cookie") or [] if c.startswith("ao_session=")]
    attributes = {part.strip().split("=", 1)[0].lower(): part.strip() for part in raw.split(";")}
    assert "httponly" in attributes and attributes["samesite"].lower() == "samesite=strict", raw
    assert attributes["path"] == "Path=/ui", raw
    assert "secure" not in attributes, raw  # plain HTTP here: a Secure cookie would never come back
    assert browser.page("/ui/").with_attr("id", "session")[0]["data-role"] == "viewer"


def test_over_plain_http_to_another_name_the_cookie_is_secure_and_the_login_page_says_why(main: Served) -> None:
    """Behind the Caddyfile's TLS proxy the Host is the public name: the cookie is Secure, so a browser never sends
    it over plain HTTP. Plain HTTP to a name that is not this machine cannot keep it, and the login page says so."""
    public = {"Host": "agents.example.com"}
    login = request(main.port, "GET", "/ui/login", headers=public)
    assert Page.of(login).with_attr("id", "login-problem") and b"plain HTTP to agents.example.com" in login.body
    browser = Browser(main.port)
    form = browser.page("/ui/login").form("login-form")
    reply = browser.go("POST", "/ui/login", {**form, "token": main.tokens["viewer"]}, headers=public)
    [raw] = [c for c in reply.headers.get_all("Set-Cookie") or [] if c.startswith("ao_session=")]
    assert "secure" in raw.lower(), raw


def test_a_wrong_token_or_a_forged_login_is_refused(main: Served) -> None:
    browser = Browser(main.port)
    reply = browser.login("ao_" + "x" * 43)
    assert reply.status == 401 and "ao_session" not in browser.cookies
    assert Page.of(reply).with_attr("id", "login-problem")
    forged = Browser(main.port).go("POST", "/ui/login", {"token": main.tokens["viewer"], "csrf": "0" * 64})
    assert forged.status == 403, forged.status
    assert not [c for c in forged.headers.get_all("Set-Cookie") or [] if c.startswith("ao_session=")]


def test_without_a_session_pages_send_the_browser_to_log_in(main: Served) -> None:
    reply = request(main.port, "GET", "/ui/runs?status=failed")
    assert reply.status == 303 and reply.headers["Location"] == "/ui/login?next=%2Fui%2Fruns%3Fstatus%3Dfailed"
    fragment = request(main.port, "GET", "/ui/runs/abc/transcript", headers={"HX-Request": "true"})
    assert fragment.status == 401 and fragment.headers["HX-Redirect"].startswith("/ui/login")
    # The API's Authorization header does not open the dashboard either: the cookie only.
    bearer = request(main.port, "GET", "/ui/", token=main.tokens["admin"])
    assert bearer.status == 303


def test_the_session_cookie_never_authenticates_the_api(main: Served) -> None:
    cookie = {"Cookie": f"ao_session={main.tokens['admin']}"}
    for method, path in (("GET", "/agents/v1/agents"), ("POST", "/agents/v1/agents/echo/runs"),
                         ("GET", "/agents/v1/runs")):
        reply = request(main.port, method, path, headers=cookie)
        assert reply.status == 401, (path, reply.status)
        assert reply.error()["code"] == "unauthorized"


def test_logout_ends_the_session(main: Served) -> None:
    browser = logged_in(main, "viewer")
    form = browser.page("/ui/").form("logout-form")
    out = browser.go("POST", "/ui/logout", form)
    assert out.status == 303 and out.headers["Clear-Site-Data"] == '"cache"'  # Back shows nothing it saw
    assert "ao_session" not in browser.cookies
    assert browser.go("GET", "/ui/").status == 303


# -- pages --------------------------------------------------------------------------------------------------


def test_every_page_renders_for_a_viewer_without_actions_under_the_csp(main: Served) -> None:
    run_id = start_run(main)
    main.wait_run(run_id)
    workflow_run = start_pipeline(main)
    browser = logged_in(main, "viewer")
    paths = ["/ui/", "/ui/?state=Ready&sort=last_run&order=desc", "/ui/agents/echo", "/ui/runs",
             "/ui/runs?agent=echo&status=succeeded&trigger=manual&since=1d", f"/ui/runs/{run_id}",
             f"/ui/runs/{run_id}/transcript", "/ui/workflows", f"/ui/workflow-runs/{workflow_run}",
             f"/ui/workflow-runs/{workflow_run}/dag", "/ui/approvals", "/ui/activity", "/ui/health", "/ui/login"]
    for path in paths:
        reply = browser.go("GET", path)
        assert reply.status == 200, (path, reply.status, reply.body[:300])
        assert reply.headers["Content-Security-Policy"] == CSP, path
        assert "script-src 'self'" in CSP and "unsafe-inline" not in CSP
        assert reply.headers["X-Content-Type-Options"] == "nosniff"
        assert reply.headers["Referrer-Policy"] == "no-referrer"
        assert reply.headers["Cache-Control"] == "no-store"
        page = Page.of(reply)
        assert all(s.get("src") for s in page.scripts), (path, page.scripts)
        assert not page.inline, (path, page.inline)
        assert set(page.posts()) <= {"/ui/logout", "/ui/login"}, (path, page.posts())
        assert not page.with_attr("data-action"), path
    full = browser.page("/ui/")
    meta = [a for tag, a in full.elements if tag == "meta" and a.get("name") == "htmx-config"]
    assert json.loads(meta[0]["content"])["includeIndicatorStyles"] is False


def test_the_agents_table_shows_state_revision_and_last_run(main: Served) -> None:
    run_id = start_run(main)
    main.wait_run(run_id)
    page = logged_in(main, "viewer").page("/ui/")
    rows = {a["data-agent"]: a for a in page.with_attr("data-agent") if "data-state" in a}
    assert set(rows) == {"echo", "peeker"}, rows
    assert rows["echo"]["data-state"] == "Ready"
    filtered = logged_in(main, "viewer").page("/ui/?q=pee")
    assert {a["data-agent"] for a in filtered.with_attr("data-agent")} == {"peeker"}


def test_a_transcript_shows_a_denied_tool_call_and_stops_polling_when_the_run_ended(main: Served) -> None:
    run_id = start_run(main, "peeker")
    main.wait_run(run_id)
    page = logged_in(main, "viewer").page(f"/ui/runs/{run_id}")
    [box] = page.with_attr("id", "transcript")
    assert box["data-status"] in ENDED and box["data-ended"] == "true" and "hx-get" not in box, box
    denied = page.with_attr("data-decision", "denied")
    assert denied and denied[0]["class"].split().count("step-denied") == 1, page.text
    assert page.with_attr("data-type", "model_call")


def test_another_clients_agent_is_absent_and_404(main: Served) -> None:
    theirs = main.request("POST", "/agents/v1/agents/theirs/runs", token=main.tokens["other-operator"])
    assert theirs.status == 202, theirs.body
    their_run = theirs.json["run_id"]
    browser = logged_in(main, "operator")
    assert "theirs" not in browser.page("/ui/").text
    assert "theirs" not in browser.page("/ui/runs").text
    for path in ("/ui/agents/theirs", f"/ui/runs/{their_run}", f"/ui/runs/{their_run}/transcript"):
        assert browser.go("GET", path).status == 404, path
    form = browser.page("/ui/agents/echo").form("run-agent-form")
    assert browser.go("POST", "/ui/agents/theirs/run", form).status == 404


# -- actions -----------------------------------------------------------------------------------------------


def test_an_operator_runs_an_agent_through_the_form_and_the_audit_names_the_token(main: Served) -> None:
    browser = logged_in(main, "operator")
    page = browser.page("/ui/agents/echo")
    assert page.with_attr("id", "run-agent-button")
    form = page.form("run-agent-form")
    marker = f"from the dashboard {hashlib.sha256(str(id(page)).encode()).hexdigest()[:8]}"
    reply = browser.go("POST", "/ui/agents/echo/run", {**form, "input": marker})
    assert reply.status == 303, (reply.status, reply.body[:300])
    run_id = re.fullmatch(r"/ui/runs/([0-9a-f]+)", reply.headers["Location"]).group(1)  # type: ignore[union-attr]
    run = main.wait_run(run_id)
    assert run["input"] == marker and run["requested_by"] == "ui:operator-default", run
    assert run["status"] == "succeeded"
    action = "POST /ui/agents/{name}/run"

    found = wait_ledger(main.home, "SELECT actor, outcome, client_id FROM audit WHERE action = ? AND target = ?",
                        [action, "/ui/agents/echo/run"], until=bool, what="the dashboard's run in the audit table",
                        timeout=30)
    rows = [tuple(r.values()) for r in found]
    leaked = wait_ledger(main.home, "SELECT count(*) AS n FROM audit WHERE contains(coalesce(target, '') || "
                         "coalesce(CAST(detail AS VARCHAR), '') || coalesce(actor, ''), ?)", [main.tokens["operator"]],
                         until=bool, what="the audit table")
    assert leaked == [{"n": 0}], "a token reached the audit table"
    assert ("operator-default", "303", "default") in rows, rows


def test_a_post_without_or_with_a_wrong_csrf_token_is_403_and_starts_nothing(main: Served) -> None:
    browser = logged_in(main, "operator")
    form = browser.page("/ui/agents/echo").form("run-agent-form")
    before = {r["run_id"] for r in main.api("GET", "/runs?agent=echo&limit=1000", role="viewer").json["runs"]}
    other = logged_in(main, "admin")  # another session's token is as wrong as none
    other_token = other.page("/ui/agents/echo").form("run-agent-form")["csrf"]
    assert other_token != form["csrf"]
    for csrf in (None, "", "0" * 64, other_token):
        sent = {k: v for k, v in form.items() if k != "csrf"}
        if csrf is not None:
            sent["csrf"] = csrf
        reply = browser.go("POST", "/ui/agents/echo/run", {**sent, "input": "forged"})
        assert reply.status == 403, (csrf, reply.status)
    cross = browser.go("POST", "/ui/agents/echo/run", {**form, "input": "forged"},
                       headers={"Sec-Fetch-Site": "cross-site"})
    assert cross.status == 403
    after = {r["run_id"] for r in main.api("GET", "/runs?agent=echo&limit=1000", role="viewer").json["runs"]}
    assert after == before


def test_a_viewers_post_is_403_even_with_its_own_csrf_token(main: Served) -> None:
    browser = logged_in(main, "viewer")
    csrf = browser.page("/ui/").form("logout-form")["csrf"]
    before = len(main.api("GET", "/runs?agent=echo&limit=1000", role="viewer").json["runs"])
    for path in ("/ui/agents/echo/run", "/ui/agents/echo/stop", "/ui/workflows/pipeline/run"):
        reply = browser.go("POST", path, {"csrf": csrf, "input": "x"})
        assert reply.status == 403, (path, reply.status)
        assert Page.of(reply).with_attr("id", "error")[0]["data-code"] == "403"
    assert len(main.api("GET", "/runs?agent=echo&limit=1000", role="viewer").json["runs"]) == before
    assert main.api("GET", "/agents/echo", role="viewer").json["suspended"] is False


def test_the_approvals_page_approves_a_waiting_step(main: Served) -> None:
    run_id = start_pipeline(main)
    browser = logged_in(main, "operator")
    page = browser.page("/ui/approvals")
    forms = [f for f in page.forms if f["attrs"].get("data-workflow-run-id") == run_id]
    assert forms and forms[0]["attrs"]["data-step"] == "gate", page.forms
    assert {b.get("data-action") for b in forms[0]["buttons"]} == {"approve", "reject"}
    fields = {**forms[0]["fields"], "comment": "looks fine", "decision": "approve"}
    reply = browser.go("POST", forms[0]["attrs"]["action"], fields)
    assert reply.status == 303 and reply.headers["Location"] == "/ui/approvals", (reply.status, reply.body[:300])

    def done() -> dict[str, Any] | None:
        run: dict[str, Any] = main.api("GET", f"/workflow-runs/{run_id}", role="viewer").json
        return run if run["status"] in ENDED else None

    run = poll(done, "the pipeline to finish after the approval", 60)
    assert run["status"] == "succeeded", run
    assert run["approvals"][0]["approved"] is True and run["approvals"][0]["comment"] == "looks fine"
    assert run["approvals"][0]["by"] == "ui:operator-default", run["approvals"]
    dag = browser.page(f"/ui/workflow-runs/{run_id}")
    nodes = {a["data-step"]: a["data-status"] for tag, a in dag.elements if tag == "g" and "data-step" in a}
    assert nodes == {"first": "succeeded", "gate": "succeeded", "last": "succeeded"}, nodes
    [box] = dag.with_attr("id", "dag")
    assert "hx-get" not in box  # the run ended: the page stops polling


def test_an_operator_stops_and_starts_an_agent(main: Served) -> None:
    browser = logged_in(main, "operator")
    page = browser.page("/ui/agents/peeker")
    reply = browser.go("POST", "/ui/agents/peeker/stop", page.form("stop-agent-form"))
    assert reply.status == 303 and reply.headers["Location"] == "/ui/agents/peeker"
    assert main.api("GET", "/agents/peeker", role="viewer").json["suspended"] is True
    reply = browser.go("POST", "/ui/agents/peeker/start", page.form("start-agent-form"))
    assert reply.status == 303 and reply.headers["Location"].startswith("/ui/runs/")
    assert main.api("GET", "/agents/peeker", role="viewer").json["suspended"] is False


def test_an_operator_runs_cancels_and_resumes_a_workflow_through_the_forms(main: Served) -> None:
    browser = logged_in(main, "operator")
    page = browser.page("/ui/workflows")
    [form] = [f for f in page.forms if f["attrs"].get("data-workflow") == "pipeline"]
    reply = browser.go("POST", form["attrs"]["action"], {**form["fields"], "input.topic": "from the form"})
    assert reply.status == 303, (reply.status, reply.body[:300])
    run_id = reply.headers["Location"].removeprefix("/ui/workflow-runs/")
    run = main.api("GET", f"/workflow-runs/{run_id}", role="viewer").json
    assert run["inputs"] == {"topic": "from the form"} and run["requested_by"] == "ui:operator-default", run
    huge = browser.go("POST", form["attrs"]["action"], {**form["fields"], "input.topic": "x" * 70_000})
    assert huge.status == 400, huge.status  # the API's bound on a string, as the API has it

    page = browser.page(f"/ui/workflow-runs/{run_id}")
    [box] = page.with_attr("id", "dag")
    assert box.get("hx-trigger") == "every 1s" or box["data-ended"] == "true", box
    reply = browser.go("POST", f"/ui/workflow-runs/{run_id}/cancel", page.form("cancel-form"))
    assert reply.status == 303, (reply.status, reply.body[:300])

    def ended() -> dict[str, Any] | None:
        found: dict[str, Any] = main.api("GET", f"/workflow-runs/{run_id}", role="viewer").json
        return found if found["status"] in ENDED else None

    assert poll(ended, "the cancelled run to stop", 60)["status"] == "stopped"
    page = browser.page(f"/ui/workflow-runs/{run_id}")
    assert not page.with_attr("id", "cancel-form")
    reply = browser.go("POST", f"/ui/workflow-runs/{run_id}/resume", page.form("resume-form"))
    assert reply.status == 303, (reply.status, reply.body[:300])
    assert main.api("GET", f"/workflow-runs/{run_id}", role="viewer").json["attempt"] == 2
    again = browser.go("POST", f"/ui/workflow-runs/{run_id}/cancel", {"csrf": page.form("resume-form")["csrf"]})
    assert again.status == 303  # (the resumed run is cancelled again: the test leaves nothing running)


# -- static files ------------------------------------------------------------------------------------------


def test_the_vendored_files_are_served_as_they_were_vendored(main: Served) -> None:
    page = Browser(main.port).page("/ui/login")
    srcs = [s["src"] for s in page.scripts]
    assert any(s.startswith("/ui/static/htmx.min.js?v=") for s in srcs), srcs
    for name, rel, kind in (("htmx.min.js", "vendor/htmx.min.js", "text/javascript"),
                            ("uPlot.iife.min.js", "vendor/uPlot.iife.min.js", "text/javascript"),
                            ("uPlot.min.css", "vendor/uPlot.min.css", "text/css"),
                            ("dashboard.js", "dashboard.js", "text/javascript")):
        data = (STATIC / rel).read_bytes()
        reply = request(main.port, "GET", f"/ui/static/{name}?v={hashlib.sha256(data).hexdigest()[:16]}")
        assert reply.status == 200 and reply.body == data, name
        assert reply.headers["Content-Type"].startswith(kind)
        assert "immutable" in reply.headers["Cache-Control"]
        assert reply.headers["X-Content-Type-Options"] == "nosniff"
    vendored = (STATIC / "VENDORED.md").read_text()
    for rel in ("vendor/htmx.min.js", "vendor/uPlot.iife.min.js", "vendor/uPlot.min.css"):
        assert hashlib.sha256((STATIC / rel).read_bytes()).hexdigest() in vendored, rel
    assert request(main.port, "GET", "/ui/static/..%2F__init__.py").status == 404


# -- activity --------------------------------------------------------------------------------------------


def test_activity_shows_the_numbers_agentctl_history_sql_gives(main: Served) -> None:
    """The tokens-per-day table and the command under it: that command, run, gives the same numbers."""
    main.wait_run(start_run(main))
    browser = logged_in(main, "viewer")

    def shown() -> tuple[dict[str, int], str] | None:
        text = browser.page("/ui/activity").text
        table = text[text.index('id="tokens-per-day"'):]
        rows = {day: int(n) for day, n in re.findall(
            r'<tr><td>([0-9-]+)</td><td>echo</td><td class="num">([0-9]+)</td></tr>', table)}
        command = html.unescape(re.search(r"<code>(agentctl history --sql .*?)</code>", table, re.S).group(1))  # type: ignore[union-attr]
        return (rows, command) if rows else None

    def same() -> bool:
        rows, command = poll(shown, "echo's tokens on the activity page", 30)
        assert command.startswith('agentctl history --sql "') and command.endswith('"'), command
        sql = command.removeprefix('agentctl history --sql "').removesuffix('"').replace('\\"', '"')
        done = subprocess.run([sys.executable, "-m", "runner", "--home", str(main.home), "--output", "json",
                               "history", "--sql", sql], cwd=ROOT, env=main.env, capture_output=True, text=True,
                              timeout=120, check=False)
        assert done.returncode == 0, done.stderr
        cli = {str(r["day"])[:10]: int(r["tokens"]) for r in json.loads(done.stdout) if r["agent"] == "echo"}
        return bool(cli) and cli == rows

    poll(same, "the page and agentctl history --sql to agree", 60)
