"""Quota evaluation, pure: which quotas apply, how they stand, allow or deny, and when back."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from decimal import Decimal

from contracts.commands import (
    COMPUTE_QUOTA_EXCEEDED,
    DATA_TRANSFER_QUOTA_EXCEEDED,
    LOG_QUOTA_EXCEEDED,
)
from contracts.spawn import QuotaGrant, QuotaStatus
from contracts.workloads import Resources

from .config import PolicyConfig, QuotaRule, Window
from .grants import Applied, Grant, GrantBook
from .units import Amount
from .windows import (
    HOUR,
    calendar_bounds,
    floor_hour,
    returns_at,
    window_start,
)

__all__ = [
    "HOUR",
    "EffectiveQuota",
    "SpawnVerdict",
    "Standing",
    "calendar_bounds",
    "decide_spawn",
    "effective_quotas",
    "floor_hour",
    "need_of",
    "retry_at",
    "status",
    "window_start",
]

# What an allowed spawn reserves: requested resources times the expected duration.
RESERVABLE = ("cpu.alloc.seconds", "mem.alloc.byte_seconds", "gpu.alloc.seconds")


def default_reason(metric: str) -> str:
    """The SPEC's termination reason for a metric when the quota names none."""
    if metric == "log.bytes":
        return LOG_QUOTA_EXCEEDED
    if metric.startswith("net."):
        return DATA_TRANSFER_QUOTA_EXCEEDED
    return COMPUTE_QUOTA_EXCEEDED


@dataclass(frozen=True)
class EffectiveQuota:
    """One limit on one (metric, window, per) for a subject, after combining group quotas."""

    name: str
    metric: str
    window: Window
    per: str
    limit: Decimal
    amount: Amount
    enforce: frozenset[str]
    warn_at: tuple[Decimal, ...]
    rules: tuple[QuotaRule, ...]
    reason: str = COMPUTE_QUOTA_EXCEEDED
    grace_seconds: Decimal = Decimal(30)
    notice_seconds: Decimal = Decimal(0)
    mode: str = "hard"
    grace: Decimal = Decimal(0)
    granted: Decimal = Decimal(0)  # included in `limit`
    grants: tuple[Grant, ...] = ()  # active, raising the limit
    lapsed: tuple[Grant, ...] = ()  # revoked or expired lately: named when a block returns
    grant_seq: int = 0  # newest grant record about this quota and subject

    @property
    def base_limit(self) -> Decimal:
        """The configured limit, before grants."""
        return self.limit - self.granted

    @property
    def enforced_limit(self) -> Decimal:
        """Where denial and termination start: the limit plus its grace."""
        return self.limit * (1 + self.grace)

    @property
    def hard(self) -> bool:
        return self.mode == "hard"

    def limit_text(self) -> str:
        """'12 GiB·h', or '12 GiB·h (2 GiB·h + 10 GiB·h grant g-… until …)' with grants."""
        text = self.show(self.limit)
        if self.grants:
            parts = [self.show(self.base_limit)] + [
                f"{self.show(g.amount)} grant {g.grant_id} until {when(g.expires_at)}"
                for g in self.grants
            ]
            text += f" ({' + '.join(parts)})"
        return text

    @property
    def pool_groups(self) -> tuple[str, ...]:
        """For `per: group`: the groups whose members share this pool."""
        return tuple(sorted({g for r in self.rules for g in r.applies_to.groups}))

    def show(self, base_value: Decimal) -> str:
        """A base-unit value in the quota's unit: '61.2 GiB·h'."""
        return self.amount.show(base_value)


def _applies(rule: QuotaRule, subject: str, groups: Sequence[str]) -> bool:
    a = rule.applies_to
    return a.all or subject in a.users or any(g in a.groups for g in groups)


def effective_quotas(
    config: PolicyConfig,
    subject: str,
    groups: Sequence[str],
    grants: GrantBook | None = None,
    now: datetime | None = None,
) -> list[EffectiveQuota]:
    """The quotas a subject is under; several on one metric+window+per combine by `combine`.

    Active grants on a quota (named by any of its rules) raise its limit.
    """
    buckets: dict[tuple[str, str, str], list[QuotaRule]] = {}
    for rule in config.quotas:
        if _applies(rule, subject, groups):
            buckets.setdefault((rule.metric, rule.window.key(), rule.per), []).append(rule)
    result = []
    for rules in buckets.values():
        mode = rules[0].combine
        if mode == "sum":
            limit = sum((r.amount.base for r in rules), Decimal(0))
            name = "+".join(r.name for r in rules)
            chosen = rules[0]
        else:
            pick = max if mode == "max" else min
            chosen = pick(rules, key=lambda r: r.amount.base)
            limit, name = chosen.amount.base, chosen.name
        result.append(
            EffectiveQuota(
                name=name,
                metric=chosen.metric,
                window=chosen.window,
                per=chosen.per,
                limit=limit,
                amount=chosen.amount,
                enforce=frozenset(e for r in rules for e in r.enforce),
                warn_at=tuple(chosen.warn_at),
                rules=tuple(rules),
                reason=chosen.termination.reason or default_reason(chosen.metric),
                grace_seconds=chosen.termination.grace_seconds,
                notice_seconds=chosen.termination.notice_seconds,
                mode=chosen.mode,
                grace=chosen.grace,
            )
        )
    if grants is not None and grants.grants:
        at = now or datetime.now(UTC)
        result = [with_grants(q, grants.applying(
            {q.name, *(r.name for r in q.rules)}, q.per, subject, q.pool_groups, at
        )) for q in result]  # fmt: skip
    return sorted(result, key=lambda q: q.name)


def with_grants(quota: EffectiveQuota, applied: Applied) -> EffectiveQuota:
    """The quota with its active grants added to the limit."""
    if not applied.last_seq:
        return quota
    return replace(
        quota,
        limit=quota.limit + applied.granted,
        granted=applied.granted,
        grants=applied.active,
        lapsed=applied.lapsed,
        grant_seq=applied.last_seq,
    )


def retry_at(
    quota: EffectiveQuota, used: Decimal, buckets: Sequence[tuple[datetime, Decimal]],
    now: datetime,
) -> datetime | None:  # fmt: skip
    """When usage will be back under the limit if nothing more is used; None if never/now."""
    return returns_at(quota.window, used, buckets, now, lambda u: u < quota.limit)


def unblock_at(
    quota: EffectiveQuota, used: Decimal, buckets: Sequence[tuple[datetime, Decimal]],
    now: datetime,
) -> datetime | None:  # fmt: skip
    """When usage will be back under the enforced limit (limit plus grace)."""
    return returns_at(quota.window, used, buckets, now, lambda u: u < quota.enforced_limit)


def _exact(value: Decimal) -> Decimal:
    return value.quantize(Decimal("0.000001")).normalize()


def status(
    quota: EffectiveQuota,
    used: Decimal,
    buckets: Sequence[tuple[datetime, Decimal]],
    now: datetime,
    reserved: Decimal = Decimal(0),
    projected: datetime | None = None,
) -> QuotaStatus:
    """How one quota stands, in the unit it was written in."""
    if used >= quota.limit:
        state = "exceeded"
    elif quota.warn_at and used >= quota.limit * quota.warn_at[0]:
        state = "warning"
    else:
        state = "ok"
    a = quota.amount
    grace_left = None
    if quota.hard and quota.grace:
        grace_left = _exact(a.in_unit(max(quota.enforced_limit - used, Decimal(0))))
    return QuotaStatus(
        name=quota.name,
        metric=quota.metric,
        unit=a.unit,
        used=_exact(a.in_unit(used)),
        limit=a.in_unit(quota.limit).normalize(),
        remaining=_exact(a.in_unit(max(quota.limit - used, Decimal(0)))),
        window=quota.window.key(),
        state=state,
        retry_at=retry_at(quota, used, buckets, now),
        enforce=sorted(quota.enforce),
        reserved=_exact(a.in_unit(reserved)),
        projected_exhaustion_at=projected,
        mode="soft" if quota.mode == "soft" else "hard",
        grace=quota.grace,
        enforced_limit=_exact(a.in_unit(quota.enforced_limit)) if quota.hard else None,
        enforced=quota.hard and bool(quota.enforce) and used >= quota.enforced_limit,
        grace_remaining=grace_left,
        note=limit_note(quota, used),
        base_limit=_exact(a.in_unit(quota.base_limit)),
        granted=_exact(a.in_unit(quota.granted)),
        grants=[
            QuotaGrant(
                grant_id=g.grant_id,
                amount=_exact(a.in_unit(g.amount)),
                expires_at=g.expires_at,
                scope=g.scope,
            )
            for g in quota.grants
        ],
    )


def limit_note(quota: EffectiveQuota, used: Decimal) -> str | None:
    """What being over means for this quota: 'over by 0.3 GiB·h, within grace'."""
    if used < quota.limit:
        return None
    over = f"over by {quota.show(used - quota.limit)}"
    if not quota.hard:
        return f"{over}; a soft limit: reported, never denied or terminated"
    if not quota.grace:
        return None
    if used < quota.enforced_limit:
        return (
            f"{over}, within grace ({quota.show(quota.enforced_limit - used)} of the "
            f"{quota.grace:%} grace left before spawns are denied and workloads stopped)"
        )
    return f"{over}, past the {quota.grace:%} grace"


@dataclass(frozen=True)
class Standing:
    """One quota of one subject (or one of its workloads) as of now: the inputs of a decision."""

    quota: EffectiveQuota
    used: Decimal
    buckets: tuple[tuple[datetime, Decimal], ...] = ()
    period: str = "rolling"
    workload: str | None = None
    reserved: Decimal = Decimal(0)
    need: Decimal = Decimal(0)
    projected: datetime | None = None  # when it runs out at the recent rate (forecast.py)
    recent: Decimal = Decimal(0)  # usage in the forecast's lookback
    recent_since: datetime | None = None  # the first lookback hour holding any of it

    @property
    def exceeded(self) -> bool:
        """At or over the limit: reported (state, quota events), whatever the mode."""
        return self.used >= self.quota.limit

    @property
    def breached(self) -> bool:
        """Past the enforced limit of a hard quota: spawns denied, workloads terminated."""
        return self.quota.hard and self.used >= self.quota.enforced_limit

    def status(self, now: datetime) -> QuotaStatus:
        return status(self.quota, self.used, self.buckets, now, self.reserved, self.projected)


def need_of(metric: str, resources: Resources, seconds: Decimal) -> Decimal:
    """What a spawn would use of an allocation metric over its expected duration."""
    per_second = {
        "cpu.alloc.seconds": resources.cpus,
        "mem.alloc.byte_seconds": Decimal(resources.mem_bytes),
        "gpu.alloc.seconds": Decimal(resources.gpus),
    }.get(metric, Decimal(0))
    return per_second * seconds


@dataclass(frozen=True)
class SpawnVerdict:
    allowed: bool
    reason: str
    message: str
    retry_at: datetime | None
    blocking: tuple[str, ...] = field(default=())


def when(t: datetime) -> str:
    """A time as people read it in messages: '2026-12-03 14:00 UTC'."""
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _fits(s: Standing) -> bool:
    return s.used + s.reserved + s.need <= s.quota.enforced_limit


def _sentence(s: Standing, now: datetime) -> tuple[str, datetime | None]:
    q = s.quota
    limit = q.limit_text()
    if s.breached:
        text = (
            f"You have used {q.amount.number(s.used)} of {limit} ({q.name}) {q.window.describe()}"
        )
        if q.grace:
            text += f", past its {q.grace:%} grace"
        back = unblock_at(q, s.used, s.buckets, now)
    else:
        left = max(q.enforced_limit - s.used - s.reserved, Decimal(0))
        grace = f" with its {q.grace:%} grace" if q.grace else ""
        text = (
            f"This spawn needs {q.show(s.need)} ({q.name}) but {q.show(left)} of {limit}{grace} "
            f"{'is' if left == 1 else 'are'} left {q.window.describe()}"
        )
        if s.reserved:
            text += f", after {q.show(s.reserved)} held for spawns already allowed"
        room = q.enforced_limit - s.reserved - s.need
        back = returns_at(q.window, s.used, s.buckets, now, lambda u: u <= room)
    if back is not None:
        text += f"; quota returns from {when(back)}"
    elif q.window.rolling is None and q.window.calendar is None:
        text += "; it does not come back by itself"
    return text, back


def _allowed_message(subject: str, gating: Sequence[Standing]) -> str:
    """What an allowed spawn leaves, closest quota first (a hub shows it while spawning)."""
    if not gating:
        return f"{subject} is within every quota."
    closest = sorted(gating, key=lambda s: s.used / s.quota.limit if s.quota.limit else 1)[::-1]
    parts = []
    for s in closest[:2]:
        q = s.quota
        part = (
            f"{q.amount.number(s.used)} of {q.limit_text()} used ({q.name}) {q.window.describe()}"
        )
        note = limit_note(q, s.used)
        if note:
            part += f", {note}"
        if s.need:
            part += f", {q.show(s.need)} held for this spawn"
        parts.append(part)
    return f"Allowed for {subject}: " + "; ".join(parts) + "."


def decide_spawn(
    subject: str,
    standings: Sequence[Standing],
    now: datetime,
    help_text: str | None = None,
) -> SpawnVerdict:
    """Deny when a spawn-enforced quota is used up, or this spawn would not fit in what is left.

    "Used up" is past the limit plus its grace; soft quotas never deny.

    What fits counts reservations of spawns already allowed, so concurrent spawns cannot
    overrun a quota together. Per-workload quotas do not gate spawns (a new workload has
    used nothing yet).
    """
    gating = [
        s for s in standings
        if "spawn" in s.quota.enforce and s.quota.per != "workload" and s.quota.hard
    ]  # fmt: skip
    blocking = [s for s in gating if s.breached or not _fits(s)]
    if not blocking:
        return SpawnVerdict(True, "within_quota", _allowed_message(subject, gating), None)
    parts = [_sentence(s, now) for s in blocking]
    message = ". ".join(p[0] for p in parts) + "."
    if help_text:
        message += f" {help_text}"
    returns = [p[1] for p in parts]
    # Spawning is possible again once every blocking quota has returned.
    retry = None if any(r is None for r in returns) else max(r for r in returns if r is not None)
    reason = "quota_exceeded" if any(s.breached for s in blocking) else "quota_insufficient"
    return SpawnVerdict(False, reason, message, retry, tuple(s.quota.name for s in blocking))


def statuses_by_name(standings: Sequence[Standing], now: datetime) -> Mapping[str, QuotaStatus]:
    return {s.quota.name: s.status(now) for s in standings}
