"""The API's SQL. Usage reads come from the hourly rollups, never from the event table."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import date, datetime
from decimal import Decimal

import asyncpg

from services.policy.store import ledger_head

from .models import GroupBy, ReportGroupBy

# The grouping column for each group_by. Only these fixed strings reach the SQL text.
_GROUP_SQL = {
    GroupBy.METRIC: "NULL::text",
    GroupBy.WORKLOAD: "workload",
    GroupBy.HOST: "host",
    GroupBy.HOUR: "hour",
    # Days start at midnight in the requested zone; the rollup's hours are UTC.
    GroupBy.DAY: "(date_trunc('day', hour, $5::text) AT TIME ZONE $5::text)::date",
}


@dataclass(frozen=True)
class UsageTotal:
    metric: str
    group: str | datetime | date | None
    total: Decimal
    events: int


@dataclass(frozen=True)
class UsageSnapshot:
    rows: list[UsageTotal]
    as_of_seq: int
    as_of: datetime | None


async def usage_totals(
    pool: asyncpg.Pool,
    subject: str,
    start: datetime,
    end: datetime,
    metric: str | None,
    group_by: GroupBy,
    tz: str,
) -> UsageSnapshot:
    """Totals per metric and group over hour buckets in [start, end), with the ledger head.

    One repeatable-read snapshot, so the totals are exactly those up to `as_of_seq`.
    """
    group = _GROUP_SQL[group_by]
    sql = f"""
        SELECT metric, {group} AS grp, sum(total) AS total, sum(events)::bigint AS events
        FROM usage_hourly
        WHERE subject = $1 AND hour >= $2 AND hour < $3
          AND ($4::text IS NULL OR metric = $4)
        GROUP BY metric, grp
        ORDER BY metric, grp
    """
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        seq, committed_at = await ledger_head(conn)
        # Only the day grouping uses $5; Postgres refuses parameters it cannot type.
        extra = (tz,) if group_by is GroupBy.DAY else ()
        rows = await conn.fetch(sql, subject, start, end, metric, *extra)
    totals = [UsageTotal(r["metric"], r["grp"], r["total"], int(r["events"])) for r in rows]
    return UsageSnapshot(totals, seq, committed_at)


_REPORT_GROUP_SQL = {
    ReportGroupBy.SUBJECT: "NULL::text",
    ReportGroupBy.WORKLOAD: "workload",
    ReportGroupBy.HOST: "host",
    ReportGroupBy.DAY: "(date_trunc('day', hour, 'UTC') AT TIME ZONE 'UTC')::date",
}


@dataclass(frozen=True)
class ReportTotal:
    subject: str
    metric: str
    group: str | date | None
    total: Decimal
    events: int


@dataclass(frozen=True)
class PricedHour:
    """One report row's usage in one hour for one gpu_model: what its cost is made of."""

    subject: str
    metric: str
    group: str | date | None
    hour: datetime
    gpu_model: str
    total: Decimal


@dataclass(frozen=True)
class UsageReport:
    rows: list[ReportTotal]
    truncated: bool  # more than the rows asked for exist
    as_of_seq: int
    as_of: datetime | None
    priced: list[PricedHour] = field(default_factory=list)


async def usage_report(
    pool: asyncpg.Pool,
    start: datetime,
    end: datetime,
    metric: str | None,
    group_by: ReportGroupBy,
    max_rows: int,
    priced: Sequence[str] = (),
) -> UsageReport:
    """Totals per subject, metric (and group) over hour buckets in [start, end); with
    `priced` metrics, their hour-by-hour usage too (costs are priced per hour bucket)."""
    group = _REPORT_GROUP_SQL[group_by]
    sql = f"""
        SELECT subject, metric, {group} AS grp, sum(total) AS total,
               sum(events)::bigint AS events
        FROM usage_hourly
        WHERE hour >= $1 AND hour < $2 AND ($3::text IS NULL OR metric = $3)
        GROUP BY subject, metric, grp
        ORDER BY subject, metric, grp
        LIMIT $4
    """
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        seq, committed_at = await ledger_head(conn)
        rows = await conn.fetch(sql, start, end, metric, max_rows + 1)
        hours = []
        if priced and len(rows) <= max_rows:
            hours = await conn.fetch(
                f"""SELECT subject, metric, {group} AS grp, hour, gpu_model, sum(total) AS total
                    FROM usage_hourly
                    WHERE hour >= $1 AND hour < $2 AND ($3::text IS NULL OR metric = $3)
                      AND metric = ANY($4::text[])
                    GROUP BY subject, metric, grp, hour, gpu_model""",
                start, end, metric, list(priced),
            )  # fmt: skip
    found = [
        PricedHour(r["subject"], r["metric"], r["grp"], r["hour"], r["gpu_model"], r["total"])
        for r in hours
    ]
    totals = [
        ReportTotal(r["subject"], r["metric"], r["grp"], r["total"], int(r["events"]))
        for r in rows[:max_rows]
    ]
    return UsageReport(totals, len(rows) > max_rows, seq, committed_at, found)
