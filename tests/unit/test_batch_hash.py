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
    lambda host, subject, metric, delta, start, length, reset: UsageDelta(
        SeriesKey(host, "e1", subject, f"{subject}-w", metric),
        delta,
        None if start is None else T0 + timedelta(microseconds=start),
        T0 + timedelta(microseconds=(start or 0) + length),
        1,
        1,
        reset,
        {},
    ),
    names,
    names,
    st.sampled_from(["log.bytes", "cpu.used.seconds", "my.metric"]),
    st.decimals(min_value=0, max_value=10**12, places=6, allow_nan=False),
    st.none() | st.integers(0, 10**11),
    st.integers(0, 10**10),
    st.booleans(),
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
