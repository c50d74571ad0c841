"""Re-issuing terminate commands, pure: backoff, evidence cut-offs, command ids, resumption."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from services.policy.config import ConfigError, Reissue, parse_config
from services.policy.domain import Standing, effective_quotas
from services.policy.engine import Terminate, command_id, decide
from services.policy.reissue import Attempt, attempt_id, backoff, schedule
from services.policy.usage import UsageEvent, UsageState
from services.policy.workloads import Workload, WorkloadBook

T0 = datetime(2026, 11, 22, 10, 30, tzinfo=UTC)
CONFIG = parse_config("""
reissue: {after: 30s, max: 5min, settle: 10s}
quotas:
  - {name: memory, metric: mem.alloc.byte_seconds, limit: 100 B*s, window: {rolling: 30d},
     enforce: [terminate], termination: {grace_seconds: 20}}
""")
(MEMORY,) = effective_quotas(CONFIG, "bob", [])
NB = Workload("nb-1", "bob", "node-2", T0 - timedelta(hours=1))
OVER = Standing(MEMORY, Decimal(120))
CROSSING = command_id("memory", "bob", "rolling", "nb-1")


def first(at: datetime = T0) -> Attempt:
    return Attempt(CROSSING, 1, CROSSING, at, Decimal(20), "node-2", "nb-1")


def plan_at(now: datetime, usage_until: datetime | None, last: Attempt | None = None):
    attempts = {CROSSING: last or first()}
    until = {} if usage_until is None else {"nb-1": usage_until}
    return decide(
        "bob", [OVER], [NB], {}, {CROSSING}, now,
        attempts=attempts, usage_until=until, reissue=CONFIG.reissue,
    )  # fmt: skip


def terminations(plan) -> list[Terminate]:
    return [a for a in plan.actions if isinstance(a, Terminate)]


def test_the_default_backoff_doubles_from_thirty_seconds_to_five_minutes() -> None:
    assert schedule(Reissue()) == [30, 60, 120, 240, 300, 300]
    assert backoff(Reissue(), 10_000) == timedelta(minutes=5)


def test_each_attempt_has_its_own_deterministic_command_id() -> None:
    assert attempt_id(CROSSING, 1) == CROSSING
    assert attempt_id(CROSSING, 2) == f"{CROSSING}-2" != attempt_id(CROSSING, 3)


def test_usage_sampled_after_the_grace_and_settle_brings_the_next_command_after_backoff() -> None:
    still_running = T0 + timedelta(seconds=31)  # after 20 s grace + 10 s settle
    early = plan_at(T0 + timedelta(seconds=29), still_running)
    assert terminations(early) == []
    assert early.due == T0 + timedelta(seconds=30)
    assert [a.workload for a in early.ignoring] == ["nb-1"]
    (again,) = terminations(plan_at(T0 + timedelta(seconds=30), still_running))
    assert (again.command_id, again.attempt, again.crossing) == (f"{CROSSING}-2", 2, CROSSING)
    assert again.previous == first() and again.usage_until == still_running


def test_usage_sampled_within_the_grace_and_settle_is_not_proof_it_still_runs() -> None:
    # A final read, or a spool of samples taken before the command, published late.
    for sampled in (T0 - timedelta(minutes=5), T0 + timedelta(seconds=30)):
        plan = plan_at(T0 + timedelta(hours=1), sampled)
        assert terminations(plan) == [] and plan.ignoring == [] and plan.due is None
    assert terminations(plan_at(T0 + timedelta(hours=1), None)) == []


def test_the_third_command_waits_twice_as_long_as_the_second() -> None:
    second = Attempt(CROSSING, 2, f"{CROSSING}-2", T0, Decimal(20), "node-2", "nb-1")
    running = T0 + timedelta(seconds=45)
    assert terminations(plan_at(T0 + timedelta(seconds=59), running, second)) == []
    (third,) = terminations(plan_at(T0 + timedelta(seconds=60), running, second))
    assert third.command_id == f"{CROSSING}-3"


def test_a_stopped_workload_is_not_commanded_again_whatever_usage_says() -> None:
    plan = decide(
        "bob", [OVER], [], {}, {CROSSING}, T0 + timedelta(hours=1),
        attempts={CROSSING: first()}, usage_until={"nb-1": T0 + timedelta(minutes=5)},
        reissue=CONFIG.reissue,
    )  # fmt: skip
    assert terminations(plan) == []


def test_with_reissue_disabled_one_command_per_crossing_stays_the_rule() -> None:
    config = parse_config("reissue: {enabled: false}")
    plan = decide(
        "bob", [OVER], [NB], {}, {CROSSING}, T0 + timedelta(hours=1),
        attempts={CROSSING: first()}, usage_until={"nb-1": T0 + timedelta(minutes=5)},
        reissue=config.reissue,
    )  # fmt: skip
    assert terminations(plan) == []


def test_reissue_settings_are_validated_with_pointed_messages() -> None:
    with pytest.raises(ConfigError, match="reissue: after must be at least 1s"):
        parse_config("reissue: {after: 0s}")
    with pytest.raises(ConfigError, match="must not be shorter than after"):
        parse_config("reissue: {after: 10min, max: 1min}")
    assert parse_config("reissue: {after: 2min, max: 1h}").reissue.max == timedelta(hours=1)


def test_usage_after_a_stop_resumes_the_workload_but_its_final_read_does_not() -> None:
    book = WorkloadBook()
    stopped = T0
    book.stopped["nb-1"] = stopped
    assert book.resume("nb-1", "bob", "node-2", stopped + timedelta(seconds=11)) is not None
    assert book.running["nb-1"].resumed_from == stopped
    assert not book.running["nb-1"].announced
    # A workload_started after the stop is the same name run again.
    other = WorkloadBook()
    other.stopped["nb-2"] = stopped
    assert not other.start(Workload("nb-2", "bob", "node-2", stopped - timedelta(seconds=1)))
    assert other.start(Workload("nb-2", "bob", "node-2", stopped + timedelta(seconds=1)))


def test_only_usage_folded_event_by_event_counts_as_proof_of_life() -> None:
    usage = UsageState()
    usage.load_hours(
        [("bob", "nb-1", "node-2", "mem.alloc.byte_seconds", T0.replace(minute=0), Decimal(5))],
        per_workload=True,
        now=T0,
    )
    assert usage.sampled_until("nb-1") is None  # an hour bucket is not a sample time
    usage.apply(UsageEvent(1, "bob", "nb-1", "node-2", "mem.alloc.byte_seconds", Decimal(0), T0))
    assert usage.sampled_until("nb-1") is None  # nothing was used
    usage.apply(UsageEvent(2, "bob", "nb-1", "node-2", "mem.alloc.byte_seconds", Decimal(1), T0))
    assert usage.sampled_until("nb-1") == T0


def test_a_workload_started_again_after_its_command_is_commanded_at_its_first_usage() -> None:
    restarted = Workload("nb-1", "bob", "node-2", T0 + timedelta(seconds=5))
    plan = decide(
        "bob", [OVER], [restarted], {}, {CROSSING}, T0 + timedelta(seconds=6),
        attempts={CROSSING: first()}, usage_until={"nb-1": T0 + timedelta(seconds=6)},
        reissue=CONFIG.reissue,
    )  # fmt: skip
    (again,) = terminations(plan)
    assert again.command_id == f"{CROSSING}-2"
