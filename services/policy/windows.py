"""Quota windows, pure: where a window starts, which instance of it is current, when it frees.

Usage is kept in hour buckets (the ledger's rollup grain), so rolling and calendar windows
are evaluated in O(buckets). `workload_hour` windows are counted in minute buckets from the
workload's start minute, so they follow the workload, not the clock.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from zoneinfo import ZoneInfo

from .config import Window

HOUR = timedelta(hours=1)
MINUTE = timedelta(minutes=1)


def floor_hour(t: datetime) -> datetime:
    """The hour bucket `t` falls in, in UTC."""
    return t.astimezone(UTC).replace(minute=0, second=0, microsecond=0)


def floor_minute(t: datetime) -> datetime:
    """The minute bucket `t` falls in, in UTC."""
    return t.astimezone(UTC).replace(second=0, microsecond=0)


def calendar_bounds(window: Window, now: datetime) -> tuple[datetime, datetime]:
    """Start and end of the current calendar period in the window's time zone, in UTC."""
    tz = ZoneInfo(window.tz)
    local = now.astimezone(tz)
    day = local.replace(hour=0, minute=0, second=0, microsecond=0)
    if window.calendar == "day":
        start, end = day, day + timedelta(days=1)
    elif window.calendar == "week":
        start = day - timedelta(days=day.weekday())
        end = start + timedelta(days=7)
    else:
        start = day.replace(day=1)
        end = (start + timedelta(days=32)).replace(day=1)
    # Re-attach the zone so DST changes inside the period land on local midnight.
    start = start.replace(tzinfo=None).replace(tzinfo=tz)
    end = end.replace(tzinfo=None).replace(tzinfo=tz)
    return start.astimezone(UTC), end.astimezone(UTC)


def reads_until(now: datetime, max_skew: timedelta) -> datetime:
    """Where every read of usage at `now` ends (exclusive, on a whole hour).

    The ledger places usage no later than `max_skew` after JetStream stored it, so the hour
    holding `now + max_skew` is the last one that can hold usage. Spawn checks, quotas,
    usage, reports and the page all end their windows here: usage dated later (a bad clock
    before the ledger clamped times) counts in none of them, never in some and not others.
    """
    return floor_hour(now + max_skew) + HOUR


def window_start(window: Window, now: datetime) -> datetime | None:
    """First hour bucket that counts; None for lifetime (everything counts).

    Rolling windows count the whole hour bucket their start falls in, so they can count up
    to an hour more than the exact window: strict by at most an hour, never lenient.
    Calendar periods in zones with half-hour offsets likewise start at the hour bucket.
    """
    if window.rolling is not None:
        return floor_hour(now - window.rolling)
    if window.calendar is not None:
        return floor_hour(calendar_bounds(window, now)[0])
    if window.workload_hour:
        return floor_hour(now - HOUR)
    return None


def horizon(window: Window) -> timedelta | None:
    """How far back this window can ever look from now (None: forever)."""
    if window.rolling is not None:
        return window.rolling + HOUR
    if window.calendar is not None:
        return {"day": timedelta(days=1), "week": timedelta(days=7)}.get(
            window.calendar, timedelta(days=31)
        ) + timedelta(days=1)
    if window.workload_hour:
        return 2 * HOUR
    return None


def workload_hour_index(started: datetime, t: datetime) -> int:
    """Which hour of a workload's life `t` is in, counted from its start minute."""
    return int((floor_minute(t) - floor_minute(started)) // HOUR)


def workload_hour_bounds(started: datetime, index: int) -> tuple[datetime, datetime]:
    start = floor_minute(started) + index * HOUR
    return start, start + HOUR


def period_of(window: Window, now: datetime, started: datetime | None = None) -> str:
    """A label for the instance of the window that is current: actions happen once per it.

    Rolling and lifetime windows have one instance (an episode lasts while the quota is
    crossed); calendar windows one per period; workload_hour one per hour of the workload.
    """
    if window.calendar is not None:
        return calendar_bounds(window, now)[0].strftime("%Y-%m-%dT%H:%MZ")
    if window.workload_hour:
        return f"h{workload_hour_index(started or now, now)}"
    return "rolling" if window.rolling is not None else "lifetime"


def returns_at(
    window: Window,
    used: Decimal,
    buckets: Iterable[tuple[datetime, Decimal]],
    now: datetime,
    fits: Callable[[Decimal], bool],
) -> datetime | None:
    """When usage will `fit` again if nothing more is used; None if it fits now or never will.

    Rolling: when enough of the oldest hour buckets have left the window. Calendar: at the
    end of the period. Lifetime and workload_hour quotas do not come back by themselves.
    """
    if fits(used):
        return None
    if window.rolling is not None:
        remaining = used
        for hour, amount in sorted(buckets):
            remaining -= amount
            if fits(remaining):
                return hour + HOUR + window.rolling
        return None
    if window.calendar is not None and fits(Decimal(0)):
        return calendar_bounds(window, now)[1]
    return None
