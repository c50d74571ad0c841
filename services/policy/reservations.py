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

    def live(self, now: datetime) -> bool:
        if now >= self.expires:
            return False
        return self.started or now < self.created + START_TIMEOUT


def hold(
    decision_id: str, subject: str, workload: str | None, amounts: dict[str, Decimal],
    now: datetime, expected_seconds: Decimal,
) -> Reservation:  # fmt: skip
    """A new hold for an allowed spawn."""
    expires = now + timedelta(seconds=float(expected_seconds)) + START_TIMEOUT
    kept = {m: a for m, a in amounts.items() if a > 0}
    return Reservation(decision_id, subject, workload, kept, now, expires)


class ReservationBook:
    """Every hold in force, by decision id, subject and workload."""

    def __init__(self) -> None:
        self.items: dict[str, Reservation] = {}
        self._by_subject: dict[str, dict[str, Reservation]] = {}
        self._by_workload: dict[str, dict[str, Reservation]] = {}

    def add(self, r: Reservation) -> None:
        if r.empty:
            return
        self.items[r.decision_id] = r
        self._by_subject.setdefault(r.subject, {})[r.decision_id] = r
        if r.workload is not None:
            self._by_workload.setdefault(r.workload, {})[r.decision_id] = r

    def _drop(self, r: Reservation) -> None:
        self.items.pop(r.decision_id, None)
        for index, key in ((self._by_subject, r.subject), (self._by_workload, r.workload)):
            if key is not None and key in index:
                index[key].pop(r.decision_id, None)
                if not index[key]:
                    del index[key]

    def of(self, subject: str) -> list[Reservation]:
        return list(self._by_subject.get(subject, {}).values())

    def reserved(self, subjects: Iterable[str], metric: str, now: datetime) -> Decimal:
        """What is held on `metric` for any of `subjects` (one, or a group pool's members)."""
        total = ZERO
        for s in set(subjects):
            for r in self._by_subject.get(s, {}).values():
                if r.live(now):
                    total += r.remaining.get(metric, ZERO)
        return total

    def consume(self, subject: str, workload: str, metric: str, amount: Decimal) -> None:
        """Real usage replaces held usage: the workload's own hold first, else an unnamed one."""
        named = list(self._by_workload.get(workload, {}).values())
        candidates = named or sorted(
            (r for r in self._by_subject.get(subject, {}).values() if r.workload is None),
            key=lambda r: r.created,
        )
        for r in candidates:
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
