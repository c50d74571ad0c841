"""Metrics read from Postgres and JetStream when /metrics is scraped.

The services' own counters live in the process that runs them; these are the numbers any
API instance can see, so a standalone API still reports ledger lag, backlog, dead letters
and the policy's recorded decisions.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from datetime import datetime

import asyncpg
import nats.errors
from nats.aio.client import Client
from nats.js.errors import NotFoundError
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from contracts.dlq import dlq_stream
from contracts.samples import samples_stream

from .errors import UNAVAILABLE

SCRAPE_TIMEOUT = 2.0


class _Families(Collector):
    def __init__(self, families: list[Metric]) -> None:
        self.families = families

    def collect(self) -> Iterator[Metric]:
        yield from self.families


async def _ledger(conn: asyncpg.Connection, now: datetime) -> list[Metric]:
    head = await conn.fetchrow(
        """SELECT h.last_seq, b.committed_at FROM ledger_head h
           LEFT JOIN ledger_batches b ON b.batch_id = h.last_batch WHERE h.id = 1"""
    )
    seq = int(head["last_seq"]) if head else 0
    # The ledger's sequence is gap-free, so it counts committed events: the ingest rate
    # is rate(tollgate_ledger_committed_events_total[1m]) from any API instance.
    out: list[Metric] = [
        CounterMetricFamily(
            "tollgate_ledger_committed_events",
            "Usage events committed to the ledger (its last sequence number)",
            value=seq,
        )
    ]
    lag = GaugeMetricFamily(
        "tollgate_ledger_lag_seconds", "Seconds since the ledger last committed usage"
    )
    if head is not None and head["committed_at"] is not None:
        lag.add_metric([], max(0.0, (now - head["committed_at"]).total_seconds()))
    out.append(lag)
    positions = GaugeMetricFamily(
        "tollgate_ledger_consumer_position",
        "Samples-stream sequence each ledger consumer has committed",
        labels=["consumer"],
    )
    for r in await conn.fetch("SELECT consumer, stream_seq FROM consumer_positions"):
        positions.add_metric([r["consumer"]], r["stream_seq"])
    out.append(positions)
    feed = GaugeMetricFamily(
        "tollgate_usage_feed_lag_events",
        "Ledger events committed but not yet published on the usage feed",
        labels=["feed"],
    )
    for r in await conn.fetch("SELECT feed, seq FROM feed_positions"):
        feed.add_metric([r["feed"]], max(0, seq - int(r["seq"])))
    out.append(feed)
    return out


async def _decisions(conn: asyncpg.Connection) -> list[Metric]:
    spawn = CounterMetricFamily(
        "tollgate_spawn_decisions_recorded",
        "Spawn decisions stored by the policy (and by the API when no policy answered)",
        labels=["outcome"],
    )
    kinds = CounterMetricFamily(
        "tollgate_policy_decisions_recorded", "Decisions stored, by kind", labels=["kind"]
    )
    terminations = CounterMetricFamily(
        "tollgate_terminations_recorded", "Terminations decided, by reason", labels=["reason"]
    )
    rows = await conn.fetch(
        """SELECT kind, allowed, fail_open, reason, count(*) AS n FROM policy_decisions
           GROUP BY kind, allowed, fail_open, reason"""
    )
    by_outcome = {"allowed": 0, "denied": 0, "fail_open": 0}
    by_kind: dict[str, int] = {}
    by_reason: dict[str, int] = {}
    for r in rows:
        n = int(r["n"])
        by_kind[r["kind"]] = by_kind.get(r["kind"], 0) + n
        if r["kind"] == "spawn":
            outcome = "fail_open" if r["fail_open"] else "allowed" if r["allowed"] else "denied"
            by_outcome[outcome] += n
        elif r["kind"] == "terminate":
            by_reason[r["reason"]] = by_reason.get(r["reason"], 0) + n
    for outcome, n in by_outcome.items():
        spawn.add_metric([outcome], n)
    for kind, n in sorted(by_kind.items()):
        kinds.add_metric([kind], n)
    for reason, n in sorted(by_reason.items()):
        terminations.add_metric([reason], n)
    return [spawn, kinds, terminations]


async def _jetstream(nc: Client, prefix: str, consumers: list[str]) -> list[Metric]:
    js = nc.jetstream(timeout=SCRAPE_TIMEOUT)
    backlog = GaugeMetricFamily(
        "tollgate_ledger_backlog_messages",
        "Sample messages waiting for each ledger consumer in JetStream",
        labels=["consumer"],
    )
    for name in consumers:
        try:
            info = await js.consumer_info(samples_stream(prefix), name)
        except NotFoundError:  # a position left by a consumer of another deployment or test
            continue
        backlog.add_metric([name], (info.num_pending or 0) + (info.num_ack_pending or 0))
    dead = GaugeMetricFamily(
        "tollgate_dead_letters_stored",
        "Messages held in the dead-letter stream, by reason",
        labels=["reason"],
    )
    try:
        stream = await js.stream_info(dlq_stream(prefix), subjects_filter=">")
    except NotFoundError:  # no ledger has created the streams yet
        return [backlog, dead]
    for subject, n in sorted((stream.state.subjects or {}).items()):
        dead.add_metric([subject.rsplit(".", 1)[-1]], n)
    return [backlog, dead]


async def scrape(pool: asyncpg.Pool, nc: Client | None, prefix: str, now: datetime) -> bytes:
    """Prometheus text of the gauges above; a source that fails is named in scrape errors."""
    families: list[Metric] = []
    errors = GaugeMetricFamily(
        "tollgate_api_scrape_error",
        "1 when a source of these metrics could not be read at this scrape",
        labels=["source"],
    )
    consumers: list[str] = []
    try:
        async with asyncio.timeout(SCRAPE_TIMEOUT), pool.acquire() as conn:
            families += await _ledger(conn, now)
            families += await _decisions(conn)
            consumers = [
                r["consumer"] for r in await conn.fetch("SELECT consumer FROM consumer_positions")
            ]
        errors.add_metric(["postgres"], 0)
    except (*UNAVAILABLE, asyncpg.PostgresError):
        errors.add_metric(["postgres"], 1)
    if nc is not None and nc.is_connected:
        try:
            async with asyncio.timeout(SCRAPE_TIMEOUT):
                families += await _jetstream(nc, prefix, consumers)
            errors.add_metric(["nats"], 0)
        except (nats.errors.Error, OSError, TimeoutError):
            errors.add_metric(["nats"], 1)
    else:
        errors.add_metric(["nats"], 1)
    families.append(errors)
    registry = CollectorRegistry(auto_describe=False)
    registry.register(_Families(families))
    return generate_latest(registry)
