"""Charts from the ledger: runs per hour by status, tokens per agent per day, the slowest agents.

Each chart is one aggregate query over the archive (``runner.ledger.reading.query``, the path
``agentctl history --sql`` takes), run by DuckDB: only the buckets come back, never the runs. The page shows
each query as the ``agentctl history --sql`` command that gives the same numbers. The archive holds runs
once the flusher moved them (within a second of their end), so a run still going is not counted yet.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import falcon

from runner.api.ui.rendering import Page, render
from runner.ledger.reading import query
from runner.supervise.runtime import Runtime
from runner.times import stamp

HOURS = 48  # runs per hour: the last two days
DAYS = 14  # tokens per agent per day
SLOW_DAYS = 7  # the slowest agents, by their 95th percentile run time
SLOWEST = 10
AGENT_DAYS = 30  # an agent's page: its tokens per day

RUNS_PER_HOUR = ("SELECT date_trunc('hour', coalesce(started_at, queued_at)) AS hour, status, count(*) AS runs "
                 "FROM runs WHERE client_id = {client} AND coalesce(started_at, queued_at) >= {since} "
                 "GROUP BY ALL ORDER BY hour, status")
TOKENS_PER_DAY = ("SELECT CAST(started_at AS DATE) AS day, agent, sum(input_tokens + output_tokens) AS tokens "
                  "FROM runs WHERE client_id = {client} AND started_at >= {since} GROUP BY ALL ORDER BY day, agent")
SLOWEST_AGENTS = ("SELECT agent, count(*) AS runs, round(avg(epoch(ended_at - started_at)), 2) AS avg_s, "
                  "round(quantile_cont(epoch(ended_at - started_at), 0.95), 2) AS p95_s, "
                  "round(max(epoch(ended_at - started_at)), 2) AS max_s FROM runs WHERE client_id = {client} "
                  "AND started_at >= {since} AND ended_at IS NOT NULL GROUP BY agent ORDER BY p95_s DESC, agent "
                  f"LIMIT {SLOWEST}")
AGENT_TOKENS = ("SELECT CAST(started_at AS DATE) AS day, sum(input_tokens) AS input_tokens, "
                "sum(output_tokens) AS output_tokens FROM runs WHERE client_id = {client} AND agent = {agent} "
                "AND started_at >= {since} GROUP BY ALL ORDER BY day")


class Activity(Page):
    def on_get(self, req: falcon.Request, resp: falcon.Response) -> None:
        _, rt = self.session(req)
        now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
        hour_start = now - timedelta(hours=HOURS - 1)
        _, per_hour = _run(rt, RUNS_PER_HOUR, since=hour_start)
        hours = [hour_start + timedelta(hours=i) for i in range(HOURS)]
        by_status: dict[str, dict[datetime, int]] = {}
        for hour, status, runs in per_hour:
            by_status.setdefault(status, {})[_utc(hour)] = int(runs)
        runs_chart = {"kind": "lines", "time": True, "x": [int(h.timestamp()) for h in hours], "unit": "runs",
                      "series": [{"label": s, "values": [v.get(h, 0) for h in hours]}
                                 for s, v in sorted(by_status.items())]}

        today = now.date()
        day_start = datetime.combine(today - timedelta(days=DAYS - 1), datetime.min.time(), UTC)
        _, per_day = _run(rt, TOKENS_PER_DAY, since=day_start)
        days = [today - timedelta(days=DAYS - 1 - i) for i in range(DAYS)]
        by_agent: dict[str, dict[Any, int]] = {}
        for day, agent, tokens in per_day:
            by_agent.setdefault(agent, {})[day] = int(tokens or 0)
        tokens_chart = {"kind": "lines", "time": True, "unit": "tokens",
                        "x": [int(datetime.combine(d, datetime.min.time(), UTC).timestamp()) for d in days],
                        "series": [{"label": a, "values": [v.get(d, 0) for d in days]}
                                   for a, v in sorted(by_agent.items())]}

        slow_since = datetime.now(UTC).replace(microsecond=0) - timedelta(days=SLOW_DAYS)
        slow_cols, slow_rows = _run(rt, SLOWEST_AGENTS, since=slow_since)
        slowest = [dict(zip(slow_cols, r, strict=True)) for r in slow_rows]
        worst = max((float(r["max_s"] or 0) for r in slowest), default=0.0)
        render(req, resp, "activity.html", runs_chart=runs_chart, tokens_chart=tokens_chart, slowest=slowest,
               worst=worst, hours=HOURS, days=DAYS, slow_days=SLOW_DAYS,
               per_hour=[{"hour": stamp(_utc(h)), "status": s, "runs": n} for h, s, n in per_hour],
               per_day=[{"day": str(d), "agent": a, "tokens": int(t or 0)} for d, a, t in per_day],
               commands={"runs": _command(rt, RUNS_PER_HOUR, since=hour_start),
                         "tokens": _command(rt, TOKENS_PER_DAY, since=day_start),
                         "slowest": _command(rt, SLOWEST_AGENTS, since=slow_since)})


def agent_tokens(rt: Runtime, agent: str) -> dict[str, Any]:
    """An agent's tokens per day over the last days, as a chart's data, and the command giving the same."""
    today = datetime.now(UTC).date()
    start = datetime.combine(today - timedelta(days=AGENT_DAYS - 1), datetime.min.time(), UTC)
    _, rows = _run(rt, AGENT_TOKENS, since=start, agent=agent)
    found = {day: (int(i or 0), int(o or 0)) for day, i, o in rows}
    days = [today - timedelta(days=AGENT_DAYS - 1 - i) for i in range(AGENT_DAYS)]
    return {"kind": "lines", "time": True, "unit": "tokens",
            "x": [int(datetime.combine(d, datetime.min.time(), UTC).timestamp()) for d in days],
            "series": [{"label": "input tokens", "values": [found.get(d, (0, 0))[0] for d in days]},
                       {"label": "output tokens", "values": [found.get(d, (0, 0))[1] for d in days]}],
            "rows": [{"day": str(d), "input_tokens": i, "output_tokens": o} for d, (i, o) in sorted(found.items())],
            "command": _command(rt, AGENT_TOKENS, since=start, agent=agent)}


def _run(rt: Runtime, sql: str, *, since: datetime, agent: str | None = None) -> tuple[list[str], list[Any]]:
    # The ledger's TIMESTAMPs are UTC without a zone: the bound goes the same way.
    params: dict[str, str] = {"client": "?", "since": "?"}
    args: list[Any] = [rt.settings.client_id, since.astimezone(UTC).replace(tzinfo=None)]
    if agent is not None:
        params = {"client": "?", "agent": "?", "since": "?"}
        args = [rt.settings.client_id, agent, since.astimezone(UTC).replace(tzinfo=None)]
    return query(rt.settings.ledger_path, sql.format(**params), args)


def _command(rt: Runtime, sql: str, *, since: datetime, agent: str | None = None) -> str:
    """The query as ``agentctl history --sql`` takes it: the same text, its values written in."""
    def quoted(text: str) -> str:
        return "'" + text.replace("'", "''") + "'"

    since_text = f"TIMESTAMP {quoted(since.astimezone(UTC).strftime('%Y-%m-%d %H:%M:%S'))}"
    text = sql.format(client=quoted(rt.settings.client_id), since=since_text,
                      agent=quoted(agent) if agent is not None else "NULL")
    return "agentctl history --sql \"" + text.replace("\\", "\\\\").replace('"', '\\"') + "\""


def _utc(value: Any) -> datetime:
    return value.replace(tzinfo=UTC) if isinstance(value, datetime) and value.tzinfo is None else value
