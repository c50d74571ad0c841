"""Reservations, pure: what allowed spawns will use, held until real usage replaces it.

An allowed spawn holds resources times expected seconds on each allocation metric. The
workload's usage, as it arrives, draws the hold down; a stop releases what is left. A hold
whose workload never shows any usage is released after `START_TIMEOUT` (the spawn failed
or never happened), and every hold ends by its expected end plus that timeout. Holds are
indexed by subject and by workload, so a check reads only its own subject's holds.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from decimal import Decimal

START_TIMEOUT = timedelta(minutes=15)
ZERO = Decimal(0)


@dataclass
class Reservation:
    decision_id: str
    subject: str
    workload: str | None
    remaining: dict[str, Decimal]  # metric -> amount still held
    created: datetime
    expires: datetime
    started: bool = False  # usage of its workload has been seen

    @property
    def empty(self) -> bool:
        return all(v <= 0 for v in self.remaining.values())

    @property
    def deadline(self) -> datetime:
        """The hold is live strictly before this instant and never again after it."""
        return self.expires if self.started else min(self.expires, self.created + START_TIMEOUT)

    def live(self, now: datetime) -> bool:
        return now < self.deadline


def hold(
    decision_id: str, subject: str, workload: str | None, amounts: dict[str, Decimal],
    now: datetime, expected_seconds: Decimal,
) -> Reservation:  # fmt: skip
    """A new hold for an allowed spawn."""
    expires = now + timedelta(seconds=float(expected_seconds)) + START_TIMEOUT
    kept = {m: a for m, a in amounts.items() if a > 0}
    return Reservation(decision_id, subject, workload, kept, now, expires)


@dataclass
class _Sum:
    """What a subject holds on one metric, valid for any `now` in [lo, hi): no hold's
    deadline lies in between, so the same holds are live there."""

    total: Decimal
    lo: datetime | None  # the latest deadline at or before the instant it was summed at
    hi: datetime | None  # the earliest deadline after it

    def count(self, r: Reservation, amount: Decimal) -> bool:
        """Take a new hold into the sum; False when it no longer holds for one interval."""
        d = r.deadline
        if self.hi is not None and d >= self.hi:  # live throughout
            self.total += amount
        elif self.lo is not None and d <= self.lo:  # ended before it
            pass
        elif (self.lo is None or self.lo <= r.created) and r.created < d:
            # It ends inside: keep the part that holds from its creation, the next check's now.
            self.total += amount
            self.hi = d
        else:
            return False
        return True


class ReservationBook:
    """Every hold in force, by decision id, subject and workload.

    A check reads what a subject holds on each of its quotas' metrics: that sum is kept per
    (subject, metric) until a hold of the subject changes or time passes one of their
    deadlines, so a subject with many holds costs one lookup per quota, not one per hold.
    """

    def __init__(self) -> None:
        self.items: dict[str, Reservation] = {}
        self._by_subject: dict[str, dict[str, Reservation]] = {}
        self._by_workload: dict[str, dict[str, Reservation]] = {}
        self._unnamed: dict[str, dict[str, Reservation]] = {}  # subject -> holds without workload
        self._sums: dict[str, dict[str, _Sum]] = {}  # subject -> metric -> sum

    def add(self, r: Reservation) -> None:
        if r.empty:
            return
        self.items[r.decision_id] = r
        self._by_subject.setdefault(r.subject, {})[r.decision_id] = r
        if r.workload is not None:
            self._by_workload.setdefault(r.workload, {})[r.decision_id] = r
        else:
            self._unnamed.setdefault(r.subject, {})[r.decision_id] = r
        sums = self._sums.get(r.subject, {})
        for metric, kept in list(sums.items()):
            if not kept.count(r, r.remaining.get(metric, ZERO)):
                del sums[metric]

    def _drop(self, r: Reservation) -> None:
        self.items.pop(r.decision_id, None)
        unnamed = r.subject if r.workload is None else None
        for index, key in (
            (self._by_subject, r.subject), (self._by_workload, r.workload), (self._unnamed, unnamed)
        ):  # fmt: skip
            if key is not None and key in index:
                index[key].pop(r.decision_id, None)
                if not index[key]:
                    del index[key]
        self._sums.pop(r.subject, None)

    def of(self, subject: str) -> list[Reservation]:
        return list(self._by_subject.get(subject, {}).values())

    def reserved(self, subjects: Iterable[str], metric: str, now: datetime) -> Decimal:
        """What is held on `metric` for any of `subjects` (one, or a group pool's members)."""
        total = ZERO
        for s in set(subjects):
            holds = self._by_subject.get(s)
            if holds:
                total += self._sum(s, holds, metric, now)
        return total

    def _sum(
        self, subject: str, holds: dict[str, Reservation], metric: str, now: datetime
    ) -> Decimal:
        sums = self._sums.setdefault(subject, {})
        cached = sums.get(metric)
        if (
            cached is not None
            and (cached.lo is None or cached.lo <= now)
            and (cached.hi is None or now < cached.hi)
        ):
            return cached.total
        total, lo, hi = ZERO, None, None
        for r in holds.values():
            deadline = r.deadline
            if now < deadline:
                total += r.remaining.get(metric, ZERO)
                hi = deadline if hi is None else min(hi, deadline)
            else:
                lo = deadline if lo is None else max(lo, deadline)
        sums[metric] = _Sum(total, lo, hi)
        return total

    def consume(self, subject: str, workload: str, metric: str, amount: Decimal) -> None:
        """Real usage replaces held usage: the workload's own hold first, else an unnamed one."""
        named = self._by_workload.get(workload)
        if named:
            candidates = list(named.values())
        else:
            unnamed = self._unnamed.get(subject)
            if not unnamed:
                return
            candidates = sorted(unnamed.values(), key=lambda r: r.created)
        for r in candidates:
            self._sums.pop(r.subject, None)
            r.started = True
            held = r.remaining.get(metric, ZERO)
            if held <= 0 or amount <= 0:
                continue
            take = min(held, amount)
            r.remaining[metric] = held - take
            amount -= take
        for r in candidates:
            if r.empty:
                self._drop(r)

    def release_workload(self, workload: str) -> None:
        """The workload stopped: whatever it still held is free."""
        for r in list(self._by_workload.get(workload, {}).values()):
            self._drop(r)

    def expire(self, now: datetime) -> list[str]:
        """Drop holds that ended; return their decision ids."""
        gone = [r for r in self.items.values() if not r.live(now)]
        for r in gone:
            self._drop(r)
        return [r.decision_id for r in gone]
