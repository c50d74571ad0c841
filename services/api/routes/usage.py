"""GET /v1/subjects/{subject}/usage: exact usage totals from the hourly rollups."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import date, datetime
from typing import Annotated

import asyncpg
from fastapi import APIRouter, Depends, Query

from ..auth import ReadableSubject
from ..deps import ClockDep, MaxSkewDep, PoolDep
from ..humanize import unit_of
from ..models import GroupBy, UsagePublic, UsageRow
from ..ranges import bad, check_metric, check_tz, hour_range
from ..store import usage_totals

router = APIRouter(tags=["usage"])


@dataclass(frozen=True)
class UsageQuery:
    start: datetime
    end: datetime
    metric: str | None
    group_by: GroupBy
    tz: str


async def _usage_query(
    clock: ClockDep,
    max_skew: MaxSkewDep,
    from_: Annotated[
        str | None, Query(alias="from", description="ISO-8601 with zone; default: to - 30 days")
    ] = None,
    to: Annotated[
        str | None,
        Query(
            description="ISO-8601 with zone; default: now, up to the end of the hour that "
            "holds now + TOLLGATE_MAX_CLOCK_SKEW (where quota windows end)"
        ),
    ] = None,
    metric: Annotated[str | None, Query(description="only this metric")] = None,
    group_by: Annotated[GroupBy, Query(description="split totals by this")] = GroupBy.METRIC,
    tz: Annotated[str, Query(description="IANA time zone for group_by=day")] = "UTC",
) -> UsageQuery:
    span = hour_range(from_, to, clock(), max_skew)
    return UsageQuery(span.start, span.end, check_metric(metric), group_by, check_tz(tz))


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
        raise bad(f"tz: Postgres does not know the time zone {query.tz!r}") from None
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
            "unit": unit_of(metric),
            "total": total,
            "events": events,
            **fields,
        }
    )
