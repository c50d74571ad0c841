"""When a quota runs out at the subject's recent rate, pure (the method is in the README).

The rate is the usage in the lookback (the hour buckets from `floor_hour(now - L)`, where
L = min(window length, 6 h), never before the window's start) divided by the time from the
start of the first of those buckets that holds any usage to now (so a fleet that started
minutes ago is not averaged over six empty hours). The projection is linear:
`now + remaining / rate`. For a rolling window, usage that leaves the window before that
instant is given back (each hour bucket leaves at `hour + 1 h + window`, as for
`retry_at`), so the projection walks the drop-outs. None when nothing was used in the
lookback, the quota is already used up, or the instant falls beyond the horizon: the end
of a calendar period, `now + window` for a rolling one, 100 years for a lifetime quota.
Workload-hour windows get no projection (the window is an hour of one workload).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
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


def _start(window: Window, now: datetime, since: datetime | None) -> datetime | None:
    start = lookback_start(window, now)
    return start if start is None or since is None else max(start, since)


def rate_per_second(
    window: Window, recent: Decimal, now: datetime, since: datetime | None = None
) -> Decimal:
    """Usage per second over the lookback (`recent` is what the lookback's buckets hold,
    `since` the first of them that holds any)."""
    start = _start(window, now, since)
    if start is None or recent <= 0 or now <= start:
        return ZERO
    return recent / (Decimal(_micros(now - start)) / 1_000_000)


def _integers(values: Sequence[Decimal]) -> list[int]:
    """Exact decimals as integers on one common scale (10^digits): the walk stays exact
    without the cost of fractions."""
    parts = [v.as_tuple() for v in values]
    scale = max([0, *(-int(p.exponent) for p in parts)])
    out = []
    for p in parts:
        n = int("".join(map(str, p.digits)) or "0") * 10 ** (int(p.exponent) + scale)
        out.append(-n if p.sign else n)
    return out


def projected_exhaustion(
    window: Window,
    limit: Decimal,
    used: Decimal,
    recent: Decimal,
    now: datetime,
    buckets: Callable[[], Iterable[tuple[datetime, Decimal]]] = list,
    since: datetime | None = None,
) -> datetime | None:
    """When `used` reaches `limit` at the lookback's rate; see the module's docstring.

    Exact (integers on a common decimal scale, microseconds), rounded up at the end.
    `buckets` gives the window's hour buckets; it is only called for a rolling window whose
    projection lies inside the horizon yet beyond the first instant usage could leave it.
    """
    start = _start(window, now, since)
    if used >= limit or start is None or recent <= 0 or now <= start:
        return None
    elapsed = _micros(now - start)
    end = horizon_end(window, now)
    reach = _after(now, (Fraction(limit) - Fraction(used)) * elapsed / Fraction(recent))
    if reach > end:
        return None  # usage leaving a rolling window only ever postpones it
    rolling = window.rolling
    # The oldest bucket in the window leaves it at floor_hour(now - rolling) + 1 h + rolling.
    if rolling is None or reach <= floor_hour(now - rolling) + HOUR + rolling:
        return reach
    found = sorted((hour + HOUR + rolling, amount) for hour, amount in buckets() if amount)
    lim, level, rate, *amounts = _integers([limit, used, recent, *(a for _, a in found)])
    # In units of (scaled amount x microseconds): level * elapsed grows by rate per µs.
    t, need = 0, (lim - level) * elapsed  # need: what is left, times elapsed
    for (drop_at, _), amount in zip(found, amounts, strict=True):
        at = _micros(drop_at - now)
        if at <= t:
            need += amount * elapsed  # already out of the window
            continue
        if need <= rate * (at - t):
            break  # reached before this bucket leaves
        need += amount * elapsed - rate * (at - t)
        t = at
    reach = now + MICRO * t
    reach = _after(reach, Fraction(need, rate))
    return None if reach > end else reach
