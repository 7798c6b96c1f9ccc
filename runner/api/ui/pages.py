"""The dashboard's agent, run and health pages, and its login.

Each page reads exactly what the API's resource of the same thing reads (``runner.reconcile.applied``,
``runner.ledger.runs``, the runtime's ``next_runs`` and ``health``), for the session's client only: another
client's names are 404 here as there. Lists are pages of a bounded size, read with the ledger's own paged
queries, never whole tables.
"""

from __future__ import annotations

import re
from typing import Any

import falcon
import yaml

from runner import tokens
from runner.api import agents as agents_api
from runner.api.app import UI, int_param
from runner.api.errors import BadRequest, NotFound
from runner.api.runs import RUN_ID, since_param
from runner.api.ui import activity, session
from runner.api.ui.rendering import Page, render
from runner.ledger.reading import query
from runner.ledger.runs import STATUSES, TERMINAL, list_runs, transcript
from runner.reconcile.applied import AppliedAgent, load_applied
from runner.specs.models import NAME_PATTERN
from runner.supervise.runtime import Runtime
from runner.times import stamp

STATES = ("Ready", "Invalid", "Suspended", "Disabled", "Pending")
SORTS = ("name", "state", "last_run", "next_run")
TRIGGER = re.compile(r"[a-z0-9_:-]{1,40}")
RUNS_PAGE = 50
NEXT = re.compile(r"/ui(/[A-Za-z0-9._~%/?&=+-]*)?")


PLAIN_HTTP = ("This page came over plain HTTP to {host}: the session cookie is only kept over HTTPS (the Caddyfile "
              "of `make agent-orchestrator DOMAIN=...`), or on this machine itself (ssh -L 3031:127.0.0.1:3031).")


class Login(Page):
    """GET: the form; POST: a token in, the session cookie out (or 401 and the form again)."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        render(req, resp, "login.html", login_csrf=session.login_csrf(req, resp), next=_next(req.get_param("next")),
               problem=PLAIN_HTTP.format(host=req.host) if session.plain_http_elsewhere(req) else None)

    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        form = session.checked_form(req, "login")
        token = form.get("token", "").strip()
        principal = tokens.lookup(self.api.any_conn(), token) if token else None
        if principal is None or principal.client_id not in self.api.runtimes:
            render(req, resp, "login.html", status=401, login_csrf=session.login_csrf(req, resp),
                   next=_next(form.get("next")), problem="That token is unknown, revoked or expired.")
            return
        req.context.principal = principal  # the audit row names who logged in
        session.start(req, resp, token)
        resp.status, resp.location = 303, _next(form.get("next"))


class Logout(Page):
    def on_post(self, req: falcon.Request, resp: falcon.Response) -> None:
        self.session(req)
        session.checked_form(req)
        session.end(resp)
        resp.status, resp.location = 303, f"{UI}/login"


class Agents(Page):
    """The agents: state (with the reason when Invalid), revision, last run, next run; filtered and sorted."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        _, rt = self.session(req)
        state, q = req.get_param("state") or "", (req.get_param("q") or "").strip()[:63]
        sort, order = req.get_param("sort") or "name", req.get_param("order") or "asc"
        if state and state not in STATES:
            raise BadRequest(f"'state' must be one of {', '.join(STATES)}", details=["state"], code="bad_param")
        if sort not in SORTS or order not in ("asc", "desc"):
            raise BadRequest(f"'sort' must be one of {', '.join(SORTS)}, 'order' asc or desc", code="bad_param")
        lasts, nexts = agents_api.last_runs(self.api, rt), rt.next_runs()
        rows = [_agent_row(a, lasts.get(a.name), nexts.get(a.name))
                for a in load_applied(rt.conn(), rt.settings.client_id).values()
                if (not state or a.state == state) and q in a.name]
        rows.sort(key=lambda r: (r[sort] is None, r[sort] or ""), reverse=order == "desc")
        render(req, resp, "agents.html", agents=rows, state=state, q=q, sort=sort, order=order, states=STATES)


class Agent(Page):
    """One agent: its spec as in git (read-only), triggers, recent runs, tokens per day, and its actions."""

    def on_get(self, req: falcon.Request, resp: falcon.Response, name: str) -> None:
        _, rt = self.session(req)
        agent = _applied(rt, name)
        raw = rt.source.read_blob(agent.blob) if agent.blob else None
        spec_text = raw.decode("utf-8", "replace") if raw is not None else \
            yaml.safe_dump(agent.spec_dict, sort_keys=False) if agent.spec_dict else ""
        runs, _ = list_runs(rt.conn(), rt.settings.ledger_path, rt.settings.client_id, agent=name, limit=20)
        last, next_run = agents_api.last_runs(self.api, rt).get(name), rt.next_runs().get(name)
        render(req, resp, "agent.html", agent=_agent_row(agent, last, next_run), spec_text=spec_text,
               triggers=(agent.spec_dict or {}).get("triggers") or [], runs=runs,
               chart=activity.agent_tokens(rt, name), edit=_edit_commands(rt, agent))


class Runs(Page):
    """Runs, newest first, filtered by agent, status, trigger and time, a page at a time (the ledger's cursor)."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        _, rt = self.session(req)
        agent, status, trigger, since_raw, cursor = (req.get_param(k) or "" for k in
                                                     ("agent", "status", "trigger", "since", "cursor"))
        if agent and not re.fullmatch(NAME_PATTERN, agent):
            raise BadRequest("'agent' must be an agent name", details=["agent"], code="bad_param")
        if status and status not in STATUSES:
            raise BadRequest(f"'status' must be one of {', '.join(STATUSES)}", details=["status"], code="bad_param")
        if trigger and not TRIGGER.fullmatch(trigger):
            raise BadRequest("'trigger' must be a trigger kind (manual, schedule, webhook...)", details=["trigger"],
                             code="bad_param")
        if cursor and not RUN_ID.fullmatch(cursor):
            raise BadRequest("'cursor' must be a run id", details=["cursor"], code="bad_param")
        limit = int_param(req, "limit", RUNS_PAGE, 1, 200)
        since = since_param(since_raw) if since_raw else None
        runs, next_cursor = list_runs(rt.conn(), rt.settings.ledger_path, rt.settings.client_id, agent=agent or None,
                                      status=status or None, since=since, cursor=cursor or None, limit=limit,
                                      trigger=trigger or None)
        filters = {"agent": agent, "status": status, "trigger": trigger, "since": since_raw}
        agent_names = list(load_applied(rt.conn(), rt.settings.client_id))
        render(req, resp, "runs.html", runs=runs, next_cursor=next_cursor, filters=filters, statuses=STATUSES,
               agent_names=agent_names, paged=bool(cursor), limit=limit)


class Run(Page):
    """A run's transcript; the fragment (``fragment=True``) is what the page polls while the run goes on."""

    def on_get(self, req: falcon.Request, resp: falcon.Response, run_id: str) -> None:
        _, rt = self.session(req)
        found = transcript(rt.conn(), rt.settings.ledger_path, rt.settings.client_id, run_id) \
            if RUN_ID.fullmatch(run_id) else None
        if found is None:
            raise NotFound(f"no run '{run_id}'")
        ended = found["status"] in TERMINAL
        render(req, resp, "transcript.html" if self.fragment else "run.html", t=found, ended=ended)


class Health(Page):
    """The daemon: version, source and revision, the last reconciles and their errors, sandbox, executor."""

    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        _, rt = self.session(req)
        from runner.api.errors import without_credentials

        health = {k: without_credentials(v) if isinstance(v, str) else v for k, v in rt.health().items()}
        cols, rows = query(rt.settings.ledger_path, "SELECT revision, started_at, ended_at, created, updated, "
                           "deleted, invalid, initiator, error FROM reconciles WHERE client_id = ? "
                           "ORDER BY started_at DESC LIMIT 10", [rt.settings.client_id])
        reconciles = [{k: (stamp(v) if k.endswith("_at") and v is not None else v)
                       for k, v in zip(cols, r, strict=True)} for r in rows]
        for row in reconciles:
            row["error"] = without_credentials(row["error"]) if row["error"] else None
        sandbox = health.pop("sandbox", {}) or {}
        render(req, resp, "health.html", health=health, sandbox=sandbox, reconciles=reconciles,
               executor=rt.settings.executor, cluster=health.pop("cluster", None))


def _agent_row(a: AppliedAgent, last: dict[str, Any] | None, next_run: Any) -> dict[str, Any]:
    return {"name": a.name, "state": a.state, "message": a.message, "path": a.path,
            "revision": (a.applied_revision or "")[:12] or None, "suspended": a.suspended,
            "last": last, "last_run": (last or {}).get("queued_at") or (last or {}).get("started_at"),
            "next_run": stamp(next_run) if next_run else None}


def _applied(rt: Runtime, name: str) -> AppliedAgent:
    agent = load_applied(rt.conn(), rt.settings.client_id, name).get(name) if re.fullmatch(NAME_PATTERN, name) \
        else None
    if agent is None:
        raise NotFound(f"no agent named '{name}'")
    return agent


def _edit_commands(rt: Runtime, agent: AppliedAgent) -> list[str]:
    """How the agent is changed: in git, never here. The commands that would do it."""
    from runner.api.errors import without_credentials

    location = rt.source.location
    rel = "/".join(p for p in (location.path, agent.path or f"{agent.name}.yaml") if p)
    return [f"git clone {without_credentials(location.url)} specs-repo && cd specs-repo && git checkout {location.ref}",
            f"$EDITOR {rel}",
            f"agentctl validate {rel}",
            f"git commit -m 'Change agent {agent.name}' -- {rel} && git push",
            f"agentctl plan   # what the daemon will apply from {location.ref}"]


def _next(value: str | None) -> str:
    """Where to go after logging in: a dashboard page, never another site."""
    return value if value and NEXT.fullmatch(value) and "//" not in value else f"{UI}/"
