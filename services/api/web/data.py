"""What the page shows, read from the same sources as the API: quotas from the policy's
evaluation over the rollups, usage from the rollups, decisions and workloads from the
policy's records."""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg

from services.policy.config import PolicyConfig
from services.policy.prices import to_money
from services.policy.store import priced_hours
from services.policy.windows import floor_hour, reads_until

from ..humanize import display_unit, human, title_of
from ..models import GroupBy
from ..records import PendingNotice, pending_notice, recent_decisions, recent_workloads
from ..store import usage_totals
from ..subjects import quotas_of
from ..tokens import Principal
from .chart import Bucket, bar_chart
from .runs import runs
from .subject import ChartView, EventView, GrantLine, QuotaView, SubjectPage, WorkloadView

DAY = timedelta(days=1)
HOUR = timedelta(hours=1)
EVENTS_SINCE = timedelta(days=30)
MICROSECOND = timedelta(microseconds=1)


@dataclass(frozen=True)
class Span:
    """The buckets a chart shows: `count` of `step`, ending with the one that holds now."""

    step: timedelta
    count: int
    per: str

    def buckets(self, now: datetime) -> list[datetime]:
        epoch = datetime(1970, 1, 1, tzinfo=UTC)
        steps = (now - epoch) // self.step
        last = epoch + steps * self.step
        return [last - (self.count - 1 - i) * self.step for i in range(self.count)]


def money(cost_units: Decimal, currency: str) -> str:
    """A cost to the cent (rounded half-even; the API keeps 6 places): '12.34 USD'."""
    return f"{to_money(cost_units).quantize(Decimal('0.01')):,} {currency}"


SPANS = {
    "24h": Span(HOUR, 24, "per hour"),
    "7d": Span(timedelta(hours=6), 28, "per 6 hours"),
    "30d": Span(DAY, 30, "per day"),
    "90d": Span(DAY, 90, "per day"),
}


def _charts(
    rows: list[tuple[str, datetime, Decimal]], starts: list[datetime], span: Span,
    first: list[str], costs: dict[str, str],
) -> list[ChartView]:  # fmt: skip
    series: dict[str, dict[datetime, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
    origin = starts[0]
    for metric, hour, total in rows:
        index = (hour - origin) // span.step
        if 0 <= index < len(starts):
            series[metric][starts[index]] += total
    order = [m for m in first if m in series] + sorted(m for m in series if m not in first)
    charts = []
    for metric in order:
        buckets = [Bucket(s, series[metric].get(s, Decimal(0))) for s in starts]
        total = sum((b.total for b in buckets), Decimal(0))
        peak = max(b.total for b in buckets)
        title = title_of(metric)
        charts.append(
            ChartView(
                metric=metric,
                title=title,
                svg=bar_chart(metric, buckets, span.step, f"{title} over time"),
                total=f"{display_unit(metric, total).show(total)} in total",
                per=f"{display_unit(metric, peak).name or 'count'} {span.per}",
                cost=costs.get(metric),
            )
        )
    return charts


async def _workload_usage(
    pool: asyncpg.Pool, subject: str, workloads: list[asyncpg.Record], now: datetime
) -> dict[str, list[str]]:
    """What each listed workload used over its life, in units people read."""
    starts = [r["started_at"] for r in workloads if r["started_at"] is not None]
    if not workloads:
        return {}
    since = floor_hour(min(starts)) if starts else now - 90 * DAY
    usage = await usage_totals(pool, subject, since, now + HOUR, None, GroupBy.WORKLOAD, "UTC")
    listed = {r["workload"] for r in workloads}
    out: dict[str, list[str]] = defaultdict(list)
    for t in usage.rows:
        if t.group in listed and t.total > 0:
            out[str(t.group)].append(f"{title_of(t.metric)} {human(t.metric, t.total)}")
    return out


async def _notices(
    pool: asyncpg.Pool, subject: str, workloads: list[asyncpg.Record]
) -> dict[str, PendingNotice]:
    """The pending termination notice of each listed workload still running."""
    found = {}
    for r in workloads:
        if r["stopped_at"] is None and (n := await pending_notice(pool, r["workload"], subject)):
            found[r["workload"]] = n
    return found


async def _costs(
    pool: asyncpg.Pool, config: PolicyConfig, subject: str, start: datetime, end: datetime
) -> tuple[dict[str, str], str | None]:
    """The cost of each priced metric shown, and of all of them, over the charts' range."""
    book = config.pricebook
    if book.currency is None:
        return {}, None
    async with pool.acquire() as conn:
        hours = await priced_hours(conn, [subject], sorted(book.metrics), start, end)
    by_metric: dict[str, Decimal] = defaultdict(Decimal)
    for _, metric, gpu_model, hour, total in hours:
        by_metric[metric] += book.cost(metric, gpu_model, hour, total)
    total = sum(by_metric.values(), Decimal(0))
    return (
        {m: money(c, book.currency) for m, c in by_metric.items()},
        money(total, book.currency),
    )


async def gather(
    pool: asyncpg.Pool,
    config: PolicyConfig,
    viewer: Principal,
    subject: str,
    range_key: str,
    now: datetime,
    max_skew: timedelta,
) -> SubjectPage:
    """Everything the page of `subject` shows, as `viewer` may see it."""
    found = await quotas_of(pool, config, subject, viewer, now, max_skew)
    span = SPANS[range_key]
    # The last bar holds the latest instant the ledger may have placed usage at, so the
    # chart ends where the quotas' windows do (`reads_until`) and drops nothing they count.
    starts = span.buckets(reads_until(now, max_skew) - MICROSECOND)
    usage = await usage_totals(
        pool, subject, starts[0], starts[-1] + span.step, None, GroupBy.HOUR, "UTC"
    )
    rows = [(t.metric, t.group, t.total) for t in usage.rows if isinstance(t.group, datetime)]
    quota_metrics = list(dict.fromkeys(q.metric for q in found.quotas))
    # Enough decisions that 8 lines remain after repeats collapse into one line each.
    decisions = runs(await recent_decisions(pool, subject, now - EVENTS_SINCE, limit=400), 8)
    workloads = await recent_workloads(pool, subject)
    used_by = await _workload_usage(pool, subject, workloads, now)
    notices = await _notices(pool, subject, workloads)
    costs, total_cost = await _costs(pool, config, subject, starts[0], starts[-1] + span.step)
    return SubjectPage(
        subject=subject,
        viewer=viewer,
        now=now,
        range_key=range_key,
        groups=found.groups,
        quotas=[
            QuotaView(
                name=st.name,
                metric=st.metric,
                window_text=q.window.describe(),
                unit=st.unit,
                used=st.used,
                limit=st.limit,
                remaining=st.remaining,
                state=st.state,
                retry_at=st.retry_at,
                enforce=st.enforce,
                warn_at=q.warn_at,
                projected=st.projected_exhaustion_at,
                mode=st.mode,
                note=st.note,
                enforced=st.enforced,
                base_limit=st.base_limit,
                grants=[GrantLine(g.grant_id, g.amount, g.expires_at, g.scope) for g in st.grants],
            )
            for q, st in zip(found.quotas, found.statuses, strict=True)
        ],
        charts=_charts(rows, starts, span, quota_metrics, costs),
        cost=total_cost,
        events=[
            EventView(
                kind=r.latest["kind"],
                decided_at=r.latest["decided_at"],
                message=r.latest["message"],
                decision_id=r.latest["decision_id"],
                workload=r.latest["workload"],
                allowed=r.latest["allowed"],
                fail_open=r.latest["fail_open"],
                count=r.count,
                first_at=r.first_at,
            )
            for r in decisions
        ],
        workloads=[
            WorkloadView(
                workload=r["workload"],
                host=r["host"],
                started_at=r["started_at"],
                stopped_at=r["stopped_at"],
                exit_status=r["exit_status"],
                stop_reason=r["stop_reason"],
                usage=used_by.get(r["workload"], ()),
                terminate_commands=r["terminate_commands"],
                ignored_commands=r["ignored_commands"],
                usage_after_command=r["usage_after_command"],
                resumed_from=r["resumed_from"],
                stops_at=notice.terminate_at if (notice := notices.get(r["workload"])) else None,
                notice=notice.message if notice else None,
            )
            for r in workloads
        ],
        as_of_seq=usage.as_of_seq,
        as_of=usage.as_of,
        policy_version=config.version,
    )
