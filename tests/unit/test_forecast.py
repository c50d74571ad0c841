"""Forecasts with an injected clock: the rate over the lookback, the linear projection, usage
leaving a rolling window, and the horizon beyond which no instant is named."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal
from fractions import Fraction

from hypothesis import given
from hypothesis import strategies as st

from services.policy.config import Window, parse_config
from services.policy.domain import effective_quotas
from services.policy.engine import FORECAST, Forecast, decide
from services.policy.forecast import (
    LIFETIME,
    LOOKBACK,
    lookback_start,
    projected_exhaustion,
    rate_per_second,
)
from services.policy.prices import COST
from services.policy.reservations import ReservationBook
from services.policy.standings import View, standings_for
from services.policy.usage import UsageEvent, UsageState
from services.policy.workloads import WorkloadBook

HOUR = timedelta(hours=1)
NOW = datetime(2026, 12, 2, 10, 30, tzinfo=UTC)
MONTH = Window(calendar="month")
DAYS30 = Window(rolling=timedelta(days=30))


def exact(
    now: datetime, start: datetime, used: int, recent: int, limit: int, cap: bool = False
) -> datetime | None:
    """The oracle: now + remaining / (recent / elapsed), with exact fractions, rounded up to
    the microsecond (None, with `cap`, past 200 years: no datetime holds it)."""
    elapsed_us = (now - start) // timedelta(microseconds=1)
    rate = Fraction(recent, elapsed_us)  # per microsecond
    wait = Fraction(limit - used) / rate
    whole = -(-wait.numerator // wait.denominator)
    if cap and whole > 2 * LIFETIME // timedelta(microseconds=1):
        return None
    return now + timedelta(microseconds=whole)


def test_the_lookback_is_six_hours_of_hour_buckets_never_before_the_window() -> None:
    assert lookback_start(DAYS30, NOW) == datetime(2026, 12, 2, 4, tzinfo=UTC)
    assert lookback_start(Window(rolling=timedelta(hours=2)), NOW) == datetime(
        2026, 12, 2, 8, tzinfo=UTC
    )
    # Early in a month the lookback starts with the month.
    early = datetime(2026, 12, 1, 2, 15, tzinfo=UTC)
    assert lookback_start(MONTH, early) == datetime(2026, 12, 1, tzinfo=UTC)
    assert lookback_start(Window(workload_hour=True), NOW) is None
    assert timedelta(hours=6) == LOOKBACK


@given(
    st.integers(min_value=1, max_value=10**9),
    st.integers(min_value=0, max_value=10**9),
    st.integers(min_value=1, max_value=10**9),
)
def test_a_lifetime_projection_is_the_exact_linear_instant(
    recent: int, already: int, more: int
) -> None:
    w = Window(lifetime=True)
    used, limit = recent + already, recent + already + more
    got = projected_exhaustion(w, Decimal(limit), Decimal(used), Decimal(recent), NOW)
    start = lookback_start(w, NOW)
    assert start is not None
    expected = exact(NOW, start, used, recent, limit, cap=True)
    assert got == (None if expected is None or expected > NOW + LIFETIME else expected)


def test_a_constant_rate_runs_out_when_the_arithmetic_says() -> None:
    # 100 units an hour for 6.5 hours: 650 used, 1000 allowed -> 3.5 hours more.
    got = projected_exhaustion(MONTH, Decimal(1000), Decimal(650), Decimal(650), NOW)
    assert got == NOW + timedelta(hours=3.5)
    assert rate_per_second(MONTH, Decimal(650), NOW) * 3600 == 100


def test_no_forecast_without_recent_usage_when_used_up_or_beyond_the_period() -> None:
    assert projected_exhaustion(MONTH, Decimal(1000), Decimal(650), Decimal(0), NOW) is None
    assert projected_exhaustion(MONTH, Decimal(1000), Decimal(1000), Decimal(650), NOW) is None
    # 1 unit an 6.5 hours would take far past the end of December.
    assert projected_exhaustion(MONTH, Decimal(1000), Decimal(1), Decimal(1), NOW) is None


def test_usage_leaving_a_rolling_window_postpones_the_projection() -> None:
    w = Window(rolling=timedelta(hours=24))
    # 500 used 23.5 hours ago (leaves the window at 11:00 today), 100/h lately.
    old = datetime(2026, 12, 1, 10, tzinfo=UTC)
    hours = [(old, Decimal(500)), (datetime(2026, 12, 2, 4, tzinfo=UTC), Decimal(650))]
    used, recent, limit = Decimal(1150), Decimal(650), Decimal(1300)
    naive = NOW + timedelta(hours=1.5)
    got = projected_exhaustion(w, limit, used, recent, NOW, lambda: hours)
    # At 11:00: 1150 + 50 - 500 = 700, then 600 more at 100/h: 6 hours later.
    assert got == datetime(2026, 12, 2, 17, tzinfo=UTC)
    assert got is not None and got > naive


def test_a_lifetime_quota_used_slowly_gets_no_projection_rather_than_an_overflow() -> None:
    w = Window(lifetime=True)
    assert projected_exhaustion(w, Decimal(10**30), Decimal(1), Decimal(1), NOW) is None


def test_a_rolling_projection_past_now_plus_the_window_is_none() -> None:
    w = Window(rolling=timedelta(hours=6))
    # 10/h lately, 100 left: 10 hours, beyond now + 6 h.
    got = projected_exhaustion(w, Decimal(165), Decimal(65), Decimal(65), NOW, list)
    assert got is None


def _view(config_text: str, events: list[UsageEvent], now: datetime) -> View:
    config = parse_config(config_text)
    usage = UsageState(pricebook=config.pricebook)
    for e in events:
        assert usage.apply(e).value == "applied"
    return View(config, usage, WorkloadBook(), ReservationBook(), now)


QUOTAS = """
quotas:
  - name: egress
    metric: net.tx.wan.bytes
    limit: 1000 B
    window: {calendar: month}
"""


def test_the_policy_forecasts_from_its_hour_buckets_and_says_so_once() -> None:
    events = [
        UsageEvent(i + 1, "ann", "w1", "h1", "net.tx.wan.bytes", Decimal(100),
                   datetime(2026, 12, 2, 4 + i, 30, tzinfo=UTC))
        for i in range(6)
    ] + [UsageEvent(7, "ann", "w1", "h1", "net.tx.wan.bytes", Decimal(50), NOW)]  # fmt: skip
    view = _view(QUOTAS, events, NOW)
    [standing] = standings_for(view, "ann", [])
    assert standing.used == 650
    assert standing.projected == NOW + timedelta(hours=3.5)
    assert standing.status(NOW).projected_exhaustion_at == NOW + timedelta(hours=3.5)
    plan = decide("ann", [standing], [], {}, set(), NOW)
    forecasts = [a for a in plan.actions if isinstance(a, Forecast)]
    assert [f.projected for f in forecasts] == [NOW + timedelta(hours=3.5)]
    marks = {m.key: m for m in plan.opened}
    assert any(k.kind == FORECAST for k in marks)
    later = NOW + timedelta(minutes=5)
    [again] = standings_for(_view(QUOTAS, events, later), "ann", [])
    assert not [a for a in decide("ann", [again], [], marks, set(), later).actions
                if isinstance(a, Forecast)]  # fmt: skip


def test_effective_quotas_include_cost_budgets() -> None:
    config = parse_config(
        "prices: [{metric: net.tx.wan.bytes, price: 0.09 USD/GB}]\n"
        "quotas: [{name: budget, metric: cost, limit: 200 USD, window: {calendar: month}}]"
    )
    [q] = effective_quotas(config, "ann", [])
    assert q.metric == COST and q.show(q.limit) == "200.00 USD"


def test_a_fleet_that_started_this_hour_is_measured_from_this_hour_not_six_back() -> None:
    # 60 units between 10:00 and 10:30: 120 an hour, not 60 / 6.5 h.
    events = [UsageEvent(1, "ann", "w1", "h1", "net.tx.wan.bytes", Decimal(60), NOW)]
    [standing] = standings_for(_view(QUOTAS, events, NOW), "ann", [])
    assert standing.recent_since == datetime(2026, 12, 2, 10, tzinfo=UTC)
    # 940 left at 120 an hour: 7 h 50 min.
    assert standing.projected == NOW + timedelta(hours=7, minutes=50)
