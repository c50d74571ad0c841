"""How every quota of a subject stands right now, from the in-memory state (pure)."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal

from contracts.durations import DEFAULT_MAX_CLOCK_SKEW
from contracts.workloads import Resources

from .config import PolicyConfig
from .domain import EffectiveQuota, Standing, effective_quotas, need_of
from .forecast import lookback_start, projected_exhaustion
from .grants import GrantBook
from .reservations import ReservationBook
from .usage import ZERO, Buckets, UsageState
from .windows import (
    HOUR,
    horizon,
    period_of,
    reads_until,
    window_start,
    workload_hour_bounds,
    workload_hour_index,
)
from .workloads import Workload, WorkloadBook


@dataclass(frozen=True)
class Ask:
    """What a spawn asks for, so each quota can say whether it fits."""

    resources: Resources
    seconds: Decimal


@dataclass(frozen=True)
class View:
    """Everything a decision reads: the state as of one ledger seq and one config version."""

    config: PolicyConfig
    usage: UsageState
    book: WorkloadBook
    holds: ReservationBook
    now: datetime
    max_skew: timedelta = DEFAULT_MAX_CLOCK_SKEW  # the ledger's clock-skew tolerance
    grants: GrantBook = field(default_factory=GrantBook)

    @property
    def until(self) -> datetime:
        """Where every window read now ends (the same end the API's reads use)."""
        return reads_until(self.now, self.max_skew)


def resolve_groups(
    config: PolicyConfig, book: WorkloadBook, subject: str, asked: Sequence[str] = ()
) -> list[str]:
    """Groups from the config, plus the integrator's word (a spawn request, else the last
    `workload_started` or request that named groups)."""
    reported = tuple(asked) or book.groups.get(subject, ())
    return config.groups_of(subject, reported)


def pool_members(view: View, quota: EffectiveQuota, subject: str) -> list[str]:
    """Who shares a `per: group` pool: config members and subjects integrators put there."""
    groups = set(quota.pool_groups)
    members = {m for g in groups for m in view.config.groups.get(g, [])}
    members |= {s for s, gs in view.book.groups.items() if groups & set(gs)}
    return sorted(members | {subject})


def _merged(
    buckets: Sequence[Buckets], start: datetime | None, until: datetime
) -> list[tuple[datetime, Decimal]]:
    merged: dict[datetime, Decimal] = {}
    for b in buckets:
        for t, a in b.between(start, until)[1]:
            merged[t] = merged.get(t, ZERO) + a
    return sorted(merged.items())


def subject_standing(
    view: View, quota: EffectiveQuota, subject: str, ask: Ask | None = None
) -> Standing:
    """A per-subject or per-group quota: the subject's (or the pool's) usage in the window.

    The hour buckets themselves (for when quota returns) are gathered only when the quota
    is used up or the ask does not fit: most checks just sum.
    """
    who = pool_members(view, quota, subject) if quota.per == "group" else [subject]
    start = window_start(quota.window, view.now)
    series = [view.usage.subject_usage(s, quota.metric) for s in who]
    used = sum((b.used_between(start, view.until) for b in series), ZERO)
    reserved = view.holds.reserved(who, quota.metric, view.now)
    need = ZERO if ask is None else need_of(quota.metric, ask.resources, ask.seconds)
    short = used >= quota.limit or used + reserved + need > quota.enforced_limit
    # The forecast is of the effective limit (grants included), not of the grace past it:
    # "you run out" is when the limit is reached; the page and the note say the grace.
    projected, recent, since = None, ZERO, None
    recent_start = lookback_start(quota.window, view.now)
    if recent_start is not None:
        found = [b.recent(recent_start, view.now) for b in series]
        recent = sum((r for r, _ in found), ZERO)
        since = min((f for _, f in found if f is not None), default=None)
        projected = projected_exhaustion(
            quota.window, quota.limit, used, recent, view.now,
            lambda: _merged(series, start, view.until), since,
        )  # fmt: skip
    return Standing(
        quota=quota,
        used=used,
        buckets=tuple(_merged(series, start, view.until)) if short else (),
        period=period_of(quota.window, view.now),
        reserved=reserved,
        need=need,
        projected=projected,
        recent=recent,
        recent_since=since,
    )


def workload_standing(view: View, quota: EffectiveQuota, w: Workload) -> Standing:
    """A per-workload quota for one running workload.

    For `workload_hour` the worst hour of the workload's last two counts, so a crossing
    noticed just after the workload's hour turned over is still acted on (once, for that
    hour).
    """
    window = quota.window
    if not window.workload_hour:
        start = window_start(window, view.now)
        usage = view.usage.workload_usage(w.workload, quota.metric)
        used, buckets = usage.between(start, view.until)
        period = period_of(window, view.now)
        return Standing(quota, used, tuple(buckets), period, w.workload)
    started = view.book.started_at(w.workload, view.usage) or w.started_at
    now_index = max(workload_hour_index(started, view.now), 0)
    minutes = view.usage.workload_minutes(w.workload, quota.metric)
    best = (ZERO, now_index)
    for index in (now_index - 1, now_index):
        if index < 0:
            continue
        lo, hi = workload_hour_bounds(started, index)
        used = sum((a for t, a in minutes.slots.items() if lo <= t < hi), ZERO)
        if used > best[0] or (used == best[0] and index == now_index):
            best = (used, index)
    return Standing(quota, best[0], (), f"h{best[1]}", w.workload)


def standings_for(
    view: View,
    subject: str,
    groups: Sequence[str],
    ask: Ask | None = None,
    running: Sequence[Workload] | None = None,
) -> list[Standing]:
    """Every quota of the subject; per-workload quotas once per running workload."""
    out: list[Standing] = []
    workloads = (
        running if running is not None else view.book.running_for(subject, view.usage, view.now)
    )
    for quota in effective_quotas(view.config, subject, groups, view.grants, view.now):
        if quota.per == "workload":
            found = [workload_standing(view, quota, w) for w in workloads]
            # Shown even with nothing running, so people see the quota exists.
            out.extend(found or [Standing(quota, ZERO, period=period_of(quota.window, view.now))])
        else:
            out.append(subject_standing(view, quota, subject, ask))
    return out


def display_standings(standings: Sequence[Standing]) -> list[Standing]:
    """One line per quota: a per-workload quota shows its most-used workload (or nothing used)."""
    best: dict[str, Standing] = {}
    for s in standings:
        cur = best.get(s.quota.name)
        if cur is None or s.used > cur.used:
            best[s.quota.name] = s
    return [best[name] for name in sorted(best)]


def horizon_hours(config: PolicyConfig) -> int:
    """How many hours of per-subject buckets the state must keep apart (at least 35 days)."""
    longest = 35 * 24
    for q in config.quotas:
        h = horizon(q.window)
        if h is not None:
            longest = max(longest, int(h / HOUR) + 1)
    return longest
