"""Enforcement decisions: each action once per crossing, episodes that open and close."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from hypothesis import given
from hypothesis import strategies as st

from services.policy.config import parse_config
from services.policy.domain import Standing, effective_quotas
from services.policy.engine import (
    Block,
    Exceeded,
    Mark,
    MarkKey,
    Plan,
    Terminate,
    Unblock,
    Warn,
    command_id,
    decide,
)
from services.policy.workloads import Workload

NOW = datetime(2026, 11, 22, 10, 30, tzinfo=UTC)
CONFIG = parse_config("""
quotas:
  - {name: memory, metric: mem.alloc.byte_seconds, limit: 100 B*s, window: {rolling: 30d},
     enforce: [spawn, terminate], warn_at: [0.8, 0.95]}
  - {name: egress, metric: net.tx.wan.bytes, limit: 100 B, window: {calendar: month},
     per: workload, enforce: [terminate], warn_at: [0.5]}
""")
MEMORY, EGRESS = (
    {q.name: q for q in effective_quotas(CONFIG, "alice", [])}[n] for n in ("memory", "egress")
)
RUNNING = [Workload("nb-1", "alice", "node-1", NOW), Workload("nb-2", "alice", "node-2", NOW)]


class Episodes:
    """A subject's marks and sent ids kept the way the enforcer keeps them."""

    def __init__(self) -> None:
        self.marks: dict[MarkKey, Mark] = {}
        self.sent: set[str] = set()

    def run(
        self, *standings: Standing, running: list[Workload] = RUNNING, now: datetime = NOW
    ) -> Plan:
        plan = decide("alice", standings, running, self.marks, self.sent, now)
        for key in plan.closed:
            self.marks.pop(key, None)
        for mark in plan.opened:
            self.marks[mark.key] = mark
        self.sent |= {a.command_id for a in plan.actions if isinstance(a, Terminate)}
        return plan


def mem(used: int, hour: datetime = NOW) -> Standing:
    return Standing(MEMORY, Decimal(used), ((hour.replace(minute=0), Decimal(used)),))


def kinds(plan: Plan) -> list[str]:
    return [type(a).__name__ for a in plan.actions]


def test_crossing_terminates_each_running_workload_once_and_blocks_spawns() -> None:
    e = Episodes()
    plan = e.run(mem(120))
    assert sorted(kinds(plan)) == ["Block", "Exceeded", "Terminate", "Terminate"]
    block = next(a for a in plan.actions if isinstance(a, Block))
    assert block.until == NOW.replace(minute=0) + timedelta(hours=1, days=30)
    assert {a.workload.workload for a in plan.actions if isinstance(a, Terminate)} == {
        "nb-1", "nb-2",
    }  # fmt: skip
    # Deciding again (a replay, a restart with the same records) does nothing more.
    assert kinds(e.run(mem(130))) == []
    # A workload started while over is stopped too, once.
    late = Workload("nb-3", "alice", "node-1", NOW)
    assert kinds(e.run(mem(130), running=[*RUNNING, late])) == ["Terminate"]


def test_warnings_come_once_per_threshold_and_again_after_usage_fell_back() -> None:
    e = Episodes()
    assert [(type(a).__name__, getattr(a, "threshold", None)) for a in e.run(mem(85)).actions] == [
        ("Warn", Decimal("0.8"))
    ]
    assert kinds(e.run(mem(90))) == []
    assert [a.threshold for a in e.run(mem(96)).actions if isinstance(a, Warn)] == [Decimal("0.95")]
    # Old usage left the rolling window: the episode closes silently, and a new one warns.
    assert kinds(e.run(mem(10))) == []
    assert kinds(e.run(mem(81))) == ["Warn"]


def test_jumping_straight_over_sends_exceeded_not_warnings() -> None:
    e = Episodes()
    assert sorted(kinds(e.run(mem(500), running=[]))) == ["Block", "Exceeded"]
    assert kinds(e.run(mem(80), running=[])) == ["Unblock"]  # and the 0.95 mark closed quietly
    assert kinds(e.run(mem(85), running=[])) == []  # still past 0.8: the same episode


def test_a_block_is_renewed_when_its_end_moves_and_lifted_when_the_quota_goes_away() -> None:
    e = Episodes()
    e.run(mem(120, NOW - timedelta(days=3)), running=[])
    later = Standing(MEMORY, Decimal(130), ((NOW.replace(minute=0), Decimal(130)),))
    (renewed,) = e.run(later, running=[]).actions
    assert isinstance(renewed, Block) and renewed.until is not None
    assert renewed.until > NOW + timedelta(days=29)
    (lifted,) = e.run(running=[]).actions  # e.g. the admin moved the user to another group
    assert isinstance(lifted, Unblock) and lifted.why == "the quota no longer applies"
    assert e.marks == {}


def test_per_workload_quotas_stop_only_the_workload_over_its_limit() -> None:
    e = Episodes()
    over = Standing(EGRESS, Decimal(150), period="2026-11-01T00:00Z", workload="nb-2")
    under = Standing(EGRESS, Decimal(20), period="2026-11-01T00:00Z", workload="nb-1")
    plan = e.run(under, over)
    (stop,) = [a for a in plan.actions if isinstance(a, Terminate)]
    assert stop.workload.workload == "nb-2"
    assert not any(isinstance(a, Block) for a in plan.actions)  # workloads do not block spawns
    exceeded = next(a for a in plan.actions if isinstance(a, Exceeded))
    assert exceeded.standing.workload == "nb-2"
    # Next month is a new crossing of the same workload (it kept running): a new command.
    december = Standing(EGRESS, Decimal(150), period="2026-12-01T00:00Z", workload="nb-2")
    again = [a for a in e.run(december).actions if isinstance(a, Terminate)]
    assert len(again) == 1 and again[0].command_id != stop.command_id


@given(
    st.text(min_size=1, max_size=20), st.text(min_size=1, max_size=20),
    st.text(min_size=1, max_size=12), st.text(min_size=1, max_size=20),
)  # fmt: skip
def test_command_ids_are_stable_and_tell_crossings_apart(
    quota: str, subject: str, period: str, workload: str
) -> None:
    first = command_id(quota, subject, period, workload)
    assert first == command_id(quota, subject, period, workload)
    assert first.startswith("term-") and len(first) == 37
    assert first != command_id(quota, subject, period, workload + "x")
    assert first != command_id(quota, subject, period + "x", workload)


@given(st.lists(st.integers(min_value=0, max_value=300), min_size=1, max_size=30))
def test_any_usage_path_sends_at_most_one_termination_per_workload(path: list[int]) -> None:
    e = Episodes()
    stops: list[str] = []
    for used in path:
        stops += [a.workload.workload for a in e.run(mem(used)).actions if isinstance(a, Terminate)]
    assert sorted(stops) == (["nb-1", "nb-2"] if max(path) >= 100 else [])
