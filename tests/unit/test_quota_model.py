"""Quota configuration, units, windows, combine rules and retry_at: pure and exact."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st

from services.policy.config import ConfigError, parse_config
from services.policy.domain import (
    Standing,
    calendar_bounds,
    decide_spawn,
    effective_quotas,
    retry_at,
    status,
    window_start,
)
from services.policy.units import UnitError, parse_amount

NOW = datetime(2026, 11, 22, 10, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("text", "metric", "base"),
    [
        ("50 MB", "log.bytes", 50_000_000),
        ("10 GB", "net.tx.wan.bytes", 10 * 10**9),
        ("2 GiB", "net.rx.lan.bytes", 2 * 2**30),
        ("60 GiB*h", "mem.alloc.byte_seconds", 60 * 2**30 * 3600),
        ("60 GiB·h", "mem.used.byte_seconds", 60 * 2**30 * 3600),
        ("100 core*h", "cpu.alloc.seconds", 360_000),
        ("160 GPU*h", "gpu.alloc.seconds", 576_000),
        ("1.5 h", "cpu.used.seconds", 5400),
        ("42", "myapp.requests", 42),
    ],
)
def test_limits_are_parsed_into_the_metric_base_unit(text: str, metric: str, base: int) -> None:
    assert parse_amount(text, metric).base == base


@pytest.mark.parametrize(
    ("text", "metric", "hint"),
    [
        ("50 MB", "mem.alloc.byte_seconds", "size times time"),
        ("100 core*h", "log.bytes", "a size such as"),
        ("60", "net.tx.wan.bytes", "has no unit"),
        ("lots", "log.bytes", "is not an amount"),
        ("5 parsecs", "cpu.used.seconds", "resource times time"),
    ],
)
def test_a_limit_in_the_wrong_unit_says_what_the_metric_takes(
    text: str, metric: str, hint: str
) -> None:
    with pytest.raises(UnitError, match=hint):
        parse_amount(text, metric)


@given(st.integers(min_value=0, max_value=10**12), st.sampled_from(["MB", "GiB", "kB", "B"]))
def test_byte_amounts_are_exact_for_any_whole_number(n: int, unit: str) -> None:
    from services.policy.units import SIZES

    assert parse_amount(f"{n} {unit}", "log.bytes").base == n * SIZES[unit]


def test_config_errors_point_at_the_quota_and_field() -> None:
    text = """
quotas:
  - name: memory-30d
    metric: mem.alloc.byte_seconds
    limit: 60 GB
    window: {rolling: 30d}
  - name: broken-window
    metric: log.bytes
    limit: 5 MB
    window: {rolling: 30d, lifetime: true}
"""
    with pytest.raises(ConfigError) as err:
        parse_config(text, "quotas.yaml")
    message = str(err.value)
    assert "quotas.yaml" in message
    assert "quotas[memory-30d]: limit: '60 GB' does not fit mem.alloc.byte_seconds" in message
    assert "quotas[broken-window].window: a window is exactly one of" in message


def test_unknown_keys_are_refused_not_ignored() -> None:
    with pytest.raises(ConfigError, match=r"quotas\[q\]\.limt"):
        parse_config("quotas: [{name: q, metric: log.bytes, limt: 5 MB, window: {lifetime: true}}]")


CONFIG_TEXT = """
groups:
  regular: [alice, bob]
  power: [bob]
quotas:
  - {name: mem-regular, metric: mem.alloc.byte_seconds, limit: 60 GiB*h,
     window: {rolling: 30d}, applies_to: {groups: [regular]}, combine: max, warn_at: [0.8]}
  - {name: mem-power, metric: mem.alloc.byte_seconds, limit: 240 GiB*h,
     window: {rolling: 30d}, applies_to: {groups: [power]}, combine: max}
  - {name: egress, metric: net.tx.wan.bytes, limit: 10 GB,
     window: {calendar: month, tz: Europe/Berlin}, applies_to: {all: true}}
"""
CONFIG = parse_config(CONFIG_TEXT)


def memory_quota(subject: str = "alice"):
    (q,) = [
        q
        for q in effective_quotas(CONFIG, subject, CONFIG.groups_of(subject))
        if q.metric == "mem.alloc.byte_seconds"
    ]
    return q


def test_a_user_in_several_groups_gets_the_max_of_their_group_quotas() -> None:
    quotas = {q.metric: q for q in effective_quotas(CONFIG, "bob", CONFIG.groups_of("bob"))}
    assert quotas["mem.alloc.byte_seconds"].name == "mem-power"
    alice = {q.metric: q for q in effective_quotas(CONFIG, "alice", CONFIG.groups_of("alice"))}
    assert alice["mem.alloc.byte_seconds"].name == "mem-regular"


@pytest.mark.parametrize(("mode", "gib_h"), [("min", 60), ("sum", 300), ("max", 240)])
def test_combine_rules(mode: str, gib_h: int) -> None:
    config = parse_config(CONFIG_TEXT.replace("combine: max", f"combine: {mode}"))
    (mem,) = [
        q for q in effective_quotas(config, "bob", config.groups_of("bob")) if q.metric[0] == "m"
    ]
    assert mem.limit == gib_h * 2**30 * 3600


def test_calendar_month_follows_the_time_zone() -> None:
    q = CONFIG.quotas[2]
    start, end = calendar_bounds(q.window, datetime(2026, 11, 30, 23, 30, tzinfo=UTC))
    # 23:30 UTC on 30 Nov is already December in Berlin.
    assert start == datetime(2026, 11, 30, 23, 0, tzinfo=UTC)
    assert end == datetime(2026, 12, 31, 23, 0, tzinfo=UTC)


def test_rolling_window_starts_at_the_hour_bucket_of_now_minus_length() -> None:
    q = CONFIG.quotas[0]
    assert window_start(q.window, NOW) == datetime(2026, 10, 23, 10, 0, tzinfo=UTC)


def test_retry_at_is_when_enough_old_usage_leaves_the_rolling_window() -> None:
    q = memory_quota()
    gib_h = Decimal(2**30 * 3600)
    buckets = [
        (NOW - timedelta(days=20, minutes=30), 30 * gib_h),
        (NOW - timedelta(days=10, minutes=30), 20 * gib_h),
        (NOW - timedelta(days=1, minutes=30), 15 * gib_h),
    ]
    used = sum((b for _, b in buckets), Decimal(0))
    # 65 used of 60: dropping the oldest 30 leaves 35 < 60.
    expected = buckets[0][0].replace(minute=0) + timedelta(hours=1) + timedelta(days=30)
    assert retry_at(q, used, [(t.replace(minute=0), a) for t, a in buckets], NOW) == expected
    st = status(q, used, [], NOW)
    assert st.state == "exceeded" and st.used == Decimal(65) and st.remaining == 0


def test_warning_state_at_the_first_threshold() -> None:
    q = memory_quota()
    gib_h = Decimal(2**30 * 3600)
    assert status(q, 47 * gib_h, [], NOW).state == "ok"
    assert status(q, 48 * gib_h, [], NOW).state == "warning"


def test_a_denial_says_used_limit_unit_window_and_when_it_returns() -> None:
    q = memory_quota()
    gib_h = Decimal(2**30 * 3600)
    hour = NOW.replace(minute=0) - timedelta(days=27)
    used = Decimal("61.2") * gib_h
    verdict = decide_spawn(
        "alice", [Standing(q, used, ((hour, used),))], NOW, "Ask your admin to join power."
    )
    assert not verdict.allowed
    assert verdict.message == (
        "You have used 61.2 of 60 GiB·h (mem-regular) in the last 30 days; "
        "quota returns from 2026-11-25 11:00 UTC. Ask your admin to join power."
    )
    assert verdict.retry_at == datetime(2026, 11, 25, 11, 0, tzinfo=UTC)
