"""Time ranges from query parameters: ISO-8601 with a zone, widened to whole hours.

The ledger keeps usage in hour buckets, so every range is widened to whole hours and
the reply says which range it used.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from fastapi import HTTPException
from pydantic import TypeAdapter, ValidationError

from contracts._base import MetricName, Name
from services.policy.windows import reads_until

DEFAULT_RANGE = timedelta(days=30)
MAX_RANGE = timedelta(days=400)
HOUR = timedelta(hours=1)
_METRIC: TypeAdapter[str] = TypeAdapter(MetricName)
_NAME: TypeAdapter[str] = TypeAdapter(Name)
MAX_TZ = 64  # the longest IANA name is 32 characters


@dataclass(frozen=True)
class HourRange:
    """[start, end) on whole UTC hours."""

    start: datetime
    end: datetime


def bad(message: str) -> HTTPException:
    return HTTPException(422, message)


def parse_time(name: str, text: str) -> datetime:
    """An ISO-8601 time with a zone, as UTC; 422 naming the parameter otherwise."""
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        # An unencoded '+' in a query string arrives as a space.
        hint = "; a '+' in a URL must be written %2B" if " " in text.strip() else ""
        raise bad(
            f"{name}: {text!r} is not an ISO-8601 time; write e.g. 2026-11-01T00:00:00Z{hint}"
        ) from None
    if value.tzinfo is None:
        raise bad(
            f"{name}: {text!r} has no time zone; add one, e.g. 2026-11-01T00:00:00Z "
            "or 2026-11-01T00:00:00+01:00"
        )
    if not 1970 <= value.year <= 9000:
        raise bad(f"{name}: {text!r} is outside the years 1970 to 9000")
    return value.astimezone(UTC)


def floor_hour(t: datetime) -> datetime:
    return t.replace(minute=0, second=0, microsecond=0)


def ceil_hour(t: datetime) -> datetime:
    floor = floor_hour(t)
    return floor if floor == t else floor + HOUR


def hour_range(from_: str | None, to: str | None, now: datetime, max_skew: timedelta) -> HourRange:
    """`from`/`to` as given, checked and widened to hours.

    By default the 30 days up to now, ending where quota windows end (`reads_until`): with
    the hour ahead when the ledger may already have placed usage in it, so the default
    range and the quotas count the same usage.
    """
    end = parse_time("to", to) if to is not None else now
    start = parse_time("from", from_) if from_ is not None else end - DEFAULT_RANGE
    if start >= end:
        raise bad(f"from ({start.isoformat()}) must be before to ({end.isoformat()})")
    if end - start > MAX_RANGE:
        raise bad(
            f"the range is {(end - start).days} days; ask for at most {MAX_RANGE.days} days "
            "per request; split longer periods into several requests"
        )
    last = ceil_hour(end) if to is not None else reads_until(now, max_skew)
    return HourRange(floor_hour(start), last)


def check_metric(metric: str | None) -> str | None:
    if metric is None:
        return None
    try:
        return _METRIC.validate_python(metric)
    except ValidationError as exc:
        raise bad("metric: " + exc.errors()[0]["msg"].removeprefix("Value error, ")) from None


def check_tz(tz: str) -> str:
    try:
        if len(tz) > MAX_TZ or "\x00" in tz:
            raise ValueError(tz)
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError, OSError):
        shown = tz if len(tz) <= MAX_TZ else tz[:MAX_TZ] + "…"
        raise bad(
            f"tz: {shown!r} is not a time zone; use an IANA name like 'Europe/Berlin'"
        ) from None
    return tz


def check_name(param: str, value: str) -> str:
    """A subject or workload name from a path or query; 422 naming `param` otherwise."""
    try:
        return _NAME.validate_python(value)
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise bad(f"{param}: {reason}") from None
