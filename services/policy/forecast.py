"""When a quota runs out at the subject's recent rate, pure (the method is in the README).

The rate is the usage in the lookback (the hour buckets from `floor_hour(now - L)`, where
L = min(window length, 6 h), never before the window's start) divided by the time from the
lookback's start to now. The projection is linear: `now + remaining / rate`. For a rolling
window, usage that leaves the window before that instant is given back (each hour bucket
leaves at `hour + 1 h + window`, as for `retry_at`), so the projection walks the drop-outs.
None when nothing was used in the lookback, the quota is already used up, or the instant
falls beyond the horizon: the end of a calendar period, `now + window` for a rolling one,
100 years for a lifetime quota.
Workload-hour windows get no projection (the window is an hour of one workload).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import datetime, timedelta
from decimal import Decimal
from fractions import Fraction

from .config import Window
from .windows import HOUR, calendar_bounds, floor_hour, window_start

LOOKBACK = timedelta(hours=6)
LIFETIME = timedelta(days=36525)
FAR = 2 * LIFETIME
MICRO = timedelta(microseconds=1)
ZERO = Decimal(0)


def lookback_start(window: Window, now: datetime) -> datetime | None:
    """The first hour bucket the rate is measured over; None when no forecast is made."""
    if window.workload_hour:
        return None
    span = LOOKBACK if window.rolling is None else min(window.rolling, LOOKBACK)
    start = floor_hour(now - span)
    first = window_start(window, now)
    return start if first is None else max(start, first)


def horizon_end(window: Window, now: datetime) -> datetime:
    """The latest instant a projection may name (a lifetime quota looks 100 years ahead)."""
    if window.rolling is not None:
        return now + window.rolling
    if window.calendar is not None:
        return calendar_bounds(window, now)[1]
    return now + LIFETIME


def _micros(d: timedelta) -> int:
    return d // MICRO


def _after(t: datetime, micros: Fraction) -> datetime:
    # Rounded up to the microsecond: the projection is never earlier than the exact instant.
    whole = -(-micros.numerator // micros.denominator)
    if whole > _micros(FAR):
        return t + FAR  # past every horizon: compared, then refused
    return t + MICRO * whole


def rate_per_second(window: Window, recent: Decimal, now: datetime) -> Decimal:
    """Usage per second over the lookback (`recent` is what the lookback's buckets hold)."""
    start = lookback_start(window, now)
    if start is None or recent <= 0 or now <= start:
        return ZERO
    return recent / (Decimal(_micros(now - start)) / 1_000_000)


def projected_exhaustion(
    window: Window,
    limit: Decimal,
    used: Decimal,
    recent: Decimal,
    now: datetime,
    buckets: Callable[[], Iterable[tuple[datetime, Decimal]]] = list,
) -> datetime | None:
    """When `used` reaches `limit` at the lookback's rate; see the module's docstring.

    Computed in exact fractions. `buckets` gives the window's hour buckets; it is only
    called for a rolling window whose naive projection lies beyond the first instant usage
    could leave the window.
    """
    start = lookback_start(window, now)
    if used >= limit or start is None or recent <= 0 or now <= start:
        return None
    rate = Fraction(recent) / _micros(now - start)  # per microsecond
    reach = _after(now, (Fraction(limit) - Fraction(used)) / rate)
    rolling = window.rolling
    # The oldest bucket in the window leaves it at floor_hour(now - rolling) + 1 h + rolling.
    if rolling is not None and reach > floor_hour(now - rolling) + HOUR + rolling:
        drops = sorted((hour + HOUR + rolling, amount) for hour, amount in buckets() if amount)
        t, level = now, Fraction(used)
        for drop_at, amount in drops:
            if drop_at <= t:
                level -= Fraction(amount)  # already out of the window
                continue
            reach = _after(t, (Fraction(limit) - level) / rate)
            if reach <= drop_at:
                break
            level += rate * _micros(drop_at - t) - Fraction(amount)
            t = drop_at
        else:
            reach = _after(t, (Fraction(limit) - level) / rate)
    if reach > horizon_end(window, now):
        return None
    return reach
