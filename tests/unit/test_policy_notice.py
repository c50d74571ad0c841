"""Notice before termination, pure: scheduling, firing and cancelling (policy/notice.py)."""

from __future__ import annotations

from dataclasses import replace
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest

from services.policy.config import ConfigError, parse_config
from services.policy.domain import Standing, effective_quotas
from services.policy.engine import Terminate, command_id, decide
from services.policy.grants import Grant
from services.policy.notice import Cancel, Notice, Schedule, scheduled_sentence
from services.policy.workloads import Workload

T0 = datetime(2026, 11, 22, 10, 37, tzinfo=UTC)
CONFIG = parse_config("""
quotas:
  - {name: memory-30d, metric: mem.alloc.byte_seconds, limit: 100 B*s, window: {rolling: 30d},
     enforce: [terminate], termination: {grace_seconds: 20, notice_seconds: 300}}
""")
(MEMORY,) = effective_quotas(CONFIG, "bob", [])
NB = Workload("nb-1", "bob", "node-2", T0 - timedelta(hours=1))
OVER, UNDER = Standing(MEMORY, Decimal(120)), Standing(MEMORY, Decimal(80))
CROSSING = command_id("memory-30d", "bob", "rolling", "nb-1")


def pending(at: datetime = T0) -> Notice:
    return Notice(
        "notice-1", CROSSING, "bob", "nb-1", "node-2", "memory-30d", Decimal(100),
        at + timedelta(seconds=300), at,
    )  # fmt: skip


def plan(standing: Standing, now: datetime, notices=None, running=(NB,), sent=()):
    return decide("bob", [standing], list(running), {}, set(sent), now, notices=notices or {})


def only(plan_, kind):
    return [a for a in plan_.actions if isinstance(a, kind)]


def test_the_crossing_of_a_quota_with_notice_schedules_instead_of_terminating() -> None:
    p = plan(OVER, T0)
    (s,) = only(p, Schedule)
    assert only(p, Terminate) == []
    assert (s.crossing, s.workload, s.terminate_at) == (CROSSING, NB, T0 + timedelta(minutes=5))
    assert p.due == s.terminate_at  # the enforcer looks again when the notice runs out


def test_while_the_notice_runs_nothing_more_is_decided_for_the_workload() -> None:
    p = plan(OVER, T0 + timedelta(seconds=299), {CROSSING: pending()})
    assert only(p, Schedule) == only(p, Terminate) == only(p, Cancel) == []
    assert p.due == T0 + timedelta(seconds=300)


def test_a_workload_still_over_when_the_notice_runs_out_is_terminated_with_the_crossing_id() -> (
    None
):
    (t,) = only(plan(OVER, T0 + timedelta(seconds=300), {CROSSING: pending()}), Terminate)
    assert (t.command_id, t.notice) == (CROSSING, pending())


def test_usage_falling_under_the_limit_cancels_the_notice_and_says_why() -> None:
    (c,) = only(plan(UNDER, T0 + timedelta(seconds=10), {CROSSING: pending()}), Cancel)
    assert c.notice == pending() and c.why == "usage of memory-30d fell back under its limit"


def test_a_grant_cancels_the_notice_naming_the_grant() -> None:
    grant = Grant(
        "g-1", "subject", "bob", "memory-30d", Decimal(100), "100 B*s", "admin", T0,
        T0 + timedelta(days=7), "deadline", 1,
    )  # fmt: skip
    lifted = replace(MEMORY, limit=Decimal(200), granted=Decimal(100), grants=(grant,))
    (c,) = only(plan(Standing(lifted, Decimal(120)), T0, {CROSSING: pending()}), Cancel)
    assert c.why == "a grant raised memory-30d"


def test_a_configuration_raising_the_limit_cancels_the_notice() -> None:
    raised = replace(MEMORY, limit=Decimal(500))
    (c,) = only(plan(Standing(raised, Decimal(120)), T0, {CROSSING: pending()}), Cancel)
    assert c.why == "the limit of memory-30d was raised"


def test_a_configuration_no_longer_terminating_cancels_the_notice() -> None:
    spawn_only = replace(MEMORY, enforce=frozenset({"spawn"}))
    (c,) = only(plan(Standing(spawn_only, Decimal(120)), T0, {CROSSING: pending()}), Cancel)
    assert c.why == "memory-30d no longer terminates workloads"


def test_a_workload_that_stopped_during_its_notice_is_let_go() -> None:
    (c,) = only(plan(OVER, T0, {CROSSING: pending()}, running=()), Cancel)
    assert c.why == "the workload stopped"
    assert only(plan(OVER, T0, {CROSSING: pending()}, running=()), Terminate) == []


def test_a_crossing_already_terminated_neither_schedules_nor_cancels() -> None:
    p = plan(OVER, T0, {CROSSING: pending()}, sent={CROSSING})
    assert only(p, Schedule) == only(p, Terminate) == only(p, Cancel) == []


def test_no_notice_is_the_immediate_kill_of_before() -> None:
    config = parse_config("""
quotas:
  - {name: m, metric: mem.alloc.byte_seconds, limit: 100 B*s, window: {rolling: 30d},
     enforce: [terminate]}
""")
    (q,) = effective_quotas(config, "bob", [])
    assert q.notice_seconds == 0
    p = decide("bob", [Standing(q, Decimal(120))], [NB], {}, set(), T0)
    assert len(only(p, Terminate)) == 1 and only(p, Schedule) == []


@pytest.mark.parametrize("bad", ["-1", "604801", "soon"])
def test_a_notice_that_is_negative_too_long_or_not_a_number_is_refused(bad: str) -> None:
    with pytest.raises(ConfigError, match="notice_seconds"):
        parse_config(f"""
quotas:
  - {{name: m, metric: mem.alloc.byte_seconds, limit: 1 B*s, window: {{rolling: 1d}},
     enforce: [terminate], termination: {{notice_seconds: {bad}}}}}
""")


def test_the_sentence_names_the_quota_and_the_time_in_utc() -> None:
    assert scheduled_sentence("memory-30d", T0 + timedelta(minutes=5)) == (
        "memory-30d exceeded; this job will be stopped at 10:42 UTC unless usage falls or a "
        "grant arrives"
    )
