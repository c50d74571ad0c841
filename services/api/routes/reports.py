"""GET /v1/reports/usage: every subject's usage per metric, as JSON or CSV (admins)."""

from __future__ import annotations

import csv
import io
from collections import defaultdict
from datetime import date
from decimal import Decimal
from typing import Annotated

from fastapi import APIRouter, Query
from fastapi.responses import Response

from contracts import format_decimal
from services.policy.prices import to_money

from ..auth import AdminUser
from ..deps import ClockDep, ConfigDep, MaxSkewDep, PoolDep
from ..humanize import unit_of
from ..models import MetricTotal, ReportFormat, ReportGroupBy, ReportRow, UsageReportPublic
from ..ranges import bad, check_metric, hour_range
from ..store import ReportTotal, usage_report

router = APIRouter(tags=["reports"])
MAX_ROWS = 100_000
CSV_TYPE = "text/csv; charset=utf-8"


@router.get(
    "/v1/reports/usage",
    response_model=UsageReportPublic,
    responses={200: {"content": {"text/csv": {}}}, 401: {}, 403: {}, 422: {}},
)
async def get_usage_report(
    _: AdminUser,
    pool: PoolDep,
    clock: ClockDep,
    config: ConfigDep,
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
    group_by: Annotated[
        ReportGroupBy, Query(description="split each subject's totals further by this")
    ] = ReportGroupBy.SUBJECT,
    metric: Annotated[str | None, Query(description="only this metric")] = None,
    format: Annotated[ReportFormat, Query(description="json, or csv for spreadsheets")] = (
        ReportFormat.JSON
    ),
) -> UsageReportPublic | Response:
    """Usage totals per subject and metric over a range (whole UTC hours), with totals, and
    with the quota file's prices, what each costs (each hour at the price in force then)."""
    span = hour_range(from_, to, clock(), max_skew)
    metric = check_metric(metric)
    book = config.pricebook
    found = await usage_report(
        pool, span.start, span.end, metric, group_by, MAX_ROWS, sorted(book.metrics)
    )
    if found.truncated:
        raise bad(
            f"the report has more than {MAX_ROWS} rows; narrow from/to, pick one metric, "
            "or group by subject"
        )
    costs: dict[tuple[str, str, object], Decimal] = defaultdict(Decimal)
    for h in found.priced:
        costs[(h.subject, h.metric, h.group)] += book.cost(h.metric, h.gpu_model, h.hour, h.total)
    rows = [_row(group_by, t, costs.get((t.subject, t.metric, t.group))) for t in found.rows]
    if format is ReportFormat.CSV:
        name = f"tollgate-usage-{span.start:%Y%m%dT%H}-{span.end:%Y%m%dT%H}.csv"
        return Response(
            _csv(group_by, rows, book.currency),
            media_type=CSV_TYPE,
            headers={
                "Content-Disposition": f'attachment; filename="{name}"',
                "Tollgate-As-Of-Seq": str(found.as_of_seq),
            },
        )
    return UsageReportPublic(
        from_=span.start,
        to=span.end,
        group_by=group_by,
        metric=metric,
        subjects=len({r.subject for r in rows}),
        rows=rows,
        totals=_totals(rows, costs),
        currency=book.currency,
        total_cost=to_money(sum(costs.values(), Decimal(0))) if book.currency else None,
        as_of_seq=found.as_of_seq,
        as_of=found.as_of,
    )


def _row(group_by: ReportGroupBy, t: ReportTotal, cost: Decimal | None) -> ReportRow:
    extra: dict[str, object] = {}
    if group_by is not ReportGroupBy.SUBJECT:
        extra[group_by.value] = t.group
    if cost is not None:
        extra["cost"] = to_money(cost)
    return ReportRow.model_validate(
        {"subject": t.subject, "metric": t.metric, "unit": unit_of(t.metric),
         "total": t.total, "events": t.events, **extra}
    )  # fmt: skip


def _totals(
    rows: list[ReportRow], costs: dict[tuple[str, str, object], Decimal]
) -> list[MetricTotal]:
    sums: dict[str, tuple[Decimal, int]] = {}
    for r in rows:
        total, events = sums.get(r.metric, (Decimal(0), 0))
        sums[r.metric] = (total + r.total, events + r.events)
    # A metric's cost is the exact sum, rounded once (not the sum of rounded row costs).
    by_metric: dict[str, Decimal] = defaultdict(Decimal)
    for (_, metric, _), cost in costs.items():
        by_metric[metric] += cost
    return [
        MetricTotal(
            metric=m, unit=unit_of(m), total=t, events=e,
            cost=to_money(by_metric[m]) if m in by_metric else None,
        )
        for m, (t, e) in sorted(sums.items())
    ]  # fmt: skip


def _csv(group_by: ReportGroupBy, rows: list[ReportRow], currency: str | None) -> str:
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\r\n")
    group = [] if group_by is ReportGroupBy.SUBJECT else [group_by.value]
    priced = ["cost", "currency"] if currency else []
    writer.writerow(["subject", *group, "metric", "unit", "total", "events", *priced])
    for r in rows:
        value = getattr(r, group_by.value) if group else None
        cells = [] if not group else [value.isoformat() if isinstance(value, date) else value]
        money = (
            []
            if not currency
            else (["", ""] if r.cost is None else [format_decimal(r.cost), currency])
        )
        writer.writerow([_cell(r.subject), *map(_cell, cells), r.metric, r.unit,
                         r.model_dump(mode="json")["total"], r.events, *money])  # fmt: skip
    return out.getvalue()


def _cell(value: object) -> str:
    """A CSV cell a spreadsheet will not run as a formula (names are user-chosen)."""
    text = str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text
