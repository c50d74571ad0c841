"""The live state as properties: usage folded once by ledger seq, holds that never overrun a
quota, combine rules, units."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from contracts.workloads import Resources
from services.policy.config import parse_config
from services.policy.domain import RESERVABLE, decide_spawn, effective_quotas, need_of
from services.policy.reservations import START_TIMEOUT, ReservationBook, hold
from services.policy.standings import Ask, View, resolve_groups, standings_for
from services.policy.units import SIZES, TIMES, parse_amount
from services.policy.usage import Applied, UsageEvent, UsageState
from services.policy.workloads import WorkloadBook

NOW = datetime(2026, 11, 22, 10, 30, tzinfo=UTC)
GIB_HOUR = Decimal(2**30 * 3600)

events = st.lists(
    st.tuples(
        st.sampled_from(["alice", "bob"]), st.sampled_from(["w1", "w2", "w3"]),
        st.sampled_from(["log.bytes", "mem.alloc.byte_seconds"]),
        st.integers(min_value=0, max_value=10**9), st.integers(min_value=0, max_value=72),
    ),
    max_size=40,
)  # fmt: skip


def as_events(raw: list[tuple[str, str, str, int, int]]) -> list[UsageEvent]:
    return [
        UsageEvent(i + 1, s, w, "h", m, Decimal(d), NOW - timedelta(hours=h))
        for i, (s, w, m, d, h) in enumerate(raw)
    ]


@given(events, st.lists(st.integers(min_value=0, max_value=60), max_size=80))
def test_usage_counts_every_event_once_whatever_the_feed_delivers(
    raw: list[tuple[str, str, str, int, int]], deliveries: list[int]
) -> None:
    ledger = as_events(raw)
    state = UsageState(minute_metrics=frozenset({"log.bytes"}))

    def catch_up() -> None:  # what the follower does on a gap: read the ledger
        for e in ledger[state.last_seq :]:
            state.apply(e)

    # The feed redelivers, skips and reorders; gaps are filled from the ledger.
    for i in deliveries:
        if i < len(ledger) and state.apply(ledger[i]) is Applied.GAP:
            catch_up()
            assert state.apply(ledger[i]) is Applied.DUPLICATE
    catch_up()
    assert state.last_seq == len(ledger)
    for subject in ("alice", "bob"):
        for metric in ("log.bytes", "mem.alloc.byte_seconds"):
            expected = sum(
                (e.delta for e in ledger if (e.subject, e.metric) == (subject, metric)), Decimal(0)
            )
            assert state.subject_usage(subject, metric).total() == expected
    for w in ("w1", "w2", "w3"):
        logged = sum((e.delta for e in ledger if (e.workload, e.metric) == (w, "log.bytes")), 0)
        assert state.workload_minutes(w, "log.bytes").total() == logged


CONFIG = parse_config("""
quotas:
  - {name: memory, metric: mem.alloc.byte_seconds, limit: 60 GiB*h, window: {rolling: 30d}}
""")


@given(
    st.integers(min_value=0, max_value=70),
    st.lists(st.tuples(st.integers(1, 16), st.integers(0, 7200)), min_size=1, max_size=60),
)
def test_allowed_spawns_together_never_overrun_the_quota(
    used_gib_hours: int, asks: list[tuple[int, int]]
) -> None:
    usage = UsageState()
    usage.apply(UsageEvent(1, "alice", "old", "h", "mem.alloc.byte_seconds",
                           used_gib_hours * GIB_HOUR, NOW - timedelta(days=1)))  # fmt: skip
    holds = ReservationBook()
    view = View(CONFIG, usage, WorkloadBook(), holds, NOW)
    for n, (gib, seconds) in enumerate(asks):
        ask = Ask(Resources(mem_bytes=gib * 2**30), Decimal(seconds))
        verdict = decide_spawn("alice", standings_for(view, "alice", [], ask), NOW)
        if verdict.allowed:
            amounts = {m: need_of(m, ask.resources, ask.seconds) for m in RESERVABLE}
            holds.add(hold(str(n), "alice", None, amounts, NOW, ask.seconds))
    held = holds.reserved(["alice"], "mem.alloc.byte_seconds", NOW)
    assert used_gib_hours * GIB_HOUR + held <= 60 * GIB_HOUR or held == 0


def test_a_hold_is_drawn_down_by_its_workload_and_ends_if_it_never_starts() -> None:
    book = ReservationBook()
    book.add(hold("d1", "alice", "nb", {"cpu.alloc.seconds": Decimal(7200)}, NOW, Decimal(3600)))
    book.add(hold("d2", "alice", None, {"cpu.alloc.seconds": Decimal(100)}, NOW, Decimal(3600)))
    book.consume("alice", "nb", "cpu.alloc.seconds", Decimal(7000))
    assert book.reserved(["alice"], "cpu.alloc.seconds", NOW) == 300
    book.consume("alice", "other", "cpu.alloc.seconds", Decimal(60))  # unnamed hold takes it
    assert book.reserved(["alice"], "cpu.alloc.seconds", NOW) == 240
    # d2's workload never showed up by itself... but it did draw usage above, so it started.
    later = NOW + START_TIMEOUT + timedelta(seconds=1)
    assert book.reserved(["alice"], "cpu.alloc.seconds", later) == 240
    book.add(hold("d3", "bob", None, {"cpu.alloc.seconds": Decimal(50)}, NOW, Decimal(3600)))
    assert book.reserved(["bob"], "cpu.alloc.seconds", later) == 0  # never started: released
    book.release_workload("nb")
    assert book.reserved(["alice"], "cpu.alloc.seconds", NOW) == 40


GROUP_LIMITS = {"a": 10, "b": 25, "c": 40}


@given(st.sets(st.sampled_from(sorted(GROUP_LIMITS)), min_size=1), st.sampled_from(
    ["max", "min", "sum"]))  # fmt: skip
def test_group_quotas_on_one_metric_combine_by_the_configured_rule(
    groups: set[str], mode: str
) -> None:
    config = parse_config(
        "quotas:\n"
        + "".join(
            f"  - {{name: q-{g}, metric: gpu.alloc.seconds, limit: {n} GPU*h, "
            f"window: {{rolling: 30d}}, applies_to: {{groups: [{g}]}}, combine: {mode}}}\n"
            for g, n in GROUP_LIMITS.items()
        )
    )
    (quota,) = effective_quotas(config, "carol", sorted(groups))
    limits = [GROUP_LIMITS[g] * 3600 for g in groups]
    expected = {"max": max, "min": min, "sum": sum}[mode](limits)
    assert quota.limit == expected


@given(
    st.integers(min_value=0, max_value=10**6), st.sampled_from(sorted(SIZES)),
    st.sampled_from(sorted(TIMES)),
)  # fmt: skip
def test_size_times_time_limits_are_exact(n: int, size: str, time: str) -> None:
    for written in (f"{n} {size}*{time}", f"{n}{size}·{time}", f"{n} {size} x {time}"):
        amount = parse_amount(written, "mem.alloc.byte_seconds")
        assert amount.base == n * SIZES[size] * TIMES[time]
        assert amount.unit == f"{size}·{time}"


POOL = parse_config("""
groups:
  lab: [bob, carol]
quotas:
  - {name: lab-gpus, metric: gpu.alloc.seconds, limit: 10 GPU*h, window: {rolling: 7d},
     applies_to: {groups: [lab]}, per: group}
""")


def test_a_group_pool_is_shared_by_its_members_and_those_the_hub_put_in_it() -> None:
    usage, book, holds = UsageState(), WorkloadBook(), ReservationBook()
    hour = Decimal(3600)
    for seq, (who, gpu_hours) in enumerate((("bob", 4), ("carol", 3), ("dave", 2), ("eve", 5))):
        usage.apply(UsageEvent(seq + 1, who, f"{who}-job", "h", "gpu.alloc.seconds",
                               gpu_hours * hour, NOW - timedelta(hours=2)))  # fmt: skip
    book.learn_groups("dave", ["lab"])  # a spawn request or workload_started said so
    holds.add(hold("d1", "carol", None, {"gpu.alloc.seconds": hour}, NOW, Decimal(3600)))
    view = View(POOL, usage, book, holds, NOW)
    for member in ("bob", "dave"):
        groups = resolve_groups(POOL, book, member)
        (standing,) = standings_for(view, member, groups)
        assert standing.used == 9 * hour  # bob + carol + dave, not eve
        assert standing.reserved == hour  # carol's hold counts against the pool
    assert standings_for(view, "eve", resolve_groups(POOL, book, "eve")) == []


def test_events_land_in_the_hour_and_minute_of_their_own_time_whatever_came_before() -> None:
    # Times as the feed decodes them: equal instants are distinct objects, and an instant in
    # another zone is the same hour as its UTC twin; the bucket memo must key on the value.
    usage = UsageState(minute_metrics=frozenset({"log.bytes"}))
    at = datetime(2026, 11, 22, 10, 59, 59, 999999, tzinfo=UTC)
    same = datetime.fromisoformat(at.isoformat())
    later = at + timedelta(microseconds=1)
    elsewhere = datetime.fromisoformat("2026-11-22T12:00:00.000001+01:00")  # 11:00 UTC
    times = [at, same, later, elsewhere, at]
    for seq, t in enumerate(times, start=1):
        assert usage.apply(UsageEvent(seq, "ann", "w", "h", "log.bytes", Decimal(1), t)) is (
            Applied.APPLIED
        )
    ten, eleven = at.replace(minute=0, second=0, microsecond=0), later
    assert usage.subjects[("ann", "log.bytes")].slots == {ten: 3, eleven: 2}
    minutes = usage.minutes[("w", "log.bytes")].slots
    assert minutes == {at.replace(second=0, microsecond=0): 3, later.replace(microsecond=0): 2}
