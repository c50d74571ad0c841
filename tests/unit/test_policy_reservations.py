"""What a subject holds is read from kept sums: they must always equal the holds summed anew."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import example, given, settings
from hypothesis import strategies as st

from services.policy.reservations import ReservationBook, hold

T0 = datetime(2026, 11, 22, 10, 0, tzinfo=UTC)
METRICS = ("cpu.alloc.seconds", "mem.alloc.byte_seconds")
SUBJECTS = ("alice", "bob")
WORKLOADS = (None, "w1", "w2")

ops = st.lists(
    st.one_of(
        st.tuples(st.just("add"), st.sampled_from(SUBJECTS), st.sampled_from(WORKLOADS),
                  st.integers(0, 500), st.integers(0, 500), st.integers(0, 7200)),
        st.tuples(st.just("consume"), st.sampled_from(SUBJECTS), st.sampled_from(WORKLOADS[1:]),
                  st.sampled_from(METRICS), st.integers(0, 300)),
        st.tuples(st.just("release"), st.sampled_from(WORKLOADS[1:])),
        st.tuples(st.just("expire"),),
        st.tuples(st.just("time"), st.integers(-600, 3600)),
        st.tuples(st.just("read"), st.sampled_from(SUBJECTS), st.sampled_from(METRICS)),
    ),
    max_size=60,
)  # fmt: skip


def summed_anew(book: ReservationBook, subjects: list[str], metric: str, now: datetime) -> Decimal:
    return sum(
        (r.remaining.get(metric, Decimal(0)) for r in book.items.values()
         if r.subject in subjects and r.live(now)),
        Decimal(0),
    )  # fmt: skip


@given(ops)
@settings(max_examples=400)
# A started hold outlives a new one: the sum must stop counting the new one at its end.
@example(
    [
        ("add", "alice", "w1", 100, 0, 7200),
        ("consume", "alice", "w1", "cpu.alloc.seconds", 1),
        ("read", "alice", "cpu.alloc.seconds"),
        ("add", "alice", None, 50, 0, 0),
        ("time", 1000),
    ]
)
# Read late, then a hold made earlier (a clock set back) that ends after that read.
@example([("add", "alice", None, 10, 0, 0), ("time", 1000), ("read", "alice", "cpu.alloc.seconds"),
          ("time", -900), ("add", "alice", None, 20, 0, 0), ("time", 850)])  # fmt: skip
def test_what_is_reserved_equals_the_live_holds_summed_whatever_happened_before(
    steps: list[tuple[object, ...]],
) -> None:
    book = ReservationBook()
    now = T0
    for n, step in enumerate(steps):
        match step:
            case ("add", subject, workload, cpu, mem, seconds):
                amounts = {
                    "cpu.alloc.seconds": Decimal(cpu),
                    "mem.alloc.byte_seconds": Decimal(mem),
                }
                book.add(hold(f"d{n}", subject, workload, amounts, now, Decimal(seconds)))  # type: ignore[arg-type]
            case ("consume", subject, workload, metric, amount):
                book.consume(subject, workload, metric, Decimal(amount))  # type: ignore[arg-type]
            case ("release", workload):
                book.release_workload(workload)  # type: ignore[arg-type]
            case ("expire",):
                book.expire(now)
            case ("time", seconds):
                now += timedelta(seconds=seconds)  # type: ignore[arg-type]
            case ("read", subject, metric):
                expected = summed_anew(book, [subject], metric, now)  # type: ignore[list-item]
                assert book.reserved([subject], metric, now) == expected  # type: ignore[list-item, arg-type]
    for metric in METRICS:
        both = list(SUBJECTS)
        assert book.reserved(both, metric, now) == summed_anew(book, both, metric, now)
