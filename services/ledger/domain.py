"""The ledger's fold, pure: cumulative counter samples in, exact usage deltas out (SPEC 2.2).

Per series (host, epoch, subject, workload, metric) the ledger keeps the high-water value
and the newest sample seq it folded. A sample adds `value - high`; a sample whose seq is
not newer adds zero (duplicate, redelivery, stale or reordered); a newer sample whose value
dropped is a reset and counts from zero. A new epoch is a new series, so it counts from
zero too. Every number is a Decimal: the ledger does no binary floating point.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from decimal import Decimal

from contracts.samples import CounterBatch

GENESIS_HASH = "0" * 64
_MICRO = Decimal("0.000001")


@dataclass(frozen=True, order=True)
class SeriesKey:
    """Identity of one cumulative counter."""

    host: str
    epoch: str
    subject: str
    workload: str
    metric: str


@dataclass(frozen=True)
class SeriesState:
    """What the ledger remembers of a series between samples."""

    high: Decimal
    last_seq: int
    last_sampled_at: datetime
    final: bool = False


@dataclass(frozen=True)
class Reading:
    """One counter value of one batch, flattened."""

    key: SeriesKey
    seq: int
    value: Decimal
    sampled_at: datetime
    final: bool = False
    labels: Mapping[str, str] = field(default_factory=dict)
    stream_seq: int = 0


@dataclass(frozen=True)
class UsageDelta:
    """Usage a reading implies: what gets appended to the ledger."""

    key: SeriesKey
    delta: Decimal
    window_start: datetime | None
    window_end: datetime
    sample_seq: int
    stream_seq: int
    reset: bool
    labels: Mapping[str, str]

    def chained(self, seq: int) -> ChainedEvent:
        """The event this delta becomes at ledger sequence `seq`, as the hash sees it."""
        k = self.key
        return ChainedEvent(
            seq, k.host, k.epoch, k.subject, k.workload, k.metric,
            self.delta, self.window_start, self.window_end, self.reset,
        )  # fmt: skip


@dataclass(frozen=True)
class Outcome:
    """What folding one reading decided."""

    state: SeriesState
    usage: UsageDelta | None
    changed: bool


def readings(batch: CounterBatch, stream_seq: int = 0) -> list[Reading]:
    """Flatten a batch into one reading per series."""
    return [
        Reading(
            key=SeriesKey(batch.host, batch.epoch, c.subject, c.workload, c.metric),
            seq=batch.seq,
            value=c.value,
            sampled_at=batch.sampled_at,
            final=batch.final,
            labels=dict(c.labels),
            stream_seq=stream_seq,
        )
        for c in batch.counters
    ]


def decide(state: SeriesState | None, reading: Reading) -> Outcome:
    """Fold one reading into its series state."""
    if state is not None and reading.seq <= state.last_seq:
        # Duplicate, redelivery, stale or reordered: already counted, or older than what
        # has been counted. Never taken for a reset.
        return Outcome(state, None, changed=False)
    new_state = SeriesState(reading.value, reading.seq, reading.sampled_at, reading.final)
    if state is None:
        delta, reset, start = reading.value, False, None
    elif reading.value >= state.high:
        delta, reset, start = reading.value - state.high, False, state.last_sampled_at
    else:
        # The counter went backwards inside one epoch: it restarted from zero. What it
        # counted between the last reading and the restart is unknowable; from zero is exact.
        delta, reset, start = reading.value, True, state.last_sampled_at
    usage = None
    if delta > 0 or reset:
        usage = UsageDelta(
            key=reading.key,
            delta=delta,
            window_start=start,
            window_end=reading.sampled_at,
            sample_seq=reading.seq,
            stream_seq=reading.stream_seq,
            reset=reset,
            labels=reading.labels,
        )
    return Outcome(new_state, usage, changed=True)


def fold(
    states: Mapping[SeriesKey, SeriesState], items: Iterable[Reading]
) -> tuple[list[UsageDelta], dict[SeriesKey, SeriesState]]:
    """Fold readings in order; return the usage they imply and the series states they changed."""
    current = dict(states)
    changed: dict[SeriesKey, SeriesState] = {}
    usage: list[UsageDelta] = []
    for reading in items:
        outcome = decide(current.get(reading.key), reading)
        if outcome.changed:
            current[reading.key] = outcome.state
            changed[reading.key] = outcome.state
        if outcome.usage is not None:
            usage.append(outcome.usage)
    return usage, changed


def canonical_decimal(value: Decimal) -> str:
    """The one text of an amount that the hash chain uses (six fractional digits)."""
    return format(value.quantize(_MICRO), "f")


@functools.lru_cache(maxsize=8192)  # a batch's readings share a handful of instants
def canonical_time(value: datetime | None) -> str:
    """The one text of an instant that the hash chain uses (UTC, microseconds)."""
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass(frozen=True)
class ChainedEvent:
    """The fields of a committed usage event that the hash covers."""

    seq: int
    host: str
    epoch: str
    subject: str
    workload: str
    metric: str
    delta: Decimal
    window_start: datetime | None
    window_end: datetime
    reset: bool

    def canonical(self) -> str:
        return "\x1f".join(
            [
                str(self.seq),
                self.host,
                self.epoch,
                self.subject,
                self.workload,
                self.metric,
                canonical_decimal(self.delta),
                canonical_time(self.window_start),
                canonical_time(self.window_end),
                "1" if self.reset else "0",
            ]
        )


def batch_hash(prev_hash: str, batch_id: int, events: Iterable[ChainedEvent]) -> str:
    """sha256 over the previous batch's hash, this batch's id and its events in seq order."""
    h = hashlib.sha256()
    h.update(f"{prev_hash}\n{batch_id}\n".encode())
    for event in events:
        h.update(event.canonical().encode())
        h.update(b"\n")
    return h.hexdigest()
