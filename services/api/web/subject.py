"""The page a subject sees: quota bars, usage charts, decisions and workloads."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from html import escape as e
from urllib.parse import urlencode

from services.policy.units import format_number

from ..humanize import disobeying
from ..tokens import Principal, Role
from .page import layout, span, when

SEVERITY = {"exceeded": 0, "warning": 1, "ok": 2}
STATE_TEXT = {"ok": "OK", "warning": "Warning", "exceeded": "Exceeded"}
KIND_TEXT = {
    "terminate": "Workload terminated",
    "block": "Spawns blocked",
    "unblock": "Spawns allowed again",
    "warning": "Quota warning",
    "exceeded": "Quota exceeded",
}
RANGES = ("24h", "7d", "30d", "90d")
RANGE_TEXT = {"24h": "24 hours", "7d": "7 days", "30d": "30 days", "90d": "90 days"}


@dataclass(frozen=True)
class QuotaView:
    name: str
    metric: str
    window_text: str
    unit: str
    used: Decimal
    limit: Decimal
    remaining: Decimal
    state: str
    retry_at: datetime | None
    enforce: Sequence[str]
    warn_at: Sequence[Decimal]
    projected: datetime | None = None  # when it runs out at the recent rate
    mode: str = "hard"
    note: str | None = None  # e.g. 'over by 0.3 GiB·h, within grace (...)'
    enforced: bool = False
    base_limit: Decimal | None = None
    grants: Sequence[GrantLine] = ()

    @property
    def money(self) -> bool:
        return self.metric == "cost"


@dataclass(frozen=True)
class GrantLine:
    """A grant included in a quota's limit, as the card shows it."""

    grant_id: str
    amount: Decimal
    expires_at: datetime
    scope: str = "subject"


@dataclass(frozen=True)
class ChartView:
    metric: str
    title: str
    svg: str
    total: str
    per: str  # what one bar is, e.g. 'GiB·h per day'
    cost: str | None = None  # what the usage shown costs, e.g. '12.34 USD'


@dataclass(frozen=True)
class EventView:
    kind: str
    decided_at: datetime
    message: str
    decision_id: str
    workload: str | None
    allowed: bool | None
    fail_open: bool
    count: int = 1  # the same decision this many times in a row (the newest shown)
    first_at: datetime | None = None


@dataclass(frozen=True)
class WorkloadView:
    workload: str
    host: str
    started_at: datetime | None
    stopped_at: datetime | None
    exit_status: int | None
    stop_reason: str | None
    usage: Sequence[str] = ()  # what it used, e.g. 'CPU used 3.2 core·h'
    terminate_commands: int = 0
    ignored_commands: int = 0
    usage_after_command: datetime | None = None
    resumed_from: datetime | None = None
    # A termination announced and still pending: when, and the sentence the workload got.
    stops_at: datetime | None = None
    notice: str | None = None


@dataclass
class SubjectPage:
    subject: str
    viewer: Principal
    now: datetime
    range_key: str
    groups: Sequence[str] = ()
    quotas: Sequence[QuotaView] = ()
    charts: Sequence[ChartView] = ()
    events: Sequence[EventView] = ()
    workloads: Sequence[WorkloadView] = ()
    as_of_seq: int = 0
    as_of: datetime | None = None
    policy_version: str = ""
    notes: list[str] = field(default_factory=list)
    cost: str | None = None  # of all priced usage in the charts' range


def _quota_card(q: QuotaView, now: datetime) -> str:
    fraction = (q.used / q.limit) if q.limit > 0 else Decimal(1 if q.used > 0 else 0)
    pct = float(fraction) * 100
    fill = min(pct, 100.0)
    ticks = "".join(
        f'<line class="tick" x1="{float(w) * 100:.2f}" x2="{float(w) * 100:.2f}" y1="0" y2="8" '
        'vector-effect="non-scaling-stroke"/>'
        for w in q.warn_at
    )
    unit = f" {e(q.unit)}" if q.unit else ""
    number = _cents if q.money else format_number
    if q.state == "exceeded":
        foot = f"Over by {number(q.used - q.limit)}{unit}"
    else:
        foot = f"{number(q.remaining)}{unit} left"
    enforce = ", ".join(q.enforce) or "report only"
    enforced_on = f"enforced on {e(enforce)}"
    if q.mode == "soft":
        enforced_on = "soft limit: reported, never enforced"
    returns = ""
    if q.retry_at is not None:
        returns = (
            f'<div class="returns">Quota returns {when(q.retry_at)} '
            f"(in {span(q.retry_at - now)})</div>"
        )
    elif q.state == "exceeded":
        returns = '<div class="returns">Quota returns when the window starts over</div>'
    if q.projected is not None:
        returns += (
            f'<div class="forecast" data-projected="{q.projected.isoformat()}">At this rate you '
            f"run out on {q.projected:%d %b} at {q.projected:%H:%M} UTC "
            f"(in {span(q.projected - now)})</div>"
        )
    return (
        f'<article class="card quota {e(q.state)}" data-quota="{e(q.name)}" '
        f'data-state="{e(q.state)}">'
        f'<div class="head"><span class="name">{e(q.name)}</span>'
        f'<span class="pill {e(q.state)}">{STATE_TEXT.get(q.state, e(q.state))}</span>'
        f"{_mode_pill(q)}</div>"
        f'<div class="what">{e(q.metric)} · {e(q.window_text)}</div>'
        f'<div class="numbers"><span class="used">{number(q.used)}'
        f"<small> of {number(q.limit)}{unit}</small></span>"
        f'<span class="pct">{pct:.0f}%</span></div>'
        '<svg class="bar" viewBox="0 0 100 8" preserveAspectRatio="none" role="img" '
        f'aria-label="{pct:.0f}% used"><rect class="track" width="100" height="8" rx="4"/>'
        f'<rect class="fill" width="{fill:.2f}" height="8" rx="4"/>{ticks}</svg>'
        f'<div class="foot">{foot} · {enforced_on}</div>{_limit_lines(q, unit, now)}{returns}'
        "</article>"
    )


def _cents(value: Decimal) -> str:
    """Money to the cent (rounded half-even): '12.34'."""
    return f"{value.quantize(Decimal('0.01')):,}"


def _limit_lines(q: QuotaView, unit: str, now: datetime) -> str:
    """Grants in the limit, and what being over means (grace, soft)."""
    out = ""
    if q.note:
        out += f'<div class="note" data-enforced="{str(q.enforced).lower()}">{e(q.note)}</div>'
    for g in q.grants:
        pool = " for the group pool" if g.scope == "group" else ""
        out += (
            f'<div class="grant" data-grant="{e(g.grant_id)}">Includes grant {e(g.grant_id)}'
            f"{pool}: +{_number(q, g.amount)}{unit} until {when(g.expires_at)} "
            f"(in {span(g.expires_at - now)})</div>"
        )
    if q.grants and q.base_limit is not None:
        out += f'<div class="muted small">Configured limit {_number(q, q.base_limit)}{unit}</div>'
    return out


def _number(q: QuotaView, value: Decimal) -> str:
    return _cents(value) if q.money else format_number(value)


def _mode_pill(q: QuotaView) -> str:
    if q.mode == "soft":
        return '<span class="pill">Soft</span>'
    if q.state == "exceeded" and not q.enforced:
        return '<span class="pill warning">Within grace</span>'
    return ""


def _chart_card(c: ChartView) -> str:
    cost = f' · <span class="cost">{e(c.cost)}</span>' if c.cost else ""
    return (
        f'<article class="card chart-card" data-metric="{e(c.metric)}">'
        f'<div class="title"><b>{e(c.title)}</b><span>{e(c.total)}{cost}</span></div>'
        f'<div class="sub">{e(c.metric)} · {e(c.per)}</div>{c.svg}</article>'
    )


def _event(ev: EventView) -> str:
    if ev.kind == "spawn":
        what = "Spawn allowed without a check" if ev.fail_open else "Spawn denied"
    else:
        what = KIND_TEXT.get(ev.kind, ev.kind)
    target = f" · {e(ev.workload)}" if ev.workload else ""
    repeat = times = ""
    if ev.count > 1:
        times = f' <span class="count">&times;{ev.count}</span>'
        since = f" (first at {when(ev.first_at)})" if ev.first_at else ""
        repeat = f'<div class="repeat">last at {when(ev.decided_at)}{since}</div>'
    return (
        f'<tr class="event" data-kind="{e(ev.kind)}" data-count="{ev.count}">'
        f'<td class="when">{when(ev.decided_at)}</td>'
        f"<td><b>{e(what)}</b>{times}{target}{repeat}<div class=msg>{e(ev.message)}</div>"
        f'<div class="id">tollgate explain {e(_short(ev.decision_id))}</div></td></tr>'
    )


def _short(decision_id: str) -> str:
    """Ids are long hex; `tollgate explain` takes any unique prefix of them."""
    return decision_id if len(decision_id) <= 24 else decision_id[:12]


def _workload(w: WorkloadView) -> str:
    ended = "still running" if w.stopped_at is None else when(w.stopped_at)
    if w.stopped_at is None and w.ignored_commands:
        state = '<span class="pill exceeded">ignores terminate</span>'
        ended = disobeying(w.ignored_commands, w.host, w.usage_after_command)
    elif w.stopped_at is None and w.stops_at is not None:
        state = f'<span class="pill warning">stops {when(w.stops_at)}</span>'
        ended = f'still running<div class="notice small">{e(w.notice or "")}</div>'
    elif w.stopped_at is None:
        state = '<span class="pill ok">running</span>'
        if w.resumed_from is not None:
            ended = f"running again after it stopped at {when(w.resumed_from)}"
    elif w.stop_reason:
        state = f'<span class="pill exceeded">{e(w.stop_reason)}</span>'
    else:
        code = "" if w.exit_status is None else f" ({w.exit_status})"
        state = f'<span class="pill">stopped{e(code)}</span>'
    used = " · ".join(e(u) for u in w.usage) or "no usage yet"
    return (
        f'<tr class="workload" data-workload="{e(w.workload)}"><td><b>{e(w.workload)}</b>'
        f'<div class=id>{e(w.host)}</div><div class="usage small">{used}</div></td>'
        f'<td class="when">{when(w.started_at)}<br>{ended}</td><td>{state}</td></tr>'
    )


def render(p: SubjectPage) -> str:
    groups = ", ".join(p.groups) or "none"
    lag = ""
    if p.as_of is not None:
        age = p.now - p.as_of
        lag = " (just now)" if age < timedelta(seconds=5) else f" ({span(age)} ago)"
    as_of = f"usage as of ledger seq {p.as_of_seq:,}{lag}" if p.as_of_seq else "no usage yet"
    urgent = sorted(p.quotas, key=lambda q: (SEVERITY.get(q.state, 3), q.name))
    quotas = (
        '<div class="grid">' + "".join(_quota_card(q, p.now) for q in urgent) + "</div>"
        if p.quotas
        else '<div class="card empty-state">No quota applies to you.</div>'
    )
    tabs = "".join(
        f'<a class="{"on" if k == p.range_key else ""}" href="/?{_query(p, k)}">{RANGE_TEXT[k]}</a>'
        for k in RANGES
    )
    charts = (
        '<div class="grid charts">' + "".join(_chart_card(c) for c in p.charts) + "</div>"
        if p.charts
        else f'<div class="card empty-state">No usage in the last {RANGE_TEXT[p.range_key]}.</div>'
    )
    events = (
        "<table><tbody>" + "".join(_event(ev) for ev in p.events) + "</tbody></table>"
        if p.events
        else '<p class="empty-state">No denials, warnings or terminations in the last 30 days.</p>'
    )
    workloads = (
        "<table><thead><tr><th>Workload</th><th>Started / ended</th><th>State</th></tr></thead>"
        "<tbody>" + "".join(_workload(w) for w in p.workloads) + "</tbody></table>"
        if p.workloads
        else '<p class="empty-state">No workloads announced to the policy yet.</p>'
    )
    notes = "".join(f'<p class="muted small">{e(n)}</p>' for n in p.notes)
    cost = (
        f'<span class="total-cost">Cost in the last {RANGE_TEXT[p.range_key]}: {e(p.cost)}</span>'
        if p.cost
        else ""
    )
    body = (
        f'<main class="wrap"><section class="hero"><h1>{e(p.subject)}</h1>'
        f'<p class="muted">Groups: {e(groups)} · {e(as_of)}</p></section>'
        f"<section><h2>Quotas</h2>{quotas}</section>"
        f'<section><div class="section-head"><h2>Usage over time</h2>{cost}'
        f'<nav class="tabs">{tabs}'
        f"</nav></div>{charts}</section>"
        '<section class="cols"><div class="card"><h2>Recent denials and terminations</h2>'
        f'{events}</div><div class="card"><h2>Workloads</h2>{workloads}</div></section>'
        f"{notes}</main>"
        f'<footer class="wrap muted">Tollgate · quota file version {e(p.policy_version)} · '
        'numbers in the API: <a href="/docs">/docs</a></footer>'
    )
    return layout(p.subject, body, p.viewer)


def _query(p: SubjectPage, range_key: str) -> str:
    params = {"range": range_key}
    if p.viewer.role is not Role.USER:
        params["subject"] = p.subject
    return e(urlencode(params))
