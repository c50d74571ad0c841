"""The ledger's fast batch hash is the auditors' batch hash over the same events."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from services.ledger.domain import GENESIS_HASH, SeriesKey, UsageDelta, batch_hash
from services.ledger.domain import usage_batch_hash as fast_hash

T0 = datetime(2026, 11, 22, tzinfo=UTC)
names = st.text(alphabet="abcxyz-_%2E", min_size=1, max_size=6)
deltas = st.builds(
    lambda host, subject, metric, delta, start, length, reset, arrived: UsageDelta(
        SeriesKey(host, "e1", subject, f"{subject}-w", metric),
        delta,
        None if start is None else T0 + timedelta(microseconds=start),
        T0 + timedelta(microseconds=(start or 0) + length),
        1,
        1,
        reset,
        {},
        *arrived,
    ),
    names,
    names,
    st.sampled_from(["log.bytes", "cpu.used.seconds", "my.metric"]),
    st.decimals(min_value=0, max_value=10**12, places=6, allow_nan=False),
    st.none() | st.integers(0, 10**11),
    st.integers(0, 10**10),
    st.booleans(),
    # Events before migration 0004 know nothing of their arrival; later ones do.
    st.just(())
    | st.tuples(
        st.just(T0),
        st.datetimes(timezones=st.just(UTC)),
        st.none() | st.decimals(min_value=-(10**11), max_value=10**11, places=6),
    ),
)


@given(st.lists(deltas, max_size=30), st.integers(1, 10**9), st.integers(1, 10**6))
def test_fast_batch_hash_equals_the_hash_of_the_chained_events(
    usage: list[UsageDelta], first_seq: int, batch_id: int
) -> None:
    chained = [u.chained(first_seq + i) for i, u in enumerate(usage)]
    assert fast_hash(GENESIS_HASH, batch_id, first_seq, usage) == batch_hash(
        GENESIS_HASH, batch_id, chained
    )


def test_the_hash_covers_every_field() -> None:
    base = UsageDelta(
        SeriesKey("h", "e", "s", "w", "log.bytes"), Decimal(5), None, T0, 1, 1, False, {}
    )
    digest = fast_hash(GENESIS_HASH, 1, 1, [base])
    for changed in (
        base._replace(delta=Decimal(6)),
        base._replace(reset=True),
        base._replace(window_start=T0),
        base._replace(key=base.key._replace(subject="t")),
    ):
        assert fast_hash(GENESIS_HASH, 1, 1, [changed]) != digest
    assert fast_hash(GENESIS_HASH, 1, 2, [base]) != digest


def test_the_hash_covers_when_a_sample_arrived_and_its_skew_flag() -> None:
    arrived = UsageDelta(
        SeriesKey("h", "e", "s", "w", "log.bytes"), Decimal(5), None, T0, 1, 1, False, {},
        T0, datetime(2099, 1, 1, tzinfo=UTC), Decimal("2295000000"),
    )  # fmt: skip
    digest = fast_hash(GENESIS_HASH, 1, 1, [arrived])
    for changed in (
        arrived._replace(clock_skew=None),  # the flag removed
        arrived._replace(clock_skew=Decimal(1)),
        arrived._replace(sampled_at=T0),
        arrived._replace(received_at=T0 + timedelta(seconds=1)),
        arrived._replace(received_at=None, sampled_at=None, clock_skew=None),
    ):
        assert fast_hash(GENESIS_HASH, 1, 1, [changed]) != digest


def test_events_from_before_the_clock_skew_columns_hash_exactly_as_they_always_did() -> None:
    # Pinned from the hash before migration 0004: existing chains keep verifying.
    old = UsageDelta(
        SeriesKey("h", "e", "s", "w", "log.bytes"), Decimal(5), None, T0, 1, 1, False, {}
    )
    assert fast_hash(GENESIS_HASH, 1, 1, [old]) == (
        "1a94b6bf3bba3d9dc54e2f35d6b0de5a177f534dfb75f8df916ee8a9dee428ca"
    )
