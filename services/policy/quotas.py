"""Quota status of a subject, from the ledger's rollups: used by spawn checks and the API."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg

from contracts.spawn import QuotaStatus

from . import store
from .config import PolicyConfig
from .domain import EffectiveQuota, effective_quotas, status, window_start


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


async def _used(
    conn: asyncpg.Connection,
    config: PolicyConfig,
    quota: EffectiveQuota,
    subject: str,
    groups: Sequence[str],
    now: datetime,
) -> tuple[Decimal, list[tuple[datetime, Decimal]]]:
    subjects = [subject]
    if quota.per == "group":
        subjects = sorted(set(_pool_members(config, quota, groups)) | {subject})
    rows = await store.hourly_usage(conn, subjects, quota.metric, window_start(quota.window, now))
    if quota.per == "workload":
        # The most-used workload is the one closest to its limit.
        per_workload: dict[str, dict[datetime, Decimal]] = defaultdict(dict)
        for workload, hour, total in rows:
            per_workload[workload][hour] = per_workload[workload].get(hour, Decimal(0)) + total
        if not per_workload:
            return Decimal(0), []
        worst = max(per_workload.values(), key=lambda b: sum(b.values(), Decimal(0)))
        return sum(worst.values(), Decimal(0)), sorted(worst.items())
    buckets: dict[datetime, Decimal] = defaultdict(Decimal)
    for _, hour, total in rows:
        buckets[hour] += total
    return sum(buckets.values(), Decimal(0)), sorted(buckets.items())


async def subject_quotas(
    pool: asyncpg.Pool,
    config: PolicyConfig,
    subject: str,
    groups: Sequence[str] = (),
    now: datetime | None = None,
) -> SubjectQuotas:
    """Evaluate every quota that applies to `subject`: config groups plus `groups`, or when
    none are given, the groups integrators last reported for the subject (as the policy does).
    """
    now = now or datetime.now(UTC)
    statuses = []
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read"):
        reported = tuple(groups) or await store.reported_groups(conn, subject)
        resolved = config.groups_of(subject, reported)
        quotas = effective_quotas(config, subject, resolved)
        as_of_seq, as_of = await store.ledger_head(conn)
        for q in quotas:
            used, buckets = await _used(conn, config, q, subject, resolved, now)
            statuses.append(status(q, used, buckets, now))
    return SubjectQuotas(subject, resolved, quotas, statuses, as_of_seq, as_of)
