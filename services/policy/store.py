"""The policy's reads of the ledger: rollups, the ledger head, events by sequence."""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

import asyncpg

from .prices import Pricebook
from .usage import UsageEvent, UsageState

# Events that may fall into a workload_hour window are read back this far for minute detail.
MINUTE_DETAIL = timedelta(hours=2)
# Allowance for hosts whose clocks run ahead of the ledger's.
CLOCK_SLACK = timedelta(minutes=10)


async def hourly_usage(
    conn: asyncpg.Connection,
    subjects: Sequence[str],
    metric: str,
    since: datetime | None,
    until: datetime,
) -> list[tuple[str, datetime, Decimal]]:
    """(workload, hour, total) for the subjects and metric in [since, until) (since None:
    from the beginning). Here and below an open end is `coalesce(since, '-infinity')`, not
    `since IS NULL OR ...`, so that the window is a range on the rollup's key."""
    rows = await conn.fetch(
        """SELECT workload, hour, sum(total) AS total FROM usage_hourly
           WHERE subject = ANY($1::text[]) AND metric = $2
             AND hour >= coalesce($3::timestamptz, '-infinity') AND hour < $4
           GROUP BY workload, hour""",
        list(subjects),
        metric,
        since,
        until,
    )
    return [(r["workload"], r["hour"], r["total"]) for r in rows]


async def hourly_totals(
    conn: asyncpg.Connection,
    subjects: Sequence[str],
    metric: str,
    since: datetime | None,
    until: datetime,
) -> list[tuple[datetime, Decimal]]:
    """(hour, total) of `metric` over the subjects in [since, until), in hour order."""
    rows = await conn.fetch(
        """SELECT hour, sum(total) AS total FROM usage_hourly
           WHERE subject = ANY($1::text[]) AND metric = $2
             AND hour >= coalesce($3::timestamptz, '-infinity') AND hour < $4
           GROUP BY hour ORDER BY hour""",
        list(subjects),
        metric,
        since,
        until,
    )
    return [(r["hour"], r["total"]) for r in rows]


async def priced_hours(
    conn: asyncpg.Connection,
    subjects: Sequence[str] | None,
    metrics: Sequence[str],
    since: datetime | None,
    until: datetime | None = None,
) -> list[tuple[str, str, str, datetime, Decimal]]:
    """(subject, metric, gpu_model, hour, total) of priced metrics: what costs are made of."""
    rows = await conn.fetch(
        """SELECT subject, metric, gpu_model, hour, sum(total) AS total FROM usage_hourly
           WHERE ($1::text[] IS NULL OR subject = ANY($1::text[])) AND metric = ANY($2::text[])
             AND hour >= coalesce($3::timestamptz, '-infinity')
             AND hour < coalesce($4::timestamptz, 'infinity')
           GROUP BY subject, metric, gpu_model, hour""",
        None if subjects is None else list(subjects),
        list(metrics),
        since,
        until,
    )
    return [(r["subject"], r["metric"], r["gpu_model"], r["hour"], r["total"]) for r in rows]


@dataclass(frozen=True)
class TotalSpec:
    """One quota's question to the rollups: the total of `metric` over `subjects` in
    [since, until) (since None: from the beginning), per workload when `per_workload`."""

    subjects: Sequence[str]
    metric: str
    since: datetime | None
    until: datetime
    per_workload: bool = False


async def usage_totals(
    conn: asyncpg.Connection, specs: Sequence[TotalSpec]
) -> list[dict[str, Decimal]]:
    """Every spec's total in one round trip, summed by Postgres: {workload or "": total}.

    A subject's page shows five quotas over 30 days of hourly rollups; summing them here
    returns a handful of rows instead of thousands of hourly rows to add up in Python.
    """
    if not specs:
        return []
    pairs = [(i, s) for i, spec in enumerate(specs) for s in spec.subjects]
    rows = await conn.fetch(
        """SELECT q.i, CASE WHEN q.per_workload THEN h.workload ELSE '' END AS workload,
                  sum(h.total) AS total
           FROM unnest($1::int[], $2::text[], $3::timestamptz[], $4::boolean[],
                       $7::timestamptz[])
                AS q(i, metric, since, per_workload, until)
           JOIN unnest($5::int[], $6::text[]) AS qs(i, subject) ON qs.i = q.i
           JOIN usage_hourly h ON h.subject = qs.subject AND h.metric = q.metric
                AND h.hour >= coalesce(q.since, '-infinity') AND h.hour < q.until
           GROUP BY 1, 2""",
        list(range(len(specs))),
        [spec.metric for spec in specs],
        [spec.since for spec in specs],
        [spec.per_workload for spec in specs],
        [i for i, _ in pairs],
        [s for _, s in pairs],
        [spec.until for spec in specs],
    )
    totals: list[dict[str, Decimal]] = [{} for _ in specs]
    for r in rows:
        totals[r["i"]][r["workload"]] = r["total"]
    return totals


async def ledger_head(conn: asyncpg.Connection) -> tuple[int, datetime | None]:
    """The last ledger sequence and when its batch committed: usage is as of that."""
    row = await conn.fetchrow(
        """SELECT h.last_seq, b.committed_at FROM ledger_head h
           LEFT JOIN ledger_batches b ON b.batch_id = h.last_batch WHERE h.id = 1"""
    )
    if row is None:
        return 0, None
    return int(row["last_seq"]), row["committed_at"]


async def reported_groups(conn: asyncpg.Connection, subject: str) -> tuple[str, ...]:
    """The groups a spawn request or workload_started last named for `subject`."""
    found = await conn.fetchval(
        "SELECT groups FROM policy_subject_groups WHERE subject = $1", subject
    )
    return tuple(found or ())


async def head_seq(conn: asyncpg.Connection | asyncpg.Pool) -> int:
    value = await conn.fetchval("SELECT last_seq FROM ledger_head WHERE id = 1")
    return int(value or 0)


def _event(r: asyncpg.Record) -> UsageEvent:
    return UsageEvent(
        r["seq"], r["subject"], r["workload"], r["host"], r["metric"], r["delta"], r["window_end"],
        r["gpu_model"] or "",
    )  # fmt: skip


async def events_after(conn: asyncpg.Connection, after: int, limit: int) -> Iterator[UsageEvent]:
    """Committed usage events with seq > `after`, in order: the ledger is the outbox too.

    Made as they are folded (thousands of rows become events in the fold's slices, not in
    one stretch before it)."""
    rows = await conn.fetch(
        """SELECT seq, subject, workload, host, metric, delta, window_end,
                  labels->>'gpu_model' AS gpu_model FROM usage_events
           WHERE seq > $1 ORDER BY seq LIMIT $2""",
        after,
        limit,
    )
    return map(_event, rows)


@dataclass(frozen=True)
class SnapshotSpec:
    """What to load: how far back hour buckets stay apart, which workloads need detail."""

    now: datetime
    horizon_start: datetime
    minute_metrics: frozenset[str]
    running: Sequence[str]
    pricebook: Pricebook | None = None
    # The ledger places usage at most its clock-skew tolerance after the sample arrived,
    # which is before its batch committed: events of the window committed no earlier.
    max_skew: timedelta = timedelta(0)


async def load_snapshot(conn: asyncpg.Connection, spec: SnapshotSpec) -> UsageState:
    """The ledger's rollups as of one ledger sequence, read in one consistent snapshot."""
    state = UsageState(minute_metrics=spec.minute_metrics, pricebook=spec.pricebook)
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        state.last_seq = await head_seq(conn)
        rows = await conn.fetch(
            """SELECT subject, '' AS workload, '' AS host, metric, hour, sum(total) AS total
               FROM usage_hourly WHERE hour >= $1 GROUP BY subject, metric, hour""",
            spec.horizon_start,
        )
        state.load_hours(_hour_rows(rows), per_workload=False)
        bases = await conn.fetch(
            """SELECT subject, metric, sum(total) AS total FROM usage_hourly
               WHERE hour < $1 GROUP BY subject, metric""",
            spec.horizon_start,
        )
        state.load_bases((r["subject"], r["metric"], r["total"]) for r in bases)
        if spec.pricebook is not None and spec.pricebook.metrics:
            state.load_costs(
                await priced_hours(conn, None, sorted(spec.pricebook.metrics), None),
                spec.horizon_start,
            )
        # Per-workload detail for workloads that run or ran lately (their whole life).
        rows = await conn.fetch(
            """SELECT subject, workload, host, metric, hour, sum(total) AS total
               FROM usage_hourly
               WHERE workload = ANY($1::text[]) OR workload IN (
                   SELECT DISTINCT workload FROM usage_hourly WHERE hour >= $2)
               GROUP BY subject, workload, host, metric, hour""",
            list(spec.running),
            spec.now - timedelta(days=1),
        )
        state.load_hours(_hour_rows(rows), per_workload=True, now=spec.now)
        if spec.minute_metrics:
            state.load_minutes(await _minutes(conn, spec, state.last_seq))
    return state


def _hour_rows(
    rows: Sequence[asyncpg.Record],
) -> list[tuple[str, str, str, str, datetime, Decimal]]:
    return [
        (r["subject"], r["workload"], r["host"], r["metric"], r["hour"], r["total"]) for r in rows
    ]


async def _minutes(
    conn: asyncpg.Connection, spec: SnapshotSpec, upto: int
) -> list[tuple[str, str, datetime, Decimal]]:
    since = spec.now - MINUTE_DETAIL
    # The first event committed in the window, found by walking batches back from the head.
    low = await conn.fetchval(
        """SELECT last_seq FROM ledger_batches WHERE committed_at < $1
           ORDER BY batch_id DESC LIMIT 1""",
        since - CLOCK_SLACK - spec.max_skew,
    )
    rows = await conn.fetch(
        """SELECT workload, metric, date_trunc('minute', window_end) AS minute,
                  sum(delta) AS total
           FROM usage_events
           WHERE seq > $1 AND seq <= $2 AND metric = ANY($3::text[]) AND window_end >= $4
           GROUP BY workload, metric, minute""",
        int(low or 0),
        upto,
        sorted(spec.minute_metrics),
        since,
    )
    return [(r["workload"], r["metric"], r["minute"], r["total"]) for r in rows]
