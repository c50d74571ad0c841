"""Quota status of a subject, from the ledger's rollups: used by spawn checks and the API."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg

from contracts.durations import DEFAULT_MAX_CLOCK_SKEW
from contracts.spawn import QuotaStatus

from . import grantstore, store
from .config import PolicyConfig
from .domain import EffectiveQuota, effective_quotas, status, window_start
from .forecast import lookback_start, projected_exhaustion
from .grants import GrantBook
from .prices import COST
from .windows import floor_hour, reads_until


@dataclass(frozen=True)
class SubjectQuotas:
    """Every quota of one subject, and the ledger position the numbers are as of."""

    subject: str
    groups: list[str]
    quotas: list[EffectiveQuota]
    statuses: list[QuotaStatus]
    as_of_seq: int
    as_of: datetime | None


def _pool_members(config: PolicyConfig, quota: EffectiveQuota, groups: Sequence[str]) -> list[str]:
    names = {g for r in quota.rules for g in r.applies_to.groups if g in groups}
    return sorted({m for g in names for m in config.groups.get(g, [])})


def _subjects(
    config: PolicyConfig, quota: EffectiveQuota, subject: str, groups: Sequence[str]
) -> list[str]:
    if quota.per == "group":
        return sorted(set(_pool_members(config, quota, groups)) | {subject})
    return [subject]


async def _buckets(
    conn: asyncpg.Connection,
    quota: EffectiveQuota,
    subjects: Sequence[str],
    workload: str | None,
    spec: store.TotalSpec,
) -> list[tuple[datetime, Decimal]]:
    """Hourly usage in the window (of one workload, for per-workload quotas): what
    `retry_at` of a rolling window and the forecast need."""
    if workload is None:
        return await store.hourly_totals(conn, subjects, quota.metric, spec.since, spec.until)
    rows = await store.hourly_usage(conn, subjects, quota.metric, spec.since, spec.until)
    buckets: dict[datetime, Decimal] = defaultdict(Decimal)
    for w, hour, total in rows:
        if workload is None or w == workload:
            buckets[hour] += total
    return sorted(buckets.items())


async def _cost_hours(
    conn: asyncpg.Connection,
    config: PolicyConfig,
    subjects: Sequence[str],
    since: datetime | None,
    until: datetime,
) -> list[tuple[datetime, Decimal]]:
    """A cost quota's hour buckets: every priced metric's usage, priced by the hour."""
    book = config.pricebook
    if not book.metrics:
        return []
    rows = await store.priced_hours(conn, subjects, sorted(book.metrics), since, until)
    hours: dict[datetime, Decimal] = defaultdict(Decimal)
    for _, metric, gpu_model, hour, total in rows:
        hours[hour] += book.cost(metric, gpu_model, hour, total)
    return sorted(hours.items())


def _forecast(
    q: EffectiveQuota, used: Decimal, hours: Sequence[tuple[datetime, Decimal]], now: datetime
) -> datetime | None:
    start = lookback_start(q.window, now)
    if start is None or q.per == "workload":
        return None
    last = floor_hour(now)
    lookback = [(t, a) for t, a in hours if start <= t <= last and a]
    recent = sum((a for _, a in lookback), Decimal(0))
    since = min((t for t, _ in lookback), default=None)
    return projected_exhaustion(q.window, q.limit, used, recent, now, lambda: hours, since)


async def subject_quotas(
    pool: asyncpg.Pool,
    config: PolicyConfig,
    subject: str,
    groups: Sequence[str] = (),
    now: datetime | None = None,
    max_skew: timedelta = DEFAULT_MAX_CLOCK_SKEW,
) -> SubjectQuotas:
    """Evaluate every quota that applies to `subject`: config groups plus `groups`, or when
    none are given, the groups integrators last reported for the subject (as the policy does).

    Windows end where the policy's do (`reads_until`), so both give the same numbers. Each
    status carries the forecast (forecast.py) from the same hour buckets as the policy's.
    """
    now = now or datetime.now(UTC)
    until = reads_until(now, max_skew)
    statuses = []
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
        reported = tuple(groups) or await store.reported_groups(conn, subject)
        resolved = config.groups_of(subject, reported)
        book = GrantBook()
        book.apply(await grantstore.for_targets(conn, subject, resolved))
        quotas = effective_quotas(config, subject, resolved, book, now)
        as_of_seq, as_of = await store.ledger_head(conn)
        specs = [
            store.TotalSpec(
                _subjects(config, q, subject, resolved),
                q.metric,
                window_start(q.window, now),
                until,
                per_workload=q.per == "workload",
            )
            for q in quotas
        ]
        totals_of = await store.usage_totals(conn, [s for s in specs if s.metric != COST])
        found = iter(totals_of)
        for q, spec in zip(quotas, specs, strict=True):
            hours: list[tuple[datetime, Decimal]] = []
            if q.metric == COST:
                hours = await _cost_hours(conn, config, spec.subjects, spec.since, spec.until)
                workload, used = None, sum((a for _, a in hours), Decimal(0))
            else:
                # Per workload: the most-used workload is the one closest to its limit.
                totals = next(found)
                workload, used = max(totals.items(), key=lambda t: t[1], default=(None, Decimal(0)))
                wants_forecast = q.per != "workload" and used < q.limit and used > 0
                if (used >= q.limit and q.window.rolling is not None) or wants_forecast:
                    hours = await _buckets(conn, q, spec.subjects, workload if spec.per_workload
                                           else None, spec)  # fmt: skip
            statuses.append(status(q, used, hours, now, projected=_forecast(q, used, hours, now)))
    return SubjectQuotas(subject, resolved, quotas, statuses, as_of_seq, as_of)
