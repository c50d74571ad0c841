"""The ledger's fold, pure: cumulative counter samples in, exact usage deltas out (SPEC 2.2).

Per series (host, epoch, subject, workload, metric) the ledger keeps the high-water value
and the newest sample seq it folded. A sample adds `value - high`; a sample whose seq is
not newer adds zero (duplicate, redelivery, stale or reordered); a newer sample whose value
dropped is a reset and counts from zero. A new epoch is a new series, so it counts from
zero too. Every number is a Decimal: the ledger does no binary floating point.

A host's clock is trusted only within `max_skew` of when JetStream stored its batch
(`received_at`): usage is placed at `sampled_at` clamped into
[received_at - max_skew, received_at + max_skew], and a series' windows never run backwards,
so however wrong a clock is, every unit of usage lands in the window around its arrival.
"""

from __future__ import annotations

import functools
import hashlib
from collections.abc import Iterable, Mapping
from datetime import UTC, datetime, timedelta
from decimal import Context, Decimal
from types import MappingProxyType
from typing import NamedTuple

from contracts.samples import CounterBatch, FastCounterBatch

GENESIS_HASH = "0" * 64
# Builds a NamedTuple from its fields without the generated __new__: half the cost, and
# the ledger builds several per reading.
_new = tuple.__new__
_MICRO = Decimal("0.000001")
# Amounts have up to 32 integer digits (NUMERIC(38, 6)): more than the default context's 28.
_WIDE = Context(prec=80)


# The records below are NamedTuples, not frozen dataclasses: equally immutable, but built,
# hashed and compared in C, which matters at tens of thousands of readings per second.


class SeriesKey(NamedTuple):
    """Identity of one cumulative counter."""

    host: str
    epoch: str
    subject: str
    workload: str
    metric: str


class SeriesState(NamedTuple):
    """What the ledger remembers of a series between samples."""

    high: Decimal
    last_seq: int
    last_sampled_at: datetime
    final: bool = False


NO_LABELS: Mapping[str, str] = MappingProxyType({})


class Arrival(NamedTuple):
    """When JetStream stored a batch, and where the ledger may place its usage."""

    received_at: datetime
    placed_at: datetime  # sampled_at clamped into [received_at -/+ max_skew]
    latest: datetime  # received_at + max_skew: nothing of this batch is placed later
    skew_seconds: Decimal | None  # sampled_at - received_at, only when beyond max_skew


def arrival(sampled_at: datetime, received_at: datetime, max_skew: timedelta) -> Arrival:
    """Clamp a batch's sampled_at to the window around its arrival."""
    earliest, latest = received_at - max_skew, received_at + max_skew
    if earliest <= sampled_at <= latest:
        return Arrival(received_at, sampled_at, latest, None)
    placed = earliest if sampled_at < earliest else latest
    return Arrival(received_at, placed, latest, seconds_between(received_at, sampled_at))


def seconds_between(a: datetime, b: datetime) -> Decimal:
    """b - a in exact seconds (microseconds)."""
    d = b - a
    return (Decimal(d.days * 86400 + d.seconds) + Decimal(d.microseconds) / 1_000_000).quantize(
        _MICRO
    )


class Reading(NamedTuple):
    """One counter value of one batch, flattened."""

    key: SeriesKey
    seq: int
    value: Decimal
    sampled_at: datetime  # as the host reported it
    final: bool = False
    labels: Mapping[str, str] = NO_LABELS
    stream_seq: int = 0
    arrival: Arrival | None = None  # None: the host's clock is taken as it is (tests, tools)


class UsageDelta(NamedTuple):
    """Usage a reading implies: what gets appended to the ledger."""

    key: SeriesKey
    delta: Decimal
    window_start: datetime | None
    window_end: datetime
    sample_seq: int
    stream_seq: int
    reset: bool
    labels: Mapping[str, str]
    received_at: datetime | None = None
    sampled_at: datetime | None = None  # as the host reported it
    clock_skew: Decimal | None = None  # seconds sampled_at - received_at, beyond max_skew

    def chained(self, seq: int) -> ChainedEvent:
        """The event this delta becomes at ledger sequence `seq`, as the hash sees it."""
        k = self.key
        return ChainedEvent(
            seq, k.host, k.epoch, k.subject, k.workload, k.metric,
            self.delta, self.window_start, self.window_end, self.reset,
            self.received_at, self.sampled_at, self.clock_skew,
        )  # fmt: skip


class Outcome(NamedTuple):
    """What folding one reading decided."""

    state: SeriesState
    usage: UsageDelta | None
    changed: bool


def readings(
    batch: CounterBatch | FastCounterBatch, stream_seq: int = 0, arrived: Arrival | None = None
) -> list[Reading]:
    """Flatten a batch into one reading per series."""
    host, epoch, seq, at, final = batch.host, batch.epoch, batch.seq, batch.sampled_at, batch.final
    out = []
    for c in batch.counters:
        labels = MappingProxyType(dict(c.labels)) if c.labels else NO_LABELS
        key = _new(SeriesKey, (host, epoch, c.subject, c.workload, c.metric))
        out.append(_new(Reading, (key, seq, c.value, at, final, labels, stream_seq, arrived)))
    return out


def decide(state: SeriesState | None, reading: Reading) -> Outcome:
    """Fold one reading into its series state."""
    step = _advance(state, reading)
    if step is None:
        assert state is not None
        return Outcome(state, None, False)
    return Outcome(step[0], step[1], True)


def _advance(
    state: SeriesState | None, reading: Reading
) -> tuple[SeriesState, UsageDelta | None] | None:
    """The new state and the usage of one reading; None when it changes nothing."""
    if state is not None and reading.seq <= state.last_seq:
        # Duplicate, redelivery, stale or reordered: already counted, or older than what
        # has been counted. Never taken for a reset.
        return None
    value = reading.value
    arrived = reading.arrival
    at = reading.sampled_at if arrived is None else arrived.placed_at
    start = None
    if state is not None:
        start = state.last_sampled_at
        if at < start:
            # A window never runs backwards (say a clock clamped forward, then corrected):
            # the reading is placed where the last one was, unless that lies beyond this
            # batch's window (only if JetStream's own clock stepped back): then at its edge.
            at = start if arrived is None or start <= arrived.latest else arrived.latest
            start = at
    new_state = _new(SeriesState, (value, reading.seq, at, reading.final))
    if state is None:
        delta, reset = value, False
    elif value >= state.high:
        delta, reset = value - state.high, False
    else:
        # The counter went backwards inside one epoch: it restarted from zero. What it
        # counted between the last reading and the restart is unknowable; from zero is exact.
        delta, reset = value, True
    if delta > 0 or reset:
        if arrived is None:
            usage = _new(UsageDelta, (
                reading.key, delta, start, at, reading.seq, reading.stream_seq, reset,
                reading.labels, None, None, None,
            ))  # fmt: skip
        else:
            usage = _new(UsageDelta, (
                reading.key, delta, start, at, reading.seq, reading.stream_seq, reset,
                reading.labels, arrived.received_at, reading.sampled_at, arrived.skew_seconds,
            ))  # fmt: skip
        return new_state, usage
    return new_state, None


def fold(
    states: Mapping[SeriesKey, SeriesState], items: Iterable[Reading]
) -> tuple[list[UsageDelta], dict[SeriesKey, SeriesState]]:
    """Fold readings in order; return the usage they imply and the series states they changed."""
    current = dict(states)
    changed: dict[SeriesKey, SeriesState] = {}
    usage: list[UsageDelta] = []
    for reading in items:
        key = reading.key
        step = _advance(current.get(key), reading)
        if step is not None:
            current[key] = changed[key] = step[0]
            if step[1] is not None:
                usage.append(step[1])
    return usage, changed


def canonical_decimal(value: Decimal) -> str:
    """The one text of an amount that the hash chain uses (six fractional digits)."""
    return format(value.quantize(_MICRO, context=_WIDE), "f")


@functools.lru_cache(maxsize=8192)  # a batch's readings share a handful of instants
def canonical_time(value: datetime | None) -> str:
    """The one text of an instant that the hash chain uses (UTC, microseconds)."""
    if value is None:
        return "-"
    return value.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class ChainedEvent(NamedTuple):
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
    received_at: datetime | None = None
    sampled_at: datetime | None = None
    clock_skew: Decimal | None = None

    def canonical(self) -> str:
        return _canonical(
            self.seq, self.host, self.epoch, self.subject, self.workload, self.metric,
            self.delta, self.window_start, self.window_end, self.reset,
            self.received_at, self.sampled_at, self.clock_skew,
        )  # fmt: skip


def _canonical(
    seq: int, host: str, epoch: str, subject: str, workload: str, metric: str,
    delta: Decimal, window_start: datetime | None, window_end: datetime, reset: bool,
    received_at: datetime | None, sampled_at: datetime | None, clock_skew: Decimal | None,
) -> str:  # fmt: skip
    """The one text of an event that the hash chain covers.

    Events that know when they arrived (every event since migration 0004) also cover that,
    the time the host reported and the skew flag; older events hash as they always did.
    """
    text = "\x1f".join(
        (
            str(seq), host, epoch, subject, workload, metric, canonical_decimal(delta),
            canonical_time(window_start), canonical_time(window_end), "1" if reset else "0",
        )
    )  # fmt: skip
    if received_at is None:
        return text
    return text + _arrival_text(received_at, sampled_at, clock_skew)


@functools.lru_cache(maxsize=8192)  # one per batch: every reading of it shares its arrival
def _arrival_text(received_at: datetime, sampled_at: datetime | None, skew: Decimal | None) -> str:
    text = "-" if skew is None else canonical_decimal(skew)
    return f"\x1f{canonical_time(received_at)}\x1f{canonical_time(sampled_at)}\x1f{text}"


def batch_hash(prev_hash: str, batch_id: int, events: Iterable[ChainedEvent]) -> str:
    """sha256 over the previous batch's hash, this batch's id and its events in seq order."""
    h = hashlib.sha256()
    h.update(f"{prev_hash}\n{batch_id}\n".encode())
    for event in events:
        h.update(event.canonical().encode())
        h.update(b"\n")
    return h.hexdigest()


def usage_batch_hash(
    prev_hash: str, batch_id: int, first_seq: int, usage: Iterable[UsageDelta]
) -> str:
    """`batch_hash` of `usage` committed from ledger sequence `first_seq` on.

    The same digest as hashing each delta's `chained(seq)`, without building the events:
    the ledger hashes every batch it commits, so the texts of its amounts and instants are
    made once per batch and the whole text goes to sha256 in one piece.
    """
    amounts: dict[Decimal, str] = {}
    times: dict[datetime | None, str] = {None: "-"}
    lines = []
    for seq, u in enumerate(usage, first_seq):
        k = u.key
        delta = amounts.get(u.delta)
        if delta is None:
            delta = amounts[u.delta] = canonical_decimal(u.delta)
        start = times.get(u.window_start)
        if start is None:
            start = times[u.window_start] = canonical_time(u.window_start)
        end = times.get(u.window_end)
        if end is None:
            end = times[u.window_end] = canonical_time(u.window_end)
        text = (
            f"{seq}\x1f{k.host}\x1f{k.epoch}\x1f{k.subject}\x1f{k.workload}\x1f{k.metric}"
            f"\x1f{delta}\x1f{start}\x1f{end}\x1f{'1' if u.reset else '0'}"
        )
        if u.received_at is not None:
            text += _arrival_text(u.received_at, u.sampled_at, u.clock_skew)
        lines.append(text)
    lines.append("")  # every event's text ends with a newline
    h = hashlib.sha256(f"{prev_hash}\n{batch_id}\n".encode())
    h.update("\n".join(lines).encode())
    return h.hexdigest()
