"""Prometheus metrics. Values that are state (runs in flight, revisions, invalid specs) are read at
scrape time by a collector, so no stale series outlive what they describe; events (runs ended, tool
calls, requests) are counters fed as they happen. Labels take bounded values only: client, agent
(bounded by the applied specs), status, tool, decision, route template.

What runs did is counted from the rows the daemon's ledger flush moves (``observe_row``): each run's
final row (status, tokens, denials, tool errors, CPU, bytes written) and each tool call event, once,
whenever it is archived. The live store forgets a run once it is archived, so nothing there can be
counted at scrape time. At start the counters take the totals the ledger holds already (one DuckDB
aggregate), so a restart carries them on; the rows still in the journal are counted when they move.

One registry holds every client's series; nobody is shown all of it. ``exposition(client)`` gives a
client its own series (and the API's, which name no client); ``exposition(None)``, for the open
endpoint, gives totals over every client, with the labels that name a client's things summed away.
"""

from __future__ import annotations

import logging
from collections import OrderedDict
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from runner.ledger.runs import TERMINAL, client_of, totals
from runner.reconcile.applied import load_applied
from runner.supervise.runtime import Runtime
from runner.times import parse

log = logging.getLogger("runner.metrics")
REMEMBERED = 20_000  # run ids kept: each run's client (events name none), and the runs counted already


MAX_TOOL_LABELS = 100  # tool names per client that get a series of their own


class Metrics:
    def __init__(self, runtimes: dict[str, Runtime]) -> None:
        self.runtimes = runtimes
        self._tools: dict[str, set[str]] = {}
        self._run_clients: OrderedDict[str, str] = OrderedDict()
        self._counted: OrderedDict[str, None] = OrderedDict()
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.run_seconds = Histogram("agent_orch_run_duration_seconds", "Run duration.", ["client"], registry=r,
                                     buckets=(0.05, 0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600))
        self.dispatch = Histogram("agent_orch_dispatch_latency_seconds", "Trigger to hand-off to a run process.",
                                  ["client"], registry=r, buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.5, 1, 5))
        self.trigger_lag = Histogram("agent_orch_trigger_lag_seconds", "Schedule slot to run submission.",
                                     ["client"], registry=r, buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30, 120))
        self.reconcile_seconds = Histogram("agent_orch_reconcile_duration_seconds", "Reconcile duration.",
                                           ["client"], registry=r, buckets=(0.01, 0.05, 0.1, 0.5, 1, 5, 30))
        self.requests = Counter("agent_orch_api_requests", "API requests by route and status.",
                                ["method", "route", "status"], registry=r)
        self.request_seconds = Histogram("agent_orch_api_request_duration_seconds", "API request duration.",
                                         ["route"], registry=r, buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.5, 1))
        self.step_seconds = Histogram("agent_orch_workflow_step_duration_seconds", "Workflow step duration, from "
                                      "its start to its end (an approval's wait included).", ["client", "workflow"],
                                      registry=r, buckets=(0.1, 0.5, 1, 5, 15, 60, 300, 900, 3600, 86400))
        self.runs = Counter("agent_orch_runs", "Runs ended, by final status.", ["client", "agent", "status"],
                            registry=r)
        self.deliveries = Counter("agent_orch_deliveries", "Events received (webhooks, run ends), by trigger type "
                                  "and decision: started, duplicate, rejected.", ["client", "trigger", "decision"],
                                  registry=r)
        self.webhook_refused = Counter("agent_orch_webhook_refused", "Webhook POSTs refused before any delivery: "
                                       "no secret configured, or no proof of it.", ["client", "reason"], registry=r)
        self.tokens = Counter("agent_orch_tokens", "Model tokens used.", ["client", "agent", "kind"], registry=r)
        self.tool_calls = Counter("agent_orch_tool_calls", "Tool calls by tool and decision.",
                                  ["client", "tool", "decision"], registry=r)
        self.denied = Counter("agent_orch_run_denied_tool_calls", "Tool calls denied, by the agent of the run.",
                              ["client", "agent"], registry=r)
        self.tool_errors = Counter("agent_orch_run_tool_errors", "Tool calls allowed that failed, by the agent of "
                                   "the run.", ["client", "agent"], registry=r)
        self.cpu = Counter("agent_orch_run_cpu_seconds", "CPU time of the runs' processes.", ["client", "agent"],
                           registry=r)
        self.written = Counter("agent_orch_run_written_bytes", "Bytes the runs' processes wrote.",
                               ["client", "agent"], registry=r)
        self._start_from_ledger()
        r.register(_StateCollector(self))

    def exposition(self, client: str | None) -> bytes:
        """Prometheus text: ``client``'s own series, or with ``None`` the totals that name nobody."""
        return generate_latest(_View(self.registry, client))

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def observe_row(self, table: str, row: dict[str, Any]) -> None:
        """A row as the ledger flush moves it. Event rows name no client: theirs is their run's."""
        run_id = str(row.get("run_id") or "")
        if table == "runs":
            client = str(row.get("client_id") or "default")
            _remember(self._run_clients, run_id, client)
            if row.get("status") in TERMINAL and run_id not in self._counted:  # a replayed flush counts once
                _remember(self._counted, run_id, None)
                self._ended(client, row)
        elif table == "run_events" and row.get("kind") == "tool_call":
            found = self._client_of(run_id)
            if found is not None:
                self.tool_calls.labels(found, self._tool_label(found, str(row.get("name"))),
                                       str(row.get("decision"))).inc()

    def _tool_label(self, client: str, tool: str) -> str:
        """The tool as a label: past MAX_TOOL_LABELS names for a client (a model may name tools its agent
        does not have, and each name would be a series for ever), the rest count as 'other'."""
        seen = self._tools.setdefault(client, set())
        if tool in seen or len(seen) < MAX_TOOL_LABELS:
            seen.add(tool)
            return tool
        return "other"

    def _ended(self, client: str, row: dict[str, Any]) -> None:
        agent = str(row.get("agent"))
        self.runs.labels(client, agent, str(row["status"])).inc()
        self.tokens.labels(client, agent, "input").inc(_amount(row.get("input_tokens")))
        self.tokens.labels(client, agent, "output").inc(_amount(row.get("output_tokens")))
        self.denied.labels(client, agent).inc(_amount(row.get("denied")))
        self.tool_errors.labels(client, agent).inc(_amount(row.get("tool_errors")))
        self.cpu.labels(client, agent).inc(_amount(row.get("cpu_seconds")))
        self.written.labels(client, agent).inc(_amount(row.get("bytes_written")))
        if row.get("started_at") and row.get("ended_at"):
            try:
                took = parse(str(row["ended_at"])) - parse(str(row["started_at"]))
            except ValueError:
                return
            self.run_seconds.labels(client).observe(max(0.0, took.total_seconds()))

    def _client_of(self, run_id: str) -> str | None:
        """The client of a run: from its rows seen in this process, else from whichever store has it."""
        client = self._run_clients.get(run_id)
        if client is None and self.runtimes:
            rt = next(iter(self.runtimes.values()))  # they share one state database and one ledger
            client = client_of(rt.conn(), rt.settings.ledger_path, run_id)
            if client is not None:
                _remember(self._run_clients, run_id, client)
        return client

    def _start_from_ledger(self) -> None:
        """The counters start from what the ledger holds: a restart must not reset the totals."""
        if not self.runtimes:
            return
        try:
            held = totals(next(iter(self.runtimes.values())).settings.ledger_path)
        except Exception as exc:  # a busy or broken ledger must not keep the daemon from starting
            log.warning("metrics: the ledger's totals could not be read (%s); counters start from zero", exc)
            return
        for t in held.runs:
            client, agent = str(t["client_id"]), str(t["agent"])
            self.runs.labels(client, agent, str(t["status"])).inc(_amount(t["runs"]))
            self.tokens.labels(client, agent, "input").inc(_amount(t["input_tokens"]))
            self.tokens.labels(client, agent, "output").inc(_amount(t["output_tokens"]))
            self.denied.labels(client, agent).inc(_amount(t["denied"]))
            self.tool_errors.labels(client, agent).inc(_amount(t["tool_errors"]))
            self.cpu.labels(client, agent).inc(_amount(t["cpu_seconds"]))
            self.written.labels(client, agent).inc(_amount(t["bytes_written"]))
        for t in held.tool_calls:
            self.tool_calls.labels(str(t["client_id"]), str(t["tool"]), str(t["decision"])).inc(_amount(t["calls"]))


def _amount(value: Any) -> float:
    try:
        return max(0.0, float(value or 0))
    except (TypeError, ValueError):
        return 0.0


def _remember(seen: OrderedDict[str, Any], key: str, value: Any) -> None:
    seen[key] = value
    seen.move_to_end(key)
    while len(seen) > REMEMBERED:
        seen.popitem(last=False)


class _StateCollector(Collector):
    def __init__(self, metrics: Metrics) -> None:
        self.metrics = metrics

    def collect(self) -> Iterator[Metric]:
        running = GaugeMetricFamily("agent_orch_runs_in_flight", "Runs running now.", labels=["client"])
        queued = GaugeMetricFamily("agent_orch_runs_queued", "Runs waiting for a slot.", labels=["client"])
        agents = GaugeMetricFamily("agent_orch_agents", "Applied agents by state.", labels=["client", "state"])
        invalid = GaugeMetricFamily("agent_orch_invalid_specs", "Agents whose spec in git is invalid.",
                                    labels=["client"])
        revision = InfoMetricFamily("agent_orch_source", "The source revision last reconciled.", labels=["client"])
        workflows = GaugeMetricFamily("agent_orch_workflow_runs", "Workflow runs on record, by status.",
                                      labels=["client", "workflow", "status"])
        for client, rt in self.metrics.runtimes.items():
            flight = rt.in_flight()
            running.add_metric([client], flight.get("running", 0))
            queued.add_metric([client], flight.get("queued", 0))
            states: dict[str, int] = {}
            for a in load_applied(rt.conn(), client).values():
                states[a.state] = states.get(a.state, 0) + 1
            for state, n in sorted(states.items()):
                agents.add_metric([client, state], n)
            invalid.add_metric([client], states.get("Invalid", 0))
            health = rt.health()
            revision.add_metric([client], {"revision": str(health.get("revision") or "")})
            for name, status, n in rt.conn().execute("SELECT workflow, status, count(*) FROM wf_runs WHERE "
                                                     "client_id = ? GROUP BY 1, 2 ORDER BY 1, 2", (client,)):
                workflows.add_metric([client, name, status], n)
        yield from (running, queued, agents, invalid, revision, workflows)


# Labels whose values are a client's own names: its id, its agents, its custom tools (a builtin tool's
# name tells nothing, but a custom one is a file in the client's repository), its source revision.
NAMING = frozenset({"client", "agent", "tool", "revision", "workflow"})


class _View(Collector):
    """The registry as one client, or anyone, may see it.

    For a client: the samples labelled with that client, and those with no client label at all (the
    API's requests by route template and status). For anyone: every sample with the naming labels
    dropped and the samples that then coincide summed (counts, sums and histogram buckets add up across
    clients; so do the gauges here, which are all counts). ``_created`` samples do not add up and are
    left out, and so are info metrics, whose labels are all they say.
    """

    def __init__(self, registry: CollectorRegistry, client: str | None) -> None:
        self.registry, self.client = registry, client

    def collect(self) -> Iterator[Metric]:
        for family in self.registry.collect():
            if self.client is None and family.type == "info":
                continue
            shown = Metric(family.name, family.documentation, family.type, family.unit)
            if self.client is not None:
                for s in family.samples:
                    if s.labels.get("client", self.client) == self.client:
                        shown.add_sample(s.name, s.labels, s.value, s.timestamp, s.exemplar)
                yield shown
                continue
            totals: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
            for s in family.samples:
                if s.name.endswith("_created"):
                    continue
                key = (s.name, tuple((k, v) for k, v in s.labels.items() if k not in NAMING))
                totals[key] = totals.get(key, 0.0) + s.value
            for (name, labels), value in totals.items():
                shown.add_sample(name, dict(labels), value)
            yield shown
