"""Event triggers: webhooks and run_completed. Each event is a delivery (``runner.ledger.deliveries``) before it
starts anything: durable, de-duplicated, replayable, and started at the next start when the daemon died
between accepting it and starting its run (docs/events.md).

``update`` arms the triggers from the applied specs (the daemon calls it with the schedules'); ``webhook``
takes a POST; the process table and the workflow engine tell ``ended`` of each run's end, which a worker
thread turns into the run_completed deliveries it fires (the run's end path never waits for them).
"""

from __future__ import annotations

import json
import logging
import os
import queue
import signal
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any, NoReturn

from runner import tokens
from runner.agent.recording import Links, new_run_id
from runner.errors import ExpressionError, NotFoundError, OrchestratorError, UnauthenticatedError, UsageError
from runner.ledger.deliveries import Delivery, accept, decide, get_delivery, new_delivery_id, pending, prune
from runner.settings import Settings
from runner.specs.checking import expand
from runner.specs.models import AgentSpec, RunCompletedTrigger, WebhookTrigger, WorkflowSpec
from runner.state import PerThread
from runner.supervise.evaluator import Evaluator
from runner.supervise.table import ProcessTable
from runner.supervise.workflows import WorkflowEngine
from runner.times import stamp, utcnow

log = logging.getLogger("runner.events")
MAX_SECRET = 4096  # bytes of a secret file read
MAX_KEY = 512  # characters of a dedupe key kept
# Headers a delivery keeps for its templates and a replay: never the proof of the secret.
SECRET_HEADERS = {"authorization", "x-hub-signature-256", "x-hub-signature", "x-gitea-signature", "x-gitlab-token",
                  "cookie", "proxy-authorization"}
OPS = ("delivery.replay",)  # the control socket's requests (`agentctl deliveries replay`)
CRASH_AT = "AGENT_ORCH_TEST_CRASH_AT"  # fault injection for the tests: the daemon kills itself at this point


KEEP_DAYS = 30  # a delivery's live row (its event, its dedupe key) is kept this long; its ledger row for ever
PRUNE_EVERY = 3600.0  # seconds between two prunings
SAY_AGAIN = 3600.0  # seconds before the log says again that a hook has no secret
MAX_NESTING = 64  # levels of a payload's JSON: deeper ones are no event anyone sends, and cost recursion


def strict_json(text: str) -> Any:
    """JSON as the standard has it: no NaN or Infinity (nothing downstream could read them back), at most
    MAX_NESTING levels deep. Raises ValueError."""
    def refuse(constant: str) -> Any:
        raise ValueError(f"{constant} is not JSON")

    depth = deepest = 0
    quoted = escaped = False
    for ch in text:  # the nesting, counted before anything recurses into it
        if quoted:
            escaped, quoted = (False, quoted) if escaped else (ch == "\\", ch != '"')
        elif ch == '"':
            quoted = True
        elif ch in "[{":
            depth += 1
            deepest = max(deepest, depth)
            if deepest > MAX_NESTING:
                raise ValueError(f"it is nested more than {MAX_NESTING} levels deep")
        elif ch in "]}":
            depth -= 1
    return json.loads(text, parse_constant=refuse)


@dataclass(frozen=True)
class Target:
    name: str
    kind: str  # agent or workflow
    trigger: WebhookTrigger | RunCompletedTrigger


@dataclass
class Received:
    """What a webhook's POST became: the delivery that answers it, and whether it was a redelivery."""

    delivery: Delivery
    duplicate: bool

    def as_json(self) -> dict[str, Any]:
        d = self.delivery
        out: dict[str, Any] = {"delivery_id": d.delivery_id,
                               ("workflow_run_id" if d.kind == "workflow" else "run_id"): d.run_id,
                               "decision": d.decision}
        if d.reason:
            out["reason"] = d.reason
        if self.duplicate:
            out["duplicate"] = True
        return out


class Events:
    def __init__(self, settings: Settings, table: ProcessTable, workflows: WorkflowEngine) -> None:
        self.settings, self.table, self.workflows = settings, table, workflows
        self.client_id = settings.client_id
        self._conns = PerThread(settings.state_path)
        self.hooks: dict[str, Target] = {}  # URL segment -> what it starts
        self.watchers: dict[tuple[str, str], list[Target]] = {}  # (kind, name) watched -> who fires on its ends
        self.on_refused: Callable[[str], None] | None = None  # metrics: a POST refused before a delivery (why)
        self.on_decided: Callable[[str, str], None] | None = None  # metrics: (trigger type, decision)
        self._pruned = -PRUNE_EVERY  # first pruned with the first delivery
        self._warned: dict[str, float] = {}  # hooks without a secret, when the log last said so
        self._ends: queue.Queue[tuple[str, str, str, str, str | None, int] | None] = queue.Queue()
        self._thread = threading.Thread(target=self._fire_loop, name=f"events-{self.client_id}", daemon=True)
        self._thread.start()

    @property
    def evaluator(self) -> Evaluator:
        return self.workflows.evaluator  # templates run where workflows' expressions do, with their limits

    def update(self, specs: Mapping[str, AgentSpec | WorkflowSpec]) -> None:
        """Arm the webhook and run_completed triggers of these runnable agents and workflows."""
        hooks: dict[str, Target] = {}
        watchers: dict[tuple[str, str], list[Target]] = {}
        for name, spec in sorted(specs.items()):
            kind = "workflow" if isinstance(spec, WorkflowSpec) else "agent"
            for trig in spec.triggers:
                if isinstance(trig, WebhookTrigger):
                    hooks.setdefault(trig.path or name, Target(name, kind, trig))
                elif isinstance(trig, RunCompletedTrigger):
                    source = ("agent", trig.agent) if trig.agent else ("workflow", str(trig.workflow))
                    watchers.setdefault(source, []).append(Target(name, kind, trig))
        self.hooks, self.watchers = hooks, watchers

    # -- webhooks -------------------------------------------------------------------------------------

    def webhook(self, segment: str, header: Callable[[str], str | None], headers: dict[str, str],
                body: bytes) -> Received:
        """A POST to the hook at ``segment``. Raises NotFoundError (no such hook), UnauthenticatedError (no or
        wrong proof of the secret) or UsageError (the body is no JSON, a template failed: a rejected delivery)."""
        target = self.hooks.get(segment)
        if target is None:
            raise NotFoundError(f"no webhook '{segment}' for client '{self.client_id}'")
        trig = target.trigger
        assert isinstance(trig, WebhookTrigger)
        secret = self._secret(target.name, trig)
        proven = secret is not None and (tokens.signed(body, secret, header, gitlab=False) if trig.auth == "hmac"
                                         else tokens.bearer_is(header, secret))
        if not proven:
            if self.on_refused is not None:
                self.on_refused("no_secret" if secret is None else "unauthenticated")
            raise UnauthenticatedError("the request does not carry the proof of the webhook's secret (an HMAC "
                                       "signature or a bearer secret, as the webhook's spec says)")
        kept = {k.lower(): v for k, v in headers.items() if k.lower() not in SECRET_HEADERS}
        # One dedupe scope per hook: a sender holding one hook's secret cannot mark another hook's events as seen.
        delivery = Delivery(new_delivery_id(), self.client_id, f"webhook:{segment}", target.name, target.kind,
                            utcnow(), None, "accepted", None, new_run_id(), {})
        try:
            payload = strict_json(body.decode("utf-8")) if body.strip() else {}
        except (UnicodeDecodeError, ValueError, RecursionError) as exc:
            self._refuse(delivery, f"the body is not JSON: {str(exc)[:200]}")
        event = {"headers": kept, "payload": payload, "event": {"type": "webhook", "target": target.name}}
        try:
            key = self._render(trig.dedupe, event).strip()[:MAX_KEY] if trig.dedupe else ""
            inputs = {name: self._render(text, event) for name, text in trig.inputs.items()}
        except ExpressionError as exc:
            self._refuse(delivery, f"a template of the webhook failed: {exc}")
        delivery.dedupe_key = key or None
        delivery.event = {"headers": kept, "event": event["event"], "input": body.decode("utf-8"), "inputs": inputs}
        first = self._accept(delivery)
        if first is not delivery:
            log.info("delivery %s for %s: a redelivery of %s", delivery.delivery_id, target.name, first.delivery_id)
            return Received(first, True)
        if os.environ.get(CRASH_AT) == "delivery-accepted":
            os.kill(os.getpid(), signal.SIGKILL)
        refused = self._start(delivery)
        if refused is not None:  # what was sent cannot start its target (a workflow's inputs): the sender's to fix
            raise UsageError(refused.message, details=refused.details)
        return Received(delivery, False)

    def _refuse(self, delivery: Delivery, reason: str) -> NoReturn:
        delivery.decision, delivery.run_id, delivery.reason = "rejected", None, reason
        self._accept(delivery)
        raise UsageError(reason)

    def _accept(self, d: Delivery) -> Delivery:
        """``accept``, counted: the delivery itself, or the first one when ``d`` is a redelivery."""
        if time.monotonic() > self._pruned + PRUNE_EVERY:
            self._pruned = time.monotonic()
            cutoff = stamp(datetime.now(UTC) - timedelta(days=KEEP_DAYS))
            if forgotten := prune(self._conns.get(), self.client_id, cutoff):
                log.info("forgot %d deliveries received over %d days ago (their ledger rows stay)", forgotten,
                         KEEP_DAYS)
        first = accept(self._conns.get(), d)
        if d.decision != "accepted":  # a duplicate, or refused as it came
            self._count(d)
        return first

    def _decide(self, d: Delivery, decision: str, reason: str | None = None) -> None:
        decide(self._conns.get(), d, decision, reason)
        self._count(d)

    def _count(self, d: Delivery) -> None:
        if self.on_decided is not None:
            self.on_decided(d.trigger.split(":", 1)[0], d.decision)

    def _render(self, text: str, event: dict[str, Any]) -> str:
        return str(self.evaluator.ask("render", text, {"inputs": {}, "steps": {}, **event})[0])

    def _secret(self, name: str, trig: WebhookTrigger) -> str | None:
        """The webhook's secret, from the daemon's environment or its file (read at each delivery, so a rotated
        secret needs no restart); None, said in the log, when there is none: such a hook accepts nothing."""
        if trig.secret_env:
            value = os.environ.get(trig.secret_env, "")
            where = f"${trig.secret_env}"
        else:
            path = expand(str(trig.secret_file), {"CLIENT_ID": self.client_id, "AGENT_NAME": name,
                                                  "AGENT_ORCH_HOME": str(self.settings.home)})
            where = path
            try:
                with open(path, "rb") as f:
                    value = f.read(MAX_SECRET).decode("utf-8", "replace").strip()
            except OSError as exc:
                value = ""
                where = f"{path} ({exc.strerror})"
        if not value:
            if time.monotonic() > self._warned.get(name, -SAY_AGAIN) + SAY_AGAIN:  # once an hour, not once a request
                self._warned[name] = time.monotonic()
                log.warning("webhook of %s: its secret %s is empty or missing: every delivery is refused", name, where)
            return None
        return value

    # -- starting what a delivery asks ------------------------------------------------------------------

    def _start(self, d: Delivery) -> OrchestratorError | None:
        """Start the run a delivery was accepted for, under the id chosen then, and record the decision; the error
        when its target refused it (a skipped run, per the overlap policy, is a decision, not an error)."""
        links = Links(**d.event.get("links", {}))
        trigger = d.trigger.split(":", 1)[0]
        who = f"delivery:{d.delivery_id}"
        if links.chain_depth > self.settings.max_chain_depth:  # a replay of a chain that went too deep, too
            self._decide(d, "rejected", f"chain depth {links.chain_depth} is past AGENT_ORCH_MAX_CHAIN_DEPTH "
                         f"({self.settings.max_chain_depth})")
            return None
        try:
            if d.kind == "workflow":
                event: dict[str, Any] = {k: d.event[k] for k in ("event", "headers", "payload") if k in d.event}
                if "payload" not in event:  # a webhook's: kept once, as the body it came as
                    event["payload"] = strict_json(d.event.get("input") or "{}")
                self.workflows.start(d.target, d.event.get("inputs") or {}, trigger=trigger, requested_by=who,
                                     wf_id=d.run_id, event=event, links=links)
            else:
                request = self.table.submit(d.target, trigger=trigger, input=d.event.get("input"), requested_by=who,
                                            run_id=d.run_id, links=links)
                if request.status == "skipped":
                    self._decide(d, "rejected", request.row.error if request.row else "skipped")
                    return None
        except OrchestratorError as exc:
            self._decide(d, "rejected", exc.message)
            log.warning("delivery %s for %s rejected: %s", d.delivery_id, d.target, exc.message)
            return exc
        self._decide(d, "started")
        return None

    def recover(self) -> None:
        """At start: the deliveries a previous daemon accepted but may not have started. One whose run exists (it
        died after starting it) is only recorded as started; the others start now, under their ids."""
        conn = self._conns.get()
        for d in pending(conn, self.client_id):
            exists = conn.execute("SELECT 1 FROM run_progress WHERE run_id = ? UNION ALL "
                                  "SELECT 1 FROM wf_runs WHERE workflow_run_id = ?", (d.run_id, d.run_id)).fetchone()
            if exists:
                self._decide(d, "started")
            else:
                log.warning("delivery %s for %s: accepted before the last daemon stopped, not started: starting it",
                            d.delivery_id, d.target)
                self._start(d)

    def replay(self, delivery_id: str, requested_by: str) -> Delivery:
        """A new delivery of a stored event (a duplicate's: its first one's), started now; dedupe does not apply."""
        conn = self._conns.get()
        old = get_delivery(conn, self.client_id, delivery_id)
        if old is None:
            raise NotFoundError(f"no delivery {delivery_id} for client '{self.client_id}'")
        if old.decision == "duplicate":
            first = conn.execute("SELECT delivery_id FROM deliveries WHERE client_id = ? AND trigger = ? AND "
                                 "dedupe_key = ? AND decision != 'duplicate'",
                                 (self.client_id, old.trigger, old.dedupe_key)).fetchone()
            old = (get_delivery(conn, self.client_id, first[0]) if first else None) or old
        if not old.event:
            raise UsageError(f"delivery {delivery_id} kept no event to replay (it was refused before it had one)")
        new = Delivery(new_delivery_id(), self.client_id, old.trigger, old.target, old.kind, utcnow(), None,
                       "accepted", f"replay of {old.delivery_id} by {requested_by}", new_run_id(), old.event)
        self._accept(new)
        self._start(new)
        log.info("delivery %s replayed as %s by %s", old.delivery_id, new.delivery_id, requested_by)
        return new

    def handle(self, request: dict[str, Any]) -> dict[str, Any]:
        """A control socket request (OPS), answered as the socket answers."""
        try:
            new = self.replay(str(request.get("id")), str(request.get("requested_by") or "cli"))
            return {"ok": True, **new.as_json()}
        except OrchestratorError as exc:
            return {"ok": False, "code": exc.code, "error": exc.message}

    # -- run_completed ----------------------------------------------------------------------------------

    def ended(self, kind: str, name: str, run_id: str, status: str, output: str | None, chain_depth: int) -> None:
        """A run (or workflow run) ended: its watchers fire, on the events thread."""
        if self.watchers.get((kind, name)):
            self._ends.put((kind, name, run_id, status, output, chain_depth))

    def close(self) -> None:
        self._ends.put(None)

    def _fire_loop(self) -> None:
        while True:
            end = self._ends.get()
            if end is None:
                return
            try:
                self._fire(*end)
            except Exception:  # one end's trouble never stops the next
                log.exception("run_completed: firing for the end of %s failed", end[2])

    def _fire(self, kind: str, name: str, run_id: str, status: str, output: str | None, chain_depth: int) -> None:
        depth = chain_depth + 1
        for target in self.watchers.get((kind, name), []):
            trig = target.trigger
            assert isinstance(trig, RunCompletedTrigger)
            if status not in trig.status:
                continue
            payload = {"run_id": run_id, kind: name, "status": status, "output": output}
            d = Delivery(new_delivery_id(), self.client_id, f"run_completed:{target.name}", target.name, target.kind,
                         utcnow(), run_id, "accepted", None, new_run_id(),
                         {"payload": payload, "headers": {}, "event": {"type": "run_completed", **payload},
                          "input": output or "", "inputs": {},
                          "links": {"trigger_run_id": run_id, "chain_depth": depth}})
            if depth > self.settings.max_chain_depth:
                d.decision, d.run_id = "rejected", None
                d.reason = (f"chain depth {depth} is past AGENT_ORCH_MAX_CHAIN_DEPTH ({self.settings.max_chain_depth})"
                            f": the end of {run_id} starts nothing")
                self._accept(d)
                log.warning("%s: %s", target.name, d.reason)
                continue
            if self._accept(d) is d:
                self._start(d)
