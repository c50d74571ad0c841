"""The meter's counter book, pure: raw readings in, cumulative batches out, across epochs.

A series (subject, workload, metric) is the sum of one or more *components*: raw cumulative
counters the meter reads, such as the `tollgate lan` bytes of one iptables chain in one
address family, or a cgroup's CPU seconds. Within an epoch a series reports
`sum(raw - baseline)` and never decreases.

When a component restarts from zero (its chain was recreated) the epoch changes (SPEC 2.1):
the old epoch gets a closing batch with every other component's current value and the
restarted ones at their last reading, then every component that did not restart takes its
current value as baseline, so the new epoch counts from zero without counting anything twice.
What the restarted component counted between its last reading and its restart is the only
thing lost, unless its old counter could still be read as it was replaced (an eBPF map whose
pin was removed while the meter held it): then the epoch closes at that last value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal
from typing import Any

from contracts.samples import CounterBatch, CounterSample

from .domain import exact, new_epoch

ZERO = Decimal(0)


@dataclass(frozen=True, order=True)
class SeriesId:
    """Identity of one reported counter (the host and epoch are the book's)."""

    subject: str
    workload: str
    metric: str


@dataclass(frozen=True)
class Observation:
    """Raw cumulative components of every series, read at one instant."""

    parts: Mapping[SeriesId, Mapping[str, Decimal]]
    labels: Mapping[SeriesId, Mapping[str, str]] = field(default_factory=dict)

    def components(self) -> dict[str, Decimal]:
        return {c: v for parts in self.parts.values() for c, v in parts.items()}

    def only(self, workload: str) -> Observation:
        """The series of one workload."""
        keep = {s: p for s, p in self.parts.items() if s.workload == workload}
        return Observation(keep, {s: lb for s, lb in self.labels.items() if s in keep})

    def without(self, workloads: set[str]) -> Observation:
        keep = {s: p for s, p in self.parts.items() if s.workload not in workloads}
        return Observation(keep, {s: lb for s, lb in self.labels.items() if s in keep})


@dataclass
class CounterBook:
    """Epoch, seq, baselines and high-water marks of one publisher (a host or one run)."""

    host: str
    epoch: str = field(default_factory=new_epoch)
    seq: int = 0
    baselines: dict[str, Decimal] = field(default_factory=dict)
    last_raw: dict[str, Decimal] = field(default_factory=dict)
    highs: dict[SeriesId, Decimal] = field(default_factory=dict)

    def values(self, obs: Observation) -> dict[SeriesId, Decimal]:
        """What each series reports now: cumulative in this epoch, never lower than before."""
        out: dict[SeriesId, Decimal] = {}
        for series, parts in obs.parts.items():
            total = ZERO
            for component, raw in parts.items():
                total += max(raw - self.baselines.get(component, ZERO), ZERO)
                self.last_raw[component] = raw
            value = max(exact(total), self.highs.get(series, ZERO))
            self.highs[series] = value
            out[series] = value
        return out

    def batch(self, obs: Observation, sampled_at: datetime, final: bool = False) -> CounterBatch:
        """The next batch of this epoch, carrying `obs`."""
        values = self.values(obs)
        self.seq += 1
        return CounterBatch(
            host=self.host,
            epoch=self.epoch,
            seq=self.seq,
            sampled_at=sampled_at,
            final=final,
            counters=[
                CounterSample(
                    subject=s.subject,
                    workload=s.workload,
                    metric=s.metric,
                    value=v,
                    labels=dict(obs.labels.get(s, {})),
                )
                for s, v in sorted(values.items())
            ],
        )

    def final_batch(self, workload: str, obs: Observation, sampled_at: datetime) -> CounterBatch:
        """The last batch of `workload`: every series it ever reported, even those unread now."""
        parts = {s: dict(p) for s, p in obs.parts.items() if s.workload == workload}
        for series in self.highs:
            if series.workload == workload:
                parts.setdefault(series, {})
        return self.batch(Observation(parts, obs.labels), sampled_at, final=True)

    def roll(
        self,
        obs: Observation,
        restarted: set[str],
        sampled_at: datetime,
        epoch: str,
        last: Mapping[str, Decimal] | None = None,
    ) -> CounterBatch | None:
        """Close this epoch and open `epoch`, because `restarted` components began again.

        A restarted component closes at `last[c]` when its old counter could still be read
        as it was replaced, else at its last reading. Returns the closing batch of the old
        epoch; None, and no new epoch, when this one has published nothing yet.
        """
        if self.seq == 0:
            # Nothing of this epoch was published: nothing to close, nothing counted twice.
            for c in restarted:
                self.baselines.pop(c, None)
            return None
        final = {**self.last_raw, **(last or {})}
        before = Observation(
            {
                s: {
                    c: (final.get(c, ZERO) if c in restarted else v)
                    for c, v in parts.items()
                    if c not in restarted or c in final
                }
                for s, parts in obs.parts.items()
            },
            obs.labels,
        )
        closing = self.batch(before, sampled_at)
        self.baselines = {c: v for c, v in obs.components().items() if c not in restarted}
        self.epoch, self.seq, self.last_raw, self.highs = epoch, 0, {}, {}
        return closing

    def adopt(self, obs: Observation, components: set[str]) -> None:
        """Count `components` from their current value on: their past may be counted already.

        For counters found running with no history we know of (the meter's state was lost):
        what they counted before is either in an old epoch or unknowable; never twice.
        """
        for c, raw in obs.components().items():
            if c in components:
                self.baselines[c] = raw

    def forget(self, workload: str) -> None:
        """Drop a finished workload's series and components."""
        gone = {s for s in self.highs if s.workload == workload}
        for s in gone:
            del self.highs[s]
        prefix = f"{workload}\x1f"
        for table in (self.baselines, self.last_raw):
            for c in [c for c in table if c.startswith(prefix)]:
                del table[c]

    def to_json(self) -> dict[str, Any]:
        return {
            "host": self.host,
            "epoch": self.epoch,
            "seq": self.seq,
            "baselines": {c: str(v) for c, v in self.baselines.items()},
            "last_raw": {c: str(v) for c, v in self.last_raw.items()},
            "highs": [[s.subject, s.workload, s.metric, str(v)] for s, v in self.highs.items()],
        }

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> CounterBook:
        return cls(
            host=str(data["host"]),
            epoch=str(data["epoch"]),
            seq=int(data["seq"]),
            baselines={str(c): Decimal(v) for c, v in data["baselines"].items()},
            last_raw={str(c): Decimal(v) for c, v in data["last_raw"].items()},
            highs={SeriesId(s, w, m): Decimal(v) for s, w, m, v in data["highs"]},
        )


def component(workload: str, *parts: str) -> str:
    """A component id owned by `workload`, so `forget` finds it."""
    return "\x1f".join((workload, *parts))
