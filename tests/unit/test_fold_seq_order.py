"""A batch's seqs are grouped by subject, and planning it ahead changes nothing it writes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from services.ledger import store
from services.ledger.domain import GENESIS_HASH, Reading, SeriesKey, SeriesState, batch_hash
from services.ledger.ingest import SeriesCache

T0 = datetime(2026, 11, 22, 10, tzinfo=UTC)
HEAD = store.Head(0, 0, GENESIS_HASH, 1)


@st.composite
def deliveries(draw: st.DrawFn) -> list[Reading]:
    """Sample messages of a few hosts, in any order, each reading several series."""
    out = []
    for n in range(draw(st.integers(1, 12))):
        host = draw(st.sampled_from(["h1", "h2", "h3"]))
        seq = draw(st.integers(1, 6))
        for subject in draw(st.lists(st.sampled_from("abcd"), min_size=1, max_size=4, unique=True)):
            for metric in draw(
                st.sets(st.sampled_from(["cpu.used.seconds", "log.bytes"]), min_size=1)
            ):
                key = SeriesKey(host, "e", subject, "w", metric)
                out.append(Reading(key, seq, Decimal(seq * 10 + n), T0 + timedelta(seconds=seq)))
    return out


@given(deliveries())
def test_each_subjects_events_of_a_batch_form_one_contiguous_seq_range(
    items: list[Reading],
) -> None:
    p = store.plan(items, {}, HEAD, 1)
    subjects = [u.key.subject for u in p.usage]
    for subject in set(subjects):
        at = [i for i, s in enumerate(subjects) if s == subject]
        assert at == list(range(at[0], at[-1] + 1))


@given(deliveries())
def test_a_series_keeps_the_order_of_its_readings_within_a_batch(items: list[Reading]) -> None:
    p = store.plan(items, {}, HEAD, 1)
    for key in {u.key for u in p.usage}:
        mine = [u.sample_seq for u in p.usage if u.key == key]
        assert mine == sorted(mine)  # only newer samples count, so in reading order


@given(deliveries())
def test_the_hash_covers_the_events_in_the_seq_order_they_are_written(items: list[Reading]) -> None:
    p = store.plan(items, {}, HEAD, 1)
    events = [u.chained(seq) for seq, u in enumerate(p.usage, p.first_seq)]
    assert p.digest == (batch_hash(GENESIS_HASH, 1, events) if events else "")


def test_the_series_cache_stays_within_its_bound() -> None:
    cache = SeriesCache(limit=100)
    for round_ in range(5):
        keys = [
            SeriesKey("h", "e", f"s{i}", "w", "log.bytes")
            for i in range(60 * round_, 60 * (round_ + 1))
        ]
        items = [Reading(k, round_ + 1, Decimal(round_ + 1), T0) for k in keys]
        p = store.plan(items, {}, cache.head or HEAD, 1)
        cache.committed(store.Committed(p, p.after(round_ + 2), True))
        assert len(cache.states) <= 100
    assert cache.head == p.after(6)


def test_a_replanned_commit_keeps_only_the_states_read_under_the_lock() -> None:
    cache = SeriesCache()
    stale = SeriesKey("h", "e", "old", "w", "log.bytes")
    cache.states[stale] = SeriesState(Decimal(1), 1, T0)
    cache.head = HEAD
    key = SeriesKey("h", "e", "s", "w", "log.bytes")
    p = store.plan([Reading(key, 2, Decimal(5), T0)], {}, HEAD._replace(version=7), 1)
    cache.committed(store.Committed(p, p.after(8), False))
    assert set(cache.states) == {key}
