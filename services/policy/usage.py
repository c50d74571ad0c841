"""The policy's picture of usage, pure: hour buckets per subject and per workload, by ledger seq.

Built from the ledger's rollups as of one ledger sequence, then kept current by folding
usage events strictly in sequence order: an event at or below `last_seq` is a duplicate
(ignored), one beyond `last_seq + 1` reveals a gap (the caller fills it from the ledger).
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from enum import Enum
from typing import NamedTuple

from .prices import COST, Pricebook
from .windows import HOUR, floor_hour, floor_minute

ZERO = Decimal(0)


class UsageEvent(NamedTuple):
    """One committed usage event, whichever way it arrived (feed or ledger table).

    A tuple: the policy makes one per feed event (tens of thousands a second during P1),
    and a frozen dataclass's __init__ cost three times as much (1.31 against 0.39 us a
    call, timeit).
    """

    seq: int
    subject: str
    workload: str
    host: str
    metric: str
    delta: Decimal
    at: datetime  # the sample's time (window_end): the ledger's rollups bucket by it
    gpu_model: str = ""  # the sample's gpu_model label: prices may depend on it


class Applied(Enum):
    APPLIED = "applied"
    DUPLICATE = "duplicate"
    GAP = "gap"


class Buckets:
    """Usage of one series in hour (or minute) buckets, plus what was folded out of them.

    The last window sum is remembered until the buckets change: window starts move once an
    hour, so repeated checks of one subject cost O(1) and a changed series O(buckets).
    """

    __slots__ = ("_memo", "base", "slots")

    def __init__(self) -> None:
        self.slots: dict[datetime, Decimal] = {}
        self.base = ZERO
        self._memo: tuple[tuple[datetime | None, datetime], Decimal] | None = None

    def add(self, slot: datetime, amount: Decimal) -> None:
        self.slots[slot] = self.slots.get(slot, ZERO) + amount
        self._memo = None

    def add_base(self, amount: Decimal) -> None:
        """Usage from before the first bucket kept apart."""
        self.base += amount
        self._memo = None

    def total(self) -> Decimal:
        return self.base + sum(self.slots.values(), ZERO)

    def used_between(self, start: datetime | None, until: datetime) -> Decimal:
        """Usage in [start, until) (start None: from the beginning), without sorting or
        copying buckets."""
        if self._memo is not None and self._memo[0] == (start, until):
            return self._memo[1]
        if start is None:
            used = self.base + sum((a for t, a in self.slots.items() if t < until), ZERO)
        else:
            used = sum((a for t, a in self.slots.items() if start <= t < until), ZERO)
        self._memo = ((start, until), used)
        return used

    def recent(self, start: datetime, now: datetime) -> tuple[Decimal, datetime | None]:
        """Usage in the hour buckets from `start` to the one holding `now`, and the first of
        them holding any (a few lookups: the forecast's lookback, on every check)."""
        total, first, hour, last = ZERO, None, start, floor_hour(now)
        while hour <= last:
            amount = self.slots.get(hour, ZERO)
            if amount and first is None:
                first = hour
            total += amount
            hour += HOUR
        return total, first

    def between(
        self, start: datetime | None, until: datetime
    ) -> tuple[Decimal, list[tuple[datetime, Decimal]]]:
        """Usage in [start, until) (start None: from the beginning) and its buckets."""
        if start is None:
            items = sorted((t, a) for t, a in self.slots.items() if t < until)
            return self.base + sum((a for _, a in items), ZERO), items
        items = sorted((t, a) for t, a in self.slots.items() if start <= t < until)
        return sum((a for _, a in items), ZERO), items

    def fold_before(self, cutoff: datetime) -> None:
        """Keep only the total of buckets older than `cutoff` (they no longer matter apart)."""
        for t in [t for t in self.slots if t < cutoff]:
            self.base += self.slots.pop(t)
        self._memo = None

    def drop_before(self, cutoff: datetime) -> None:
        for t in [t for t in self.slots if t < cutoff]:
            del self.slots[t]
        self._memo = None


@dataclass
class Seen:
    """Where and when a workload's usage came from."""

    subject: str
    host: str
    first: datetime
    last: datetime
    # The latest sample time of usage folded event by event (never from the hourly
    # snapshot, whose buckets only say "some time in this hour"): what re-issuing a
    # terminate command and resuming a stopped workload go by.
    sampled_until: datetime | None = None


@dataclass
class UsageState:
    """Usage per (subject, metric) and per (workload, metric), as of ledger seq `last_seq`."""

    last_seq: int = 0
    minute_metrics: frozenset[str] = frozenset()
    pricebook: Pricebook | None = None  # set: (subject, "cost") buckets hold the priced usage
    subjects: dict[tuple[str, str], Buckets] = field(default_factory=dict)
    workloads: dict[tuple[str, str], Buckets] = field(default_factory=dict)
    minutes: dict[tuple[str, str], Buckets] = field(default_factory=dict)
    seen: dict[str, Seen] = field(default_factory=dict)
    by_subject: dict[str, set[str]] = field(default_factory=dict)  # subject -> workloads seen
    _hour_of: tuple[datetime | None, datetime] = field(
        default=(None, datetime.min), repr=False, compare=False
    )  # the last event time folded, and its hour
    _minute_of: tuple[datetime | None, datetime] = field(
        default=(None, datetime.min), repr=False, compare=False
    )  # the last event time of a minute metric folded, and its minute

    def apply(self, event: UsageEvent) -> Applied:
        """Fold one event if it is the next in sequence."""
        if event.seq <= self.last_seq:
            return Applied.DUPLICATE
        if event.seq != self.last_seq + 1:
            return Applied.GAP
        self.last_seq = event.seq
        self.add(event)
        if event.delta > 0:
            seen = self.seen[event.workload]
            if seen.sampled_until is None or event.at > seen.sampled_until:
                seen.sampled_until = event.at
        return Applied.APPLIED

    def add(self, e: UsageEvent) -> None:
        """Count one event's usage (no sequence check: snapshot loading and `apply`)."""
        # The readings of one sample share its time: its hour is worked out once. Compared
        # by value: events decoded from the feed carry one datetime object each (by
        # identity, every event paid for floor_hour: 10% of the policy's CPU during P1).
        at = e.at
        if at != self._hour_of[0]:
            self._hour_of = (at, floor_hour(at))
        hour = self._hour_of[1]
        _buckets(self.subjects, (e.subject, e.metric)).add(hour, e.delta)
        if self.pricebook is not None and e.metric in self.pricebook.metrics:
            cost = self.pricebook.cost(e.metric, e.gpu_model, hour, e.delta)
            if cost:
                _buckets(self.subjects, (e.subject, COST)).add(hour, cost)
        _buckets(self.workloads, (e.workload, e.metric)).add(hour, e.delta)
        if e.metric in self.minute_metrics:
            if at != self._minute_of[0]:
                self._minute_of = (at, floor_minute(at))
            _buckets(self.minutes, (e.workload, e.metric)).add(self._minute_of[1], e.delta)
        self.note(e.workload, e.subject, e.host, e.at)

    def note(
        self, workload: str, subject: str, host: str, at: datetime, until: datetime | None = None
    ) -> None:
        last = until or at
        seen = self.seen.get(workload)
        if seen is None:
            self.seen[workload] = Seen(subject, host, at, last)
            self.by_subject.setdefault(subject, set()).add(workload)
        else:
            seen.host = host
            seen.first, seen.last = min(seen.first, at), max(seen.last, last)

    def load_hours(
        self,
        rows: Iterable[tuple[str, str, str, str, datetime, Decimal]],
        *,
        per_workload: bool,
        now: datetime | None = None,
    ) -> None:
        """Rollup rows (subject, workload, host, metric, hour, total) into the buckets."""
        for subject, workload, host, metric, hour, total in rows:
            if per_workload:
                self.workloads.setdefault((workload, metric), Buckets()).add(hour, total)
                # An hour bucket says usage came in up to its end (or now, if sooner).
                until = hour + HOUR if now is None else min(hour + HOUR, now)
                self.note(workload, subject, host, hour, until)
            else:
                self.subjects.setdefault((subject, metric), Buckets()).add(hour, total)

    def load_costs(
        self, rows: Iterable[tuple[str, str, str, datetime, Decimal]], horizon_start: datetime
    ) -> None:
        """Priced rollup rows (subject, metric, gpu_model, hour, total) into cost buckets;
        hours before the horizon into the cost base."""
        if self.pricebook is None:
            return
        for subject, metric, gpu_model, hour, total in rows:
            cost = self.pricebook.cost(metric, gpu_model, hour, total)
            if not cost:
                continue
            b = self.subjects.setdefault((subject, COST), Buckets())
            if hour >= horizon_start:
                b.add(hour, cost)
            else:
                b.add_base(cost)

    def load_bases(self, rows: Iterable[tuple[str, str, Decimal]]) -> None:
        """Per (subject, metric), usage older than the horizon kept in hour buckets."""
        for subject, metric, total in rows:
            self.subjects.setdefault((subject, metric), Buckets()).add_base(total)

    def load_minutes(self, rows: Iterable[tuple[str, str, datetime, Decimal]]) -> None:
        for workload, metric, minute, total in rows:
            self.minutes.setdefault((workload, metric), Buckets()).add(minute, total)

    def subject_usage(self, subject: str, metric: str) -> Buckets:
        return self.subjects.get((subject, metric)) or Buckets()

    def workload_usage(self, workload: str, metric: str) -> Buckets:
        return self.workloads.get((workload, metric)) or Buckets()

    def workload_minutes(self, workload: str, metric: str) -> Buckets:
        return self.minutes.get((workload, metric)) or Buckets()

    def sampled_until(self, workload: str) -> datetime | None:
        seen = self.seen.get(workload)
        return None if seen is None else seen.sampled_until

    def workloads_of(self, subject: str) -> list[str]:
        return sorted(self.by_subject.get(subject, ()))

    def known_subjects(self) -> set[str]:
        return {s for s, _ in self.subjects}

    def compact(self, horizon_start: datetime, keep_workloads: set[str], now: datetime) -> None:
        """Bound memory: fold old hours into totals, drop detail of finished workloads."""
        for b in self.subjects.values():
            b.fold_before(horizon_start)
        for b in self.minutes.values():
            b.drop_before(now - timedelta(hours=3))
        gone = {w for w, s in self.seen.items() if w not in keep_workloads and s.last < now - DAY}
        for key in [k for k in self.workloads if k[0] in gone]:
            del self.workloads[key]
        for key in [k for k in self.minutes if k[0] in gone]:
            del self.minutes[key]
        for w in gone:
            seen = self.seen.pop(w)
            self.by_subject.get(seen.subject, set()).discard(w)


DAY = timedelta(days=1)


def _buckets(index: dict[tuple[str, str], Buckets], key: tuple[str, str]) -> Buckets:
    found = index.get(key)
    if found is None:
        found = index[key] = Buckets()
    return found
