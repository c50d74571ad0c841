"""The meter's counter book: components, baselines, epochs, and what the ledger makes of them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given, settings
from hypothesis import strategies as st

from services.ledger.domain import fold, readings
from services.meter.book import CounterBook, Observation, SeriesId, component

NOW = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
TX = SeriesId("alice", "job", "net.tx.lan.bytes")
CPU = SeriesId("alice", "job", "cpu.used.seconds")
V4, V6, CG = (
    component("job", "ipv4", "T-TX", "lan"),
    component("job", "ipv6", "T-TX", "lan"),
    component("job", "cpu"),
)


def obs(v4: int, v6: int, cpu: str = "0") -> Observation:
    return Observation({TX: {V4: Decimal(v4), V6: Decimal(v6)}, CPU: {CG: Decimal(cpu)}})


def values(batch: object) -> dict[str, Decimal]:
    return {c.metric: c.value for c in batch.counters}  # type: ignore[attr-defined]


def test_a_series_is_the_sum_of_its_components_and_never_goes_down() -> None:
    book = CounterBook("h")
    assert values(book.batch(obs(100, 20, "1.5"), NOW)) == {
        "net.tx.lan.bytes": Decimal(120), "cpu.used.seconds": Decimal("1.5"),
    }  # fmt: skip
    # A component read lower (a family missing this round) never makes the series drop.
    assert values(book.batch(obs(100, 0, "1.5"), NOW))["net.tx.lan.bytes"] == 120
    batch = book.batch(obs(150, 20, "2"), NOW)
    assert values(batch)["net.tx.lan.bytes"] == 170
    assert (batch.seq, batch.epoch) == (3, book.epoch)


def test_a_restarted_component_closes_the_epoch_and_the_new_one_counts_from_zero() -> None:
    book = CounterBook("h")
    book.batch(obs(100, 20, "1"), NOW)
    old = book.epoch
    # The IPv6 chain was recreated (20 -> 5); IPv4 and CPU went on counting.
    closing = book.roll(obs(130, 5, "1.25"), {V6}, NOW, epoch="e2")
    assert closing is not None
    assert (closing.epoch, closing.seq) == (old, 2)
    assert values(closing) == {
        "net.tx.lan.bytes": Decimal(150),
        "cpu.used.seconds": Decimal("1.25"),
    }
    first = book.batch(obs(130, 5, "1.25"), NOW)
    assert (first.epoch, first.seq) == ("e2", 1)
    assert values(first) == {"net.tx.lan.bytes": Decimal(5), "cpu.used.seconds": Decimal(0)}
    assert values(book.batch(obs(140, 9, "2"), NOW)) == {
        "net.tx.lan.bytes": Decimal(19), "cpu.used.seconds": Decimal("0.75"),
    }  # fmt: skip


def test_a_replaced_counter_read_one_last_time_closes_its_epoch_at_that_value() -> None:
    book = CounterBook("h")
    book.batch(obs(100, 20, "1"), NOW)
    # The old IPv6 counter went on to 26 after our last reading (20), and could still be
    # read as it was replaced; the new one has counted 5 since.
    closing = book.roll(obs(130, 5, "1.25"), {V6}, NOW, epoch="e2", last={V6: Decimal(26)})
    assert closing is not None
    assert values(closing)["net.tx.lan.bytes"] == 156
    assert values(book.batch(obs(140, 9, "2"), NOW))["net.tx.lan.bytes"] == 19
    # A last value of a component that did not restart changes nothing.
    again = CounterBook("h")
    again.batch(obs(100, 20, "1"), NOW)
    closing = again.roll(obs(130, 5, "1.25"), {V6}, NOW, epoch="e2", last={V4: Decimal(999)})
    assert closing is not None and values(closing)["net.tx.lan.bytes"] == 150


def test_a_restart_before_anything_was_published_needs_no_new_epoch() -> None:
    book = CounterBook("h")
    epoch = book.epoch
    assert book.roll(obs(5, 5), {V4}, NOW, epoch="e2") is None
    batch = book.batch(obs(7, 5), NOW)
    assert batch.epoch == epoch and values(batch)["net.tx.lan.bytes"] == 12


def test_adopted_components_count_only_from_now() -> None:
    book = CounterBook("h")
    book.adopt(obs(1000, 0, "30"), {V4, CG})
    assert values(book.batch(obs(1010, 3, "31"), NOW)) == {
        "net.tx.lan.bytes": Decimal(13), "cpu.used.seconds": Decimal(1),
    }  # fmt: skip


def test_a_final_batch_carries_every_series_of_the_workload_and_forget_drops_them() -> None:
    book = CounterBook("h")
    book.batch(obs(10, 0, "2"), NOW)
    final = book.final_batch("job", Observation({TX: {V4: Decimal(12)}}), NOW)
    assert final.final and values(final) == {
        "net.tx.lan.bytes": Decimal(12), "cpu.used.seconds": Decimal(2),
    }  # fmt: skip
    book.forget("job")
    assert book.highs == {} and book.last_raw == {}


def test_the_book_survives_a_round_trip_through_json() -> None:
    book = CounterBook("h")
    book.adopt(obs(3, 0), {V4})
    book.batch(obs(10, 1, "0.5"), NOW)
    again = CounterBook.from_json(book.to_json())
    assert again == book


# A property: whatever the counters do, the ledger's fold of everything the book published
# equals what was really counted, less only what a chain counted between its last reading and
# its restart (which nobody can know).
steps = st.lists(
    st.one_of(
        st.tuples(st.just("count"), st.sampled_from([V4, V6, CG]), st.integers(1, 1000)),
        st.tuples(st.just("restart"), st.sampled_from([V4, V6]), st.just(0)),
        st.tuples(st.just("read"), st.just(""), st.just(0)),
    ),
    max_size=40,
)


@settings(max_examples=300, deadline=None)
@given(steps)
def test_the_ledger_folds_exactly_what_was_counted_across_restarts_and_epochs(
    script: list[tuple[str, str, int]],
) -> None:
    book = CounterBook("h")
    raw = {V4: 0, V6: 0, CG: 0}
    counted = lost = 0
    unread: dict[str, int] = {V4: 0, V6: 0, CG: 0}
    restarted: set[str] = set()
    batches = []
    clock = NOW
    for action, comp, n in [*script, ("read", "", 0)]:
        if action == "count":
            raw[comp] += n
            unread[comp] += n
            counted += n
        elif action == "restart":
            lost += unread[comp]
            raw[comp], unread[comp] = 0, 0
            restarted.add(comp)
        else:
            clock += timedelta(seconds=1)
            now = Observation({TX: {V4: Decimal(raw[V4]), V6: Decimal(raw[V6])},
                               CPU: {CG: Decimal(raw[CG])}})  # fmt: skip
            if restarted:
                closing = book.roll(now, restarted, clock, epoch=f"e{len(batches)}")
                batches += [closing] if closing else []
                restarted = set()
            batches.append(book.batch(now, clock))
            unread = dict.fromkeys(unread, 0)
    usage, _ = fold({}, [r for b in batches for r in readings(b)])
    assert sum(u.delta for u in usage) == counted - lost
    assert not any(u.reset for u in usage)
