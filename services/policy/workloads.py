"""Which workloads run where, and which groups integrators say a subject is in (pure).

Fed by `workload_started` / `workload_stopped` events. A workload whose meter never sent
`workload_started` (a raw-JSON integrator) still counts as running while its usage keeps
arriving, so terminations reach it too.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta

from .usage import UsageState

# A workload known only from its usage counts as running this long after its last sample.
LIVE_WITHOUT_START = timedelta(minutes=10)


@dataclass(frozen=True)
class Workload:
    """A workload that is (as far as we know) running."""

    workload: str
    subject: str
    host: str
    started_at: datetime
    groups: tuple[str, ...] = ()
    announced: bool = True  # False: known only from its usage
    resumed_from: datetime | None = None  # the stop its usage outlived (see `resume`)


@dataclass
class WorkloadBook:
    """Running workloads, recently stopped ones, and integrator-reported groups."""

    running: dict[str, Workload] = field(default_factory=dict)
    stopped: dict[str, datetime] = field(default_factory=dict)
    groups: dict[str, tuple[str, ...]] = field(default_factory=dict)
    _by_subject: dict[str, set[str]] = field(default_factory=dict)

    def start(self, w: Workload) -> bool:
        """Record a start; False when the workload is already running, or stopped after
        this start (a start after the stop is the same name run again)."""
        stopped = self.stopped.get(w.workload)
        known = self.running.get(w.workload)
        if (known is not None and known.announced) or (
            stopped is not None and w.started_at <= stopped
        ):
            return False
        self.stopped.pop(w.workload, None)
        self.running[w.workload] = w
        self._by_subject.setdefault(w.subject, set()).add(w.workload)
        if w.groups:
            self.learn_groups(w.subject, w.groups)
        return True

    def stop(self, workload: str, at: datetime) -> Workload | None:
        self.stopped[workload] = at
        gone = self.running.pop(workload, None)
        if gone is not None:
            self._by_subject.get(gone.subject, set()).discard(workload)
        return gone

    def resume(self, workload: str, subject: str, host: str, at: datetime) -> Workload | None:
        """A stopped workload whose usage is sampled after its stop runs again (a host that
        restarted it without `workload_started`, or reported a stop it did not make)."""
        stopped = self.stopped.pop(workload, None)
        if stopped is None or workload in self.running:
            return None
        w = Workload(workload, subject, host, at, announced=False, resumed_from=stopped)
        self.running[workload] = w
        self._by_subject.setdefault(subject, set()).add(workload)
        return w

    def learn_groups(self, subject: str, groups: Iterable[str]) -> bool:
        """Integrators' latest word on a subject's groups; True when it changed."""
        new = tuple(sorted(set(groups)))
        if self.groups.get(subject) == new:
            return False
        self.groups[subject] = new
        return True

    def running_for(self, subject: str, usage: UsageState, now: datetime) -> list[Workload]:
        """The subject's workloads that terminations should reach."""
        names = self._by_subject.get(subject, set())
        found = {
            n: self.running[n]
            for n in names
            if n in self.running and (self.running[n].announced or _recent(usage, n, now))
        }
        for name in usage.workloads_of(subject):
            seen = usage.seen[name]
            if name in found or name in self.stopped or seen.last < now - LIVE_WITHOUT_START:
                continue
            found[name] = Workload(name, subject, seen.host, seen.first, announced=False)
        return sorted(found.values(), key=lambda w: w.workload)

    def started_at(self, workload: str, usage: UsageState) -> datetime | None:
        """When a workload started: announced, else its first usage seen."""
        w = self.running.get(workload)
        if w is not None:
            return w.started_at
        seen = usage.seen.get(workload)
        return None if seen is None else seen.first

    def subjects(self) -> set[str]:
        return {s for s, names in self._by_subject.items() if names}

    def forget_stopped_before(self, cutoff: datetime) -> None:
        for name in [n for n, t in self.stopped.items() if t < cutoff]:
            del self.stopped[name]


def _recent(usage: UsageState, workload: str, now: datetime) -> bool:
    """A workload known only from its usage runs while that usage keeps coming."""
    seen = usage.seen.get(workload)
    return seen is not None and seen.last >= now - LIVE_WITHOUT_START
