"""The policy's in-memory state: usage, running workloads, holds and open episodes.

Every decision reads it without touching Postgres, so spawn checks answer in well under a
millisecond of work. Mutations happen on one event loop without awaiting in between, so a
spawn check's "does it fit, then hold it" is atomic with respect to every other check.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from itertools import islice

from contracts.durations import DEFAULT_MAX_CLOCK_SKEW

from . import metrics
from .config import PolicyConfig
from .engine import Mark, MarkKey
from .grants import GrantBook
from .notice import Notice
from .reissue import Attempt
from .reservations import ReservationBook
from .source import ConfigSource
from .standings import View
from .turns import SLICE, Turns
from .usage import Applied, UsageEvent, UsageState
from .workloads import Workload, WorkloadBook

log = logging.getLogger("tollgate.policy")
Clock = Callable[[], datetime]
FOLD_CHUNK = 32  # events folded between two looks at the clock


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class PolicyStats:
    """Counters of one policy instance, mirrored into the process's Prometheus metrics."""

    spawn_allowed: int = 0
    spawn_denied: int = 0
    spawn_fail_open: int = 0
    spawn_fail_closed: int = 0
    usage_events_applied: int = 0
    usage_feed_gaps: int = 0
    usage_catchup_events: int = 0
    commands_sent: int = 0
    events_sent: int = 0
    decisions_stored: int = 0
    decision_store_failures: int = 0

    def bump(self, name: str, n: int = 1) -> None:
        setattr(self, name, getattr(self, name) + n)
        if n:
            _PROMETHEUS[name].inc(n)


_PROMETHEUS = {
    "spawn_allowed": metrics.SPAWN_CHECKS.labels("allowed"),
    "spawn_denied": metrics.SPAWN_CHECKS.labels("denied"),
    "spawn_fail_open": metrics.FAIL_OPEN.labels("open"),
    "spawn_fail_closed": metrics.FAIL_OPEN.labels("closed"),
    "usage_events_applied": metrics.USAGE_EVENTS,
    "usage_feed_gaps": metrics.FEED_GAPS,
    "usage_catchup_events": metrics.CATCHUP_EVENTS,
    "commands_sent": metrics.SENT.labels("command"),
    "events_sent": metrics.SENT.labels("event"),
    "decisions_stored": metrics.DECISIONS_STORED,
    "decision_store_failures": metrics.STORE_FAILURES,
}


@dataclass
class LiveState:
    """Shared by the feed, workload and spawn-check handlers and the enforcer."""

    config: ConfigSource
    clock: Clock = utc_now
    max_skew: timedelta = DEFAULT_MAX_CLOCK_SKEW
    usage: UsageState | None = None  # None until the first snapshot has loaded
    book: WorkloadBook = field(default_factory=WorkloadBook)
    holds: ReservationBook = field(default_factory=ReservationBook)
    grants: GrantBook = field(default_factory=GrantBook)
    marks: dict[str, dict[MarkKey, Mark]] = field(default_factory=dict)
    sent: set[str] = field(default_factory=set)
    dirty: set[str] = field(default_factory=set)
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    stats: PolicyStats = field(default_factory=PolicyStats)
    fresh_at: datetime | None = None
    head_seen: int = 0
    resumed: list[Workload] = field(default_factory=list)  # to record as running again
    attempts: dict[str, Attempt] = field(default_factory=dict)  # latest command per crossing
    notices: dict[str, Notice] = field(default_factory=dict)  # pending, by crossing

    @property
    def ready(self) -> bool:
        return self.usage is not None

    def view(self, now: datetime | None = None, config: PolicyConfig | None = None) -> View:
        """What one decision reads: one config version, the state, one instant."""
        assert self.usage is not None, "usage state not loaded yet"
        return View(
            config or self.config.current(), self.usage, self.book, self.holds,
            now or self.clock(), max_skew=self.max_skew, grants=self.grants,
        )  # fmt: skip

    def staleness(self, now: datetime) -> timedelta | None:
        """How long since the state was last known to hold everything the ledger had."""
        return None if self.fresh_at is None else max(now - self.fresh_at, timedelta(0))

    def is_stale(self, now: datetime) -> bool:
        age = self.staleness(now)
        return age is None or age > self.config.current().max_staleness

    def confirm_head(self, head: int, now: datetime) -> None:
        """The ledger's head is `head`: if we hold all of it, the state is fresh as of now."""
        self.head_seen = max(self.head_seen, head)
        if self.usage is not None and self.usage.last_seq >= head:
            self.fresh_at = now
        metrics.LAG.set(self.lag())
        age = self.staleness(now)
        if age is not None:
            metrics.STALENESS.set(age.total_seconds())

    def touch(self, subject: str) -> None:
        self.dirty.add(subject)
        self.wake.set()

    def apply(self, events: Iterable[UsageEvent]) -> Applied:
        """Fold events in order; stop at the first gap (and report it)."""
        assert self.usage is not None
        usage, holds, dirty, stopped = self.usage, self.holds, self.dirty, self.book.stopped
        applied = 0
        outcome = Applied.APPLIED
        for e in events:
            done = usage.apply(e)
            if done is Applied.GAP:
                self.stats.bump("usage_feed_gaps")
                outcome = Applied.GAP
                break
            if done is Applied.APPLIED:
                applied += 1
                holds.consume(e.subject, e.workload, e.metric, e.delta)
                dirty.add(e.subject)
                if e.workload in stopped and e.delta > 0:
                    self._maybe_resumed(e)
        self.stats.bump("usage_events_applied", applied)
        if self.dirty:
            self.wake.set()
        return outcome

    async def apply_in_slices(self, events: Iterable[UsageEvent], budget: float = SLICE) -> Applied:
        """`apply`, handing the event loop back every `budget` seconds of folding.

        A spawn check that arrives meanwhile is answered between two slices, from the state
        as of the last event folded (a prefix of the batch, so still one ledger seq). Other
        tasks may fold too in between: events are folded by seq, so whatever they fold
        first is a duplicate here, and a gap stops the batch as in `apply`.
        """
        it = iter(events)
        turns = Turns(budget)
        while chunk := list(islice(it, FOLD_CHUNK)):
            if self.apply(chunk) is Applied.GAP:
                return Applied.GAP
            await turns.take()
        return Applied.APPLIED

    def _maybe_resumed(self, e: UsageEvent) -> None:
        """Usage sampled after a workload's stop (plus `reissue.settle`, so its final
        sample does not count) means it runs again."""
        stopped = self.book.stopped[e.workload]
        if e.at <= stopped + self.config.current().reissue.settle:
            return
        w = self.book.resume(e.workload, e.subject, e.host, e.at)
        if w is not None:
            self.resumed.append(w)
            log.warning(
                "workload %s of %s on host %s reported usage sampled at %s, after it stopped "
                "at %s: running again (it was restarted or never stopped)",
                w.workload, w.subject, w.host, e.at.isoformat(), stopped.isoformat(),
            )  # fmt: skip

    def replace_usage(self, usage: UsageState, now: datetime) -> None:
        """Take a fresh snapshot (start, or a resync after a config needs more history)."""
        self.usage = usage
        self.head_seen = max(self.head_seen, usage.last_seq)
        self.fresh_at = now
        self.dirty |= usage.known_subjects() | self.book.subjects() | set(self.marks)
        self.wake.set()

    def lag(self) -> int:
        return 0 if self.usage is None else max(self.head_seen - self.usage.last_seq, 0)
