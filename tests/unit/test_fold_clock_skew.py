"""The fold with host clocks that lie: usage counted in full, placed near its arrival."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from contracts.durations import DEFAULT_MAX_CLOCK_SKEW
from services.ledger.domain import (
    Reading,
    SeriesKey,
    SeriesState,
    UsageDelta,
    arrival,
    fold,
)

SKEW = DEFAULT_MAX_CLOCK_SKEW
T0 = datetime(2026, 12, 2, 12, tzinfo=UTC)
KEY = SeriesKey("h1", "e1", "erin", "w1", "mem.alloc.byte_seconds")
EPOCH_1970 = datetime(1970, 1, 1, tzinfo=UTC)
YEAR_2099 = datetime(2099, 1, 1, tzinfo=UTC)

# How far a host's clock is off, from wildly behind to wildly ahead, with the edges dense.
offsets = st.one_of(
    st.just(EPOCH_1970 - T0),
    st.just(YEAR_2099 - T0),
    st.sampled_from([SKEW, -SKEW, SKEW + timedelta(microseconds=1), -SKEW - timedelta(seconds=1)]),
    st.timedeltas(min_value=-2 * SKEW, max_value=2 * SKEW),
    st.timedeltas(min_value=timedelta(days=-20000), max_value=timedelta(days=20000)),
)


@st.composite
def deliveries(draw: st.DrawFn) -> list[Reading]:
    """One series as the ledger receives it: received times never go back (JetStream stores
    in order), values are cumulative, seqs mostly grow but some arrive late or twice."""
    n = draw(st.integers(1, 25))
    received = T0
    value = Decimal(0)
    out: list[Reading] = []
    for seq in range(1, n + 1):
        received += draw(st.timedeltas(min_value=timedelta(0), max_value=timedelta(hours=2)))
        value += draw(st.decimals(min_value=0, max_value=10**9, places=6, allow_nan=False))
        # The host's clock: right, off by a little, or off by years; it may change between
        # samples (fixed by NTP, a VM resumed, a spool flushed long after it was written).
        sampled = received + draw(offsets)
        out.append(Reading(KEY, seq, value, sampled, arrival=arrival(sampled, received, SKEW)))
    # Redeliveries and late arrivals: an old reading again (same arrival: the stored time).
    for _ in range(draw(st.integers(0, 5))):
        out.insert(draw(st.integers(0, len(out))), draw(st.sampled_from(out)))
    return out


def _fold_each(items: list[Reading]) -> tuple[list[UsageDelta], list[Reading]]:
    """Fold one reading per transaction, as the ledger may; keep which reading made each event."""
    states: dict[SeriesKey, SeriesState] = {}
    events: list[UsageDelta] = []
    makers: list[Reading] = []
    for r in items:
        usage, changed = fold(states, [r])
        states.update(changed)
        events.extend(usage)
        makers.extend([r] * len(usage))
    return events, makers


@settings(max_examples=400, deadline=None)
@given(deliveries())
def test_clamping_never_changes_how_much_is_counted(items: list[Reading]) -> None:
    trusted = [r._replace(arrival=None) for r in items]
    clamped_usage, _ = fold({}, items)
    trusted_usage, _ = fold({}, trusted)
    assert sum(u.delta for u in clamped_usage) == sum(u.delta for u in trusted_usage)
    assert sum(u.delta for u in clamped_usage) == max(r.value for r in items)


@settings(max_examples=400, deadline=None)
@given(deliveries())
def test_usage_is_placed_within_the_window_around_its_arrival(items: list[Reading]) -> None:
    events, makers = _fold_each(items)
    for u, r in zip(events, makers, strict=True):
        assert r.arrival is not None
        received = r.arrival.received_at
        assert received - SKEW <= u.window_end <= received + SKEW
        assert u.received_at == received and u.sampled_at == r.sampled_at


@settings(max_examples=400, deadline=None)
@given(deliveries())
def test_windows_never_have_negative_length_and_never_go_back(items: list[Reading]) -> None:
    events, _ = _fold_each(items)
    ends = [u.window_end for u in events]
    assert ends == sorted(ends)
    for before, u in zip([None, *events], events, strict=False):
        if u.window_start is not None:
            assert u.window_start <= u.window_end
            if before is not None:
                # Contiguous: a window starts where the series was last placed, which is at
                # or after the previous event's end.
                assert before.window_end <= u.window_start


@settings(max_examples=400, deadline=None)
@given(deliveries())
def test_exactly_the_samples_beyond_the_tolerance_are_flagged_with_their_skew(
    items: list[Reading],
) -> None:
    events, makers = _fold_each(items)
    for u, r in zip(events, makers, strict=True):
        assert r.arrival is not None
        off = r.sampled_at - r.arrival.received_at
        if abs(off) > SKEW:
            assert u.clock_skew is not None
            assert (
                u.clock_skew
                == Decimal(off.days * 86400 + off.seconds) + Decimal(off.microseconds) / 10**6
            )
        else:
            assert u.clock_skew is None


def test_a_sample_from_1970_is_placed_at_the_earliest_edge_and_flagged() -> None:
    a = arrival(EPOCH_1970, T0, SKEW)
    assert a.placed_at == T0 - SKEW
    assert a.skew_seconds == Decimal(-int((T0 - EPOCH_1970).total_seconds()))


def test_a_sample_from_2099_is_placed_at_the_latest_edge_and_flagged() -> None:
    a = arrival(YEAR_2099, T0, SKEW)
    assert a.placed_at == T0 + SKEW
    assert a.skew_seconds == Decimal(int((YEAR_2099 - T0).total_seconds()))


def test_a_clock_off_by_exactly_the_tolerance_is_trusted() -> None:
    for off in (SKEW, -SKEW, timedelta(0), timedelta(seconds=-3)):
        a = arrival(T0 + off, T0, SKEW)
        assert (a.placed_at, a.skew_seconds) == (T0 + off, None)
    just_over = arrival(T0 + SKEW + timedelta(microseconds=1), T0, SKEW)
    assert (just_over.placed_at, just_over.skew_seconds) == (T0 + SKEW, Decimal("300.000001"))


def test_a_sample_clamped_forward_then_a_correct_one_keeps_the_window_from_going_back() -> None:
    first = Reading(KEY, 1, Decimal(10), YEAR_2099, arrival=arrival(YEAR_2099, T0, SKEW))
    at = T0 + timedelta(seconds=30)  # the clock was fixed; now right, but before T0 + SKEW
    second = Reading(KEY, 2, Decimal(25), at, arrival=arrival(at, at, SKEW))
    usage, changed = fold({}, [first, second])
    assert [u.delta for u in usage] == [Decimal(10), Decimal(15)]
    assert usage[0].window_end == T0 + SKEW
    assert usage[1].window_start == usage[1].window_end == T0 + SKEW  # zero length, not negative
    assert usage[1].clock_skew is None
    assert changed[KEY].last_sampled_at == T0 + SKEW


def test_a_spooled_backlog_is_counted_late_never_lost() -> None:
    """A host offline for an hour publishes its spool later: each sample lands at the
    earliest edge of its arrival window, in order, and the totals are the host's."""
    offline_from = T0 - timedelta(hours=1)
    spool = [offline_from + timedelta(minutes=10 * i) for i in range(6)]
    items = [
        Reading(KEY, i + 1, Decimal(100 * (i + 1)), t, arrival=arrival(t, T0, SKEW))
        for i, t in enumerate(spool)
    ]
    usage, _ = fold({}, items)
    assert sum(u.delta for u in usage) == Decimal(600)
    # The last spooled sample (10 minutes old) is still older than the tolerance.
    assert {u.window_end for u in usage} == {T0 - SKEW}
    assert all(u.clock_skew is not None for u in usage)
