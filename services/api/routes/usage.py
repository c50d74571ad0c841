"""GET /v1/subjects/{subject}/usage: exact usage totals from the hourly rollups."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Annotated
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

import asyncpg
from fastapi import APIRouter, Depends, HTTPException, Query
from pydantic import TypeAdapter, ValidationError

from contracts._base import MetricName
from services.policy.units import Dimension, dimension_of

from ..auth import ReadableSubject
from ..deps import ClockDep, PoolDep
from ..models import GroupBy, UsagePublic, UsageRow
from ..store import usage_totals

router = APIRouter(tags=["usage"])

DEFAULT_RANGE = timedelta(days=30)
MAX_RANGE = timedelta(days=400)
HOUR = timedelta(hours=1)
UNITS = {Dimension.BYTES: "B", Dimension.BYTE_SECONDS: "byte·s", Dimension.SECONDS: "s"}
_METRIC: TypeAdapter[str] = TypeAdapter(MetricName)


@dataclass(frozen=True)
class UsageQuery:
    start: datetime
    end: datetime
    metric: str | None
    group_by: GroupBy
    tz: str


def _bad(message: str) -> HTTPException:
    return HTTPException(422, message)


def _parse_time(name: str, text: str) -> datetime:
    try:
        value = datetime.fromisoformat(text.strip())
    except ValueError:
        # An unencoded '+' in a query string arrives as a space.
        hint = "; a '+' in a URL must be written %2B" if " " in text.strip() else ""
        raise _bad(
            f"{name}: {text!r} is not an ISO-8601 time; write e.g. 2026-11-01T00:00:00Z{hint}"
        ) from None
    if value.tzinfo is None:
        raise _bad(
            f"{name}: {text!r} has no time zone; add one, e.g. 2026-11-01T00:00:00Z "
            "or 2026-11-01T00:00:00+01:00"
        )
    if not 1970 <= value.year <= 9000:
        raise _bad(f"{name}: {text!r} is outside the years 1970 to 9000")
    return value.astimezone(UTC)


def _floor_hour(t: datetime) -> datetime:
    return t.replace(minute=0, second=0, microsecond=0)


def _ceil_hour(t: datetime) -> datetime:
    floor = _floor_hour(t)
    return floor if floor == t else floor + HOUR


def _usage_query(
    clock: ClockDep,
    from_: Annotated[
        str | None, Query(alias="from", description="ISO-8601 with zone; default: to - 30 days")
    ] = None,
    to: Annotated[str | None, Query(description="ISO-8601 with zone; default: now")] = None,
    metric: Annotated[str | None, Query(description="only this metric")] = None,
    group_by: Annotated[GroupBy, Query(description="split totals by this")] = GroupBy.METRIC,
    tz: Annotated[str, Query(description="IANA time zone for group_by=day")] = "UTC",
) -> UsageQuery:
    end = _parse_time("to", to) if to is not None else clock()
    start = _parse_time("from", from_) if from_ is not None else end - DEFAULT_RANGE
    if start >= end:
        raise _bad(f"from ({start.isoformat()}) must be before to ({end.isoformat()})")
    if end - start > MAX_RANGE:
        raise _bad(
            f"the range is {(end - start).days} days; ask for at most {MAX_RANGE.days} days "
            "per request; split longer periods into several requests"
        )
    if metric is not None:
        try:
            metric = _METRIC.validate_python(metric)
        except ValidationError as exc:
            raise _bad("metric: " + exc.errors()[0]["msg"].removeprefix("Value error, ")) from None
    try:
        ZoneInfo(tz)
    except (ZoneInfoNotFoundError, ValueError):
        raise _bad(
            f"tz: {tz!r} is not a time zone; use an IANA name like 'Europe/Berlin'"
        ) from None
    # The ledger keeps usage in hour buckets: widen to whole hours and say so in the reply.
    return UsageQuery(_floor_hour(start), _ceil_hour(end), metric, group_by, tz)


@router.get(
    "/v1/subjects/{subject:path}/usage",
    response_model=UsagePublic,
    responses={401: {}, 404: {}, 422: {}},
)
async def get_usage(
    subject: ReadableSubject,
    query: Annotated[UsageQuery, Depends(_usage_query)],
    pool: PoolDep,
) -> UsagePublic:
    """Usage totals of a subject by metric, workload, host, hour or day, exact to the unit."""
    try:
        snapshot = await usage_totals(
            pool, subject, query.start, query.end, query.metric, query.group_by, query.tz
        )
    except asyncpg.InvalidParameterValueError:
        # Python and Postgres ship separate zone databases; they rarely disagree.
        raise _bad(f"tz: Postgres does not know the time zone {query.tz!r}") from None
    rows = [_row(query.group_by, t.metric, t.group, t.total, t.events) for t in snapshot.rows]
    return UsagePublic(
        subject=subject,
        from_=query.start,
        to=query.end,
        group_by=query.group_by,
        metric=query.metric,
        tz=query.tz,
        rows=rows,
        as_of_seq=snapshot.as_of_seq,
        as_of=snapshot.as_of,
    )


def _row(group_by: GroupBy, metric: str, group: object, total: object, events: int) -> UsageRow:
    fields: dict[str, object] = {}
    if group_by is GroupBy.WORKLOAD or group_by is GroupBy.HOST:
        fields[group_by.value] = group
    elif group_by is GroupBy.HOUR:
        assert isinstance(group, datetime)
        fields["hour"] = group
    elif group_by is GroupBy.DAY:
        assert isinstance(group, date)
        fields["day"] = group
    return UsageRow.model_validate(
        {
            "metric": metric,
            "unit": UNITS.get(dimension_of(metric), ""),
            "total": total,
            "events": events,
            **fields,
        }
    )
