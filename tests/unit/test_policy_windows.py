"""Windows and retry_at as properties: where windows start, which instance is current, when
quota returns."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from hypothesis import given
from hypothesis import strategies as st

from services.policy.config import Window
from services.policy.windows import (
    HOUR,
    calendar_bounds,
    floor_hour,
    period_of,
    returns_at,
    window_start,
    workload_hour_bounds,
    workload_hour_index,
)

ZONES = ["UTC", "Europe/Berlin", "America/New_York", "Asia/Kolkata", "Australia/Lord_Howe"]
times = st.datetimes(
    min_value=datetime(2020, 1, 1), max_value=datetime(2035, 12, 31), timezones=st.just(UTC)
)
amounts = st.integers(min_value=1, max_value=10**6).map(Decimal)


@given(times, st.integers(min_value=1, max_value=90 * 24))
def test_a_rolling_window_is_strict_by_at_most_one_hour(now: datetime, hours: int) -> None:
    w = Window(rolling=timedelta(hours=hours))
    start = window_start(w, now)
    assert start is not None and start == floor_hour(start)
    assert now - w.rolling - HOUR < start <= now - w.rolling


@given(times, st.sampled_from(ZONES), st.sampled_from(["day", "week", "month"]))
def test_a_calendar_period_holds_now_and_starts_at_local_midnight(
    now: datetime, tz: str, calendar: str
) -> None:
    w = Window(calendar=calendar, tz=tz)  # type: ignore[arg-type]
    start, end = calendar_bounds(w, now)
    assert start <= now < end
    local = start.astimezone(ZoneInfo(tz))
    assert (local.hour, local.minute) == (0, 0)
    if calendar == "week":
        assert local.weekday() == 0
    if calendar == "month":
        assert local.day == 1
    # The next period starts where this one ends.
    assert calendar_bounds(w, end)[0] == end
    assert period_of(w, now) != period_of(w, end)


@given(st.lists(st.tuples(st.integers(0, 30 * 24 - 1), amounts), min_size=1, max_size=40), times)
def test_retry_at_is_the_first_hour_usage_is_back_under_the_limit(
    spread: list[tuple[int, Decimal]], now: datetime
) -> None:
    w = Window(rolling=timedelta(days=30))
    buckets: dict[datetime, Decimal] = {}
    for hours_ago, amount in spread:
        hour = floor_hour(now) - hours_ago * HOUR
        buckets[hour] = buckets.get(hour, Decimal(0)) + amount
    used = sum(buckets.values(), Decimal(0))
    limit = used - min(buckets.values()) + 1  # over now; back once the oldest buckets leave

    def in_window(at: datetime) -> Decimal:
        start = window_start(w, at)
        assert start is not None
        return sum((a for t, a in buckets.items() if t >= start), Decimal(0))

    back = returns_at(w, used, sorted(buckets.items()), now, lambda u: u < limit)
    assert back is not None and back == floor_hour(back)
    assert in_window(back) < limit
    assert in_window(back - HOUR) >= limit  # not an hour earlier


@given(times, amounts)
def test_calendar_quota_returns_at_the_next_period_and_lifetime_never(
    now: datetime, used: Decimal
) -> None:
    month = Window(calendar="month", tz="UTC")
    fits = lambda u: u < used  # noqa: E731 - over by construction
    assert returns_at(month, used, [], now, fits) == calendar_bounds(month, now)[1]
    assert returns_at(Window(lifetime=True), used, [], now, fits) is None
    assert returns_at(month, used, [], now, lambda u: u <= used) is None  # fits already


@given(times, st.integers(min_value=0, max_value=10**6))
def test_workload_hours_count_from_the_start_minute(started: datetime, seconds: int) -> None:
    t = started + timedelta(seconds=seconds)
    index = workload_hour_index(started, t)
    lo, hi = workload_hour_bounds(started, index)
    assert index >= 0 and lo <= t.replace(second=0, microsecond=0) < hi
    assert hi - lo == HOUR
    w = Window(workload_hour=True)
    assert period_of(w, t, started) == f"h{index}"
