"""Quota status of a subject, from the ledger's rollups: used by spawn checks and the API."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg

from contracts.spawn import QuotaStatus
from services.ledger.domain import DEFAULT_MAX_CLOCK_SKEW

from . import grantstore, store
from .config import PolicyConfig
from .domain import EffectiveQuota, effective_quotas, status, window_start
from .grants import GrantBook
from .windows import reads_until


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
    `retry_at` of a rolling window needs, and only when the quota is exceeded."""
    rows = await store.hourly_usage(conn, subjects, quota.metric, spec.since, spec.until)
    buckets: dict[datetime, Decimal] = defaultdict(Decimal)
    for w, hour, total in rows:
        if workload is None or w == workload:
            buckets[hour] += total
    return sorted(buckets.items())


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

    Windows end where the policy's do (`reads_until`), so both give the same numbers.
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
        for q, spec, totals in zip(
            quotas, specs, await store.usage_totals(conn, specs), strict=True
        ):
            # Per workload: the most-used workload is the one closest to its limit.
            workload, used = max(totals.items(), key=lambda t: t[1], default=(None, Decimal(0)))
            buckets: list[tuple[datetime, Decimal]] = []
            if used >= q.limit and q.window.rolling is not None:  # retry_at needs the hours
                buckets = await _buckets(conn, q, spec.subjects, workload if spec.per_workload
                                         else None, spec)  # fmt: skip
            statuses.append(status(q, used, buckets, now))
    return SubjectQuotas(subject, resolved, quotas, statuses, as_of_seq, as_of)
