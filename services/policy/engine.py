"""Enforcement, pure: from how a subject's quotas stand to the commands and events to send.

Each action happens once per crossing. Terminations carry a command id derived from the
quota, subject, window instance and workload, so re-deciding after a restart or a replay
yields the same id (and JetStream and the outbox table drop the repeat). Warnings, exceeded
events and spawn blocks are "marks": open while the condition holds in the current window
instance, closed when it stops holding, so each is sent once per episode.
"""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from decimal import Decimal

from .config import Reissue
from .domain import Standing, retry_at, unblock_at
from .notice import Cancel, Notice, Schedule, notice_id, terminate_at, why_cancelled
from .reissue import Attempt, attempt_id
from .reissue import due as next_due
from .workloads import Workload

EXCEEDED = "exceeded"
BLOCK = "block"
FORECAST = "forecast"


def warn_kind(threshold: Decimal) -> str:
    return f"warn:{threshold.normalize()}"


@dataclass(frozen=True, order=True)
class MarkKey:
    """An episode's identity: a subject (or one of its workloads) on a quota, of one kind."""

    subject: str
    quota: str
    workload: str  # "" unless the quota is per workload
    kind: str  # "warn:0.8", "exceeded" or "block"


@dataclass(frozen=True)
class Mark:
    key: MarkKey
    period: str
    until: datetime | None = None


@dataclass(frozen=True)
class Terminate:
    command_id: str
    workload: Workload
    standing: Standing
    attempt: int = 1
    previous: Attempt | None = None  # the command this one repeats (attempt > 1)
    usage_until: datetime | None = None  # the latest usage sampled, the proof it still runs
    notice: Notice | None = None  # the notice that ran out before this command

    @property
    def crossing(self) -> str:
        return self.previous.crossing if self.previous else self.command_id


@dataclass(frozen=True)
class Block:
    subject: str
    standing: Standing
    until: datetime | None


@dataclass(frozen=True)
class Unblock:
    subject: str
    quota: str
    why: str
    standing: Standing | None = None  # how the quota stands now, when it still applies


@dataclass(frozen=True)
class Warn:
    subject: str
    standing: Standing
    threshold: Decimal


@dataclass(frozen=True)
class Exceeded:
    subject: str
    standing: Standing
    retry_at: datetime | None


@dataclass(frozen=True)
class Forecast:
    """At the recent rate the quota runs out within its window (standing.projected)."""

    subject: str
    standing: Standing
    projected: datetime


Action = Terminate | Block | Unblock | Warn | Exceeded | Forecast | Schedule | Cancel


@dataclass
class Plan:
    """What one evaluation decided: actions to take and marks to open or close with them."""

    actions: list[Action] = field(default_factory=list)
    opened: list[Mark] = field(default_factory=list)
    closed: list[MarkKey] = field(default_factory=list)
    # Workloads still sending usage after their last terminate command, and when the
    # next attempt for one of them becomes due (the enforcer looks again then).
    ignoring: list[Attempt] = field(default_factory=list)
    due: datetime | None = None

    def __bool__(self) -> bool:
        return bool(self.actions or self.opened or self.closed)


def command_id(quota: str, subject: str, period: str, workload: str) -> str:
    """The id of the one termination for this crossing (also its Nats-Msg-Id)."""
    digest = hashlib.sha256("\x1f".join((quota, subject, period, workload)).encode())
    return f"term-{digest.hexdigest()[:32]}"


def _episode(
    plan: Plan,
    marks: Mapping[MarkKey, Mark],
    key: MarkKey,
    period: str,
    on: bool,
    until: datetime | None = None,
) -> tuple[bool, Mark | None]:
    """Open or close one mark; True when it opened now (the start of an episode)."""
    current = marks.get(key)
    if current is not None and current.period != period:
        current = None  # a mark from an earlier window instance is over
    if on and current is None:
        plan.opened.append(Mark(key, period, until))
        return True, None
    if not on and key in marks:
        plan.closed.append(key)
    return False, current


def key_of(marks: Mapping[MarkKey, Mark], subject: str, quota: str) -> bool:
    """Whether a spawn block of `quota` is open for `subject`."""
    return MarkKey(subject, quota, "", BLOCK) in marks


def _why_unblocked(s: Standing) -> str:
    q = s.quota
    if not q.hard:
        return "the quota is soft now"
    if q.grants and s.used >= q.base_limit * (1 + q.grace):
        return "a grant raised the limit"
    return "back under the limit"


def _give_notice(
    plan: Plan, pending: Notice | None, cid: str, w: Workload, s: Standing, now: datetime
) -> None:
    """Schedule a notice at the crossing, wait while it runs, terminate when it ran out."""
    if pending is None:
        at = terminate_at(s, now)
        plan.actions.append(Schedule(notice_id(cid, now), cid, w, s, at))
    elif now >= pending.terminate_at:
        plan.actions.append(Terminate(cid, w, s, notice=pending))
        return
    else:
        at = pending.terminate_at
    plan.due = at if plan.due is None else min(plan.due, at)


def decide(
    subject: str,
    standings: Sequence[Standing],
    running: Sequence[Workload],
    marks: Mapping[MarkKey, Mark],
    sent: Iterable[str] | set[str],
    now: datetime,
    *,
    attempts: Mapping[str, Attempt] | None = None,
    usage_until: Mapping[str, datetime] | None = None,
    reissue: Reissue | None = None,
    notices: Mapping[str, Notice] | None = None,
) -> Plan:
    """The actions a subject's standings call for, given marks already open and ids sent.

    With `reissue`, a workload that keeps sending usage after its terminate command
    (`attempts`: the latest command per crossing; `usage_until`: each workload's latest
    usage sample) is terminated again on the backoff of `reissue.py`. A quota with a notice
    schedules, fires or cancels `notices` (pending, by crossing) by the rules of `notice.py`.
    """
    sent = sent if isinstance(sent, set) else set(sent)
    plan = Plan()
    seen: set[MarkKey] = set()
    noticed: set[str] = set()  # crossings whose notice still stands
    for s in standings:
        q, workload = s.quota, s.workload or ""
        if q.per == "workload" and s.workload is None:
            continue  # the placeholder shown when no workload runs
        keys = {warn_kind(t): s.used >= q.limit * t for t in q.warn_at}
        keys[EXCEEDED] = s.exceeded
        if q.per != "workload":
            # Open while the projection lies inside the window: one event per episode.
            keys[FORECAST] = s.projected is not None and not s.exceeded
        for kind, on in keys.items():
            key = MarkKey(subject, q.name, workload, kind)
            seen.add(key)
            opened, _ = _episode(plan, marks, key, s.period, on)
            if opened and kind == EXCEEDED:
                plan.actions.append(Exceeded(subject, s, retry_at(q, s.used, s.buckets, now)))
            elif opened and kind == FORECAST:
                assert s.projected is not None
                plan.actions.append(Forecast(subject, s, s.projected))
            elif opened and not s.exceeded:
                plan.actions.append(Warn(subject, s, Decimal(kind.split(":", 1)[1])))
        if (
            "spawn" in q.enforce
            and q.per != "workload"
            and (q.hard or key_of(marks, subject, q.name))
        ):
            # Blocks follow the enforced limit (limit plus grace) of hard quotas; a quota
            # made soft while it blocked lets its block go.
            key = MarkKey(subject, q.name, "", BLOCK)
            seen.add(key)
            until = unblock_at(q, s.used, s.buckets, now) if s.breached else None
            opened, current = _episode(plan, marks, key, s.period, s.breached, until)
            if opened or (current is not None and s.breached and current.until != until):
                if not opened:
                    plan.opened.append(Mark(key, s.period, until))
                plan.actions.append(Block(subject, s, until))
            elif key in plan.closed:
                plan.actions.append(Unblock(subject, q.name, _why_unblocked(s), s))
        if "terminate" in q.enforce and s.breached:
            targets = [w for w in running if s.workload in (None, w.workload)]
            for w in targets:
                cid = command_id(q.name, subject, s.period, w.workload)
                last = (attempts or {}).get(cid)
                if last is None and cid not in sent and q.notice_seconds > 0:
                    _give_notice(plan, (notices or {}).get(cid), cid, w, s, now)
                    noticed.add(cid)
                    continue
                if last is None or reissue is None or not reissue.enabled:
                    if cid not in sent:
                        plan.actions.append(Terminate(cid, w, s))
                    continue
                until = (usage_until or {}).get(w.workload)
                due = next_due(reissue, last, w.started_at, until)
                if due is None:
                    continue
                plan.ignoring.append(last)
                if now < due:
                    plan.due = due if plan.due is None else min(plan.due, due)
                    continue
                n = last.number + 1
                plan.actions.append(Terminate(attempt_id(cid, n), w, s, n, last, until))
    for crossing, notice in sorted((notices or {}).items()):
        if notice.subject == subject and crossing not in noticed and crossing not in sent:
            # No longer over (or no longer running): the notice ends without a kill.
            s_now = next((s for s in standings if s.quota.name == notice.quota
                          and s.workload in (None, notice.workload)), None)  # fmt: skip
            up = any(w.workload == notice.workload for w in running)
            plan.actions.append(Cancel(notice, why_cancelled(notice, s_now, up), s_now))
    for key in sorted(set(marks) - seen):
        # The quota no longer applies (config change, groups moved) or its workload ended.
        plan.closed.append(key)
        if key.kind == BLOCK:
            plan.actions.append(Unblock(subject, key.quota, "the quota no longer applies"))
    return plan
