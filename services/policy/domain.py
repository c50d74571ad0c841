"""Quota evaluation, pure: which quotas apply, how much is used, allow or deny, and when back."""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from contracts.spawn import QuotaStatus

from .config import PolicyConfig, QuotaRule, Window
from .units import Amount, format_number

HOUR = timedelta(hours=1)


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


def _applies(rule: QuotaRule, subject: str, groups: Sequence[str]) -> bool:
    a = rule.applies_to
    return a.all or subject in a.users or any(g in a.groups for g in groups)


def effective_quotas(
    config: PolicyConfig, subject: str, groups: Sequence[str]
) -> list[EffectiveQuota]:
    """The quotas a subject is under; several on one metric+window+per combine by `combine`."""
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
            )
        )
    return sorted(result, key=lambda q: q.name)


def floor_hour(t: datetime) -> datetime:
    return t.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def calendar_bounds(window: Window, now: datetime) -> tuple[datetime, datetime]:
    """Start and end of the current calendar period in the window's time zone, in UTC."""
    local = now.astimezone(ZoneInfo(window.tz))
    day = local.replace(hour=0, minute=0, second=0, microsecond=0)
    if window.calendar == "day":
        start, end = day, day + timedelta(days=1)
    elif window.calendar == "week":
        start = day - timedelta(days=day.weekday())
        end = start + timedelta(days=7)
    else:
        start = day.replace(day=1)
        end = (start + timedelta(days=32)).replace(day=1)
    # Re-attach the zone so DST changes inside the period land on local midnight.
    tz = ZoneInfo(window.tz)
    start = start.replace(tzinfo=None).replace(tzinfo=tz)
    end = end.replace(tzinfo=None).replace(tzinfo=tz)
    return start.astimezone(UTC), end.astimezone(UTC)


def window_start(window: Window, now: datetime) -> datetime | None:
    """First hour bucket that counts (usage is kept in hour buckets); None for lifetime.

    Rolling windows count the whole hour bucket their start falls in, so they can count up
    to an hour more than the exact window: strict by at most an hour, never lenient.
    """
    if window.rolling is not None:
        return floor_hour(now - window.rolling)
    if window.calendar is not None:
        return calendar_bounds(window, now)[0]
    if window.workload_hour:
        return floor_hour(now - HOUR)
    return None


def retry_at(
    quota: EffectiveQuota, used: Decimal, buckets: Iterable[tuple[datetime, Decimal]],
    now: datetime,
) -> datetime | None:  # fmt: skip
    """When usage will be back under the limit if nothing more is used; None if never/now."""
    if used < quota.limit:
        return None
    w = quota.window
    if w.rolling is not None:
        remaining = used
        for hour, amount in sorted(buckets):
            remaining -= amount
            if remaining < quota.limit:
                return hour + HOUR + w.rolling
        return None
    if w.calendar is not None:
        return calendar_bounds(w, now)[1]
    return None


def status(
    quota: EffectiveQuota,
    used: Decimal,
    buckets: Iterable[tuple[datetime, Decimal]],
    now: datetime,
) -> QuotaStatus:
    """How one quota stands, in the unit it was written in."""
    if used >= quota.limit:
        state = "exceeded"
    elif quota.warn_at and used >= quota.limit * quota.warn_at[0]:
        state = "warning"
    else:
        state = "ok"
    a = quota.amount
    return QuotaStatus(
        name=quota.name,
        metric=quota.metric,
        unit=a.unit,
        used=a.in_unit(used).quantize(Decimal("0.000001")).normalize(),
        limit=a.in_unit(quota.limit).normalize(),
        remaining=a.in_unit(max(quota.limit - used, Decimal(0)))
        .quantize(Decimal("0.000001"))
        .normalize(),
        window=quota.window.key(),
        state=state,
        retry_at=retry_at(quota, used, buckets, now),
        enforce=sorted(quota.enforce),
    )


@dataclass(frozen=True)
class SpawnVerdict:
    allowed: bool
    reason: str
    message: str
    retry_at: datetime | None


def _when(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def decide_spawn(
    subject: str,
    quotas: Sequence[EffectiveQuota],
    statuses: Mapping[str, QuotaStatus],
    help_text: str | None = None,
) -> SpawnVerdict:
    """Deny when any spawn-enforced quota of the subject is used up; say why and until when."""
    blocking = [
        (q, statuses[q.name])
        for q in quotas
        if "spawn" in q.enforce and q.per != "workload" and statuses[q.name].state == "exceeded"
    ]
    if not blocking:
        return SpawnVerdict(True, "within_quota", f"{subject} is within every quota.", None)
    sentences = []
    for q, st in blocking:
        a = q.amount
        sentence = (
            f"You have used {format_number(st.used)} of {a.show(st.limit * a.factor)} "
            f"({q.name}) {q.window.describe()}"
        )
        if st.retry_at is not None:
            sentence += f"; quota returns from {_when(st.retry_at)}"
        sentences.append(sentence)
    message = ". ".join(sentences) + "."
    if help_text:
        message += f" {help_text}"
    returns = [st.retry_at for _, st in blocking]
    # Spawning is possible again once every blocking quota has returned.
    retry = None if any(r is None for r in returns) else max(r for r in returns if r is not None)
    return SpawnVerdict(False, "quota_exceeded", message, retry)
