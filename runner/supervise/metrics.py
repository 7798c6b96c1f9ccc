"""Prometheus metrics. Values that are state (runs in flight, revisions, invalid specs) are read at
scrape time by a collector, so no stale series outlive what they describe; events (runs ended, tool
calls, requests) are counters fed as they happen. Labels take bounded values only: client, agent
(bounded by the applied specs), status, tool, decision, route template.

One registry holds every client's series; nobody is shown all of it. ``exposition(client)`` gives a
client its own series (and the API's, which name no client); ``exposition(None)``, for the open
endpoint, gives totals over every client, with the labels that name a client's things summed away.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, InfoMetricFamily, Metric
from prometheus_client.registry import Collector

from runner.reconcile.applied import load_applied


class Metrics:
    def __init__(self, runtimes: dict[str, Any]) -> None:
        self.runtimes = runtimes
        self._run_clients: dict[str, str] = {}
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
        r.register(_StateCollector(self))

    def exposition(self, client: str | None) -> bytes:
        """Prometheus text: ``client``'s own series, or with ``None`` the totals that name nobody."""
        return generate_latest(_View(self.registry, client))

    def request(self, method: str, route: str, status: int, seconds: float) -> None:
        self.requests.labels(method, route, str(status)).inc()
        self.request_seconds.labels(route).observe(seconds)

    def observe_row(self, table: str, row: dict[str, Any]) -> None:
        """A row as a ledger flush moves it. Event rows name no client: theirs is their run's."""
        client = row.get("client_id") or self._client_of(str(row.get("run_id") or ""))
        self.observe_ledger(str(client), table, row)

    def _client_of(self, run_id: str) -> str:
        client = self._run_clients.get(run_id)
        if client is None:
            client = "default"
            for rt in self.runtimes.values():  # they share one state database: any connection will do
                found = rt.conn().execute("SELECT client_id FROM run_progress WHERE run_id = ?", (run_id,)).fetchone()
                client = str(found[0]) if found else client
                break
            if len(self._run_clients) > 10_000:
                self._run_clients.clear()
            self._run_clients[run_id] = client
        return client

    def observe_ledger(self, client: str, table: str, row: dict[str, Any]) -> None:
        """Fed by the daemon's ledger flush: the duration of runs that ended (counts come from the state
        database at scrape time, so they are right whichever process moved the rows)."""
        if table == "runs" and row.get("status") not in ("queued", "running") and row.get("ended_at") \
                and row.get("started_at"):
            from datetime import datetime

            took = datetime.fromisoformat(row["ended_at"]) - datetime.fromisoformat(row["started_at"])
            self.run_seconds.labels(client).observe(max(0.0, took.total_seconds()))


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
        runs = CounterMetricFamily("agent_orch_runs", "Runs ended, by final status.",
                                   labels=["client", "agent", "status"])
        tokens = CounterMetricFamily("agent_orch_tokens", "Model tokens used.", labels=["client", "agent", "kind"])
        tools = CounterMetricFamily("agent_orch_tool_calls", "Tool calls by tool and decision.",
                                    labels=["client", "tool", "decision"])
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
            conn = rt.conn()
            used: dict[str, list[int]] = {}
            for agent, status, n, inp, out in conn.execute(
                    "SELECT agent, status, count(*), sum(input_tokens), sum(output_tokens) FROM run_progress "
                    "WHERE client_id = ? AND status NOT IN ('queued', 'running') GROUP BY agent, status",
                    (client,)):
                runs.add_metric([client, agent, status], n)
                total = used.setdefault(agent, [0, 0])
                total[0] += inp or 0
                total[1] += out or 0
            for agent, (inp, out) in sorted(used.items()):
                tokens.add_metric([client, agent, "input"], inp)
                tokens.add_metric([client, agent, "output"], out)
            for tool, decision, n in conn.execute(
                    "SELECT tool, decision, count FROM tool_stats WHERE client_id = ?", (client,)):
                tools.add_metric([client, tool, decision], n)
        yield from (running, queued, agents, invalid, revision, runs, tokens, tools)


# Labels whose values are a client's own names: its id, its agents, its custom tools (a builtin tool's
# name tells nothing, but a custom one is a file in the client's repository), its source revision.
NAMING = frozenset({"client", "agent", "tool", "revision"})


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
