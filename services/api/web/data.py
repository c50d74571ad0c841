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
from services.policy.windows import reads_until

from ..humanize import display_unit, title_of
from ..models import GroupBy
from ..records import recent_decisions, recent_workloads
from ..store import usage_totals
from ..subjects import quotas_of
from ..tokens import Principal
from .chart import Bucket, bar_chart
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


SPANS = {
    "24h": Span(HOUR, 24, "per hour"),
    "7d": Span(timedelta(hours=6), 28, "per 6 hours"),
    "30d": Span(DAY, 30, "per day"),
    "90d": Span(DAY, 90, "per day"),
}


def _charts(
    rows: list[tuple[str, datetime, Decimal]], starts: list[datetime], span: Span,
    first: list[str],
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
            )
        )
    return charts


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
    decisions = await recent_decisions(pool, subject, now - EVENTS_SINCE)
    workloads = await recent_workloads(pool, subject)
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
                mode=st.mode,
                note=st.note,
                enforced=st.enforced,
                base_limit=st.base_limit,
                grants=[GrantLine(g.grant_id, g.amount, g.expires_at, g.scope) for g in st.grants],
            )
            for q, st in zip(found.quotas, found.statuses, strict=True)
        ],
        charts=_charts(rows, starts, span, quota_metrics),
        events=[
            EventView(
                kind=r["kind"],
                decided_at=r["decided_at"],
                message=r["message"],
                decision_id=r["decision_id"],
                workload=r["workload"],
                allowed=r["allowed"],
                fail_open=r["fail_open"],
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
                terminate_commands=r["terminate_commands"],
                ignored_commands=r["ignored_commands"],
                usage_after_command=r["usage_after_command"],
                resumed_from=r["resumed_from"],
            )
            for r in workloads
        ],
        as_of_seq=usage.as_of_seq,
        as_of=usage.as_of,
        policy_version=config.version,
    )
