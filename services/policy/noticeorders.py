"""Notices on the wire and in the decisions table: what `notice.py` decided, sent and stored."""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal

import asyncpg

from contracts.notice import TerminationCancelled, TerminationScheduled, notice_subject
from contracts.quota_events import quota_events_subject

from .notice import (
    CANCELLED,
    SCHEDULED,
    Cancel,
    Notice,
    Schedule,
    cancelled_sentence,
    scheduled_sentence,
)
from .orders import _at, _inputs, _used
from .records import DecisionRecord, OutboxRow


def translate_notice(
    action: Schedule | Cancel,
    *,
    prefix: str,
    now: datetime,
    version: str,
    as_of: int,
    groups: Sequence[str],
) -> tuple[DecisionRecord, list[OutboxRow]]:
    """The decision of a notice (or its cancellation) and its two messages: host and events."""
    if isinstance(action, Schedule):
        s, w, q = action.standing, action.workload, action.standing.quota
        sentence = scheduled_sentence(q.name, action.terminate_at)
        payload = TerminationScheduled(
            notice_id=action.notice_id, command_id=action.crossing, workload=w.workload,
            subject=w.subject, host=w.host, quota=q.name, metric=q.metric,
            used=q.amount.in_unit(s.used).quantize(Decimal("0.000001")).normalize(),
            limit=q.amount.in_unit(q.limit).normalize(), unit=q.amount.unit,
            terminate_at=action.terminate_at, reason=q.reason, message=sentence,
            decided_at=now,
        ).to_json()  # fmt: skip
        record = DecisionRecord(
            decision_id=action.notice_id, kind=SCHEDULED, decided_at=now, subject=w.subject,
            workload=w.workload, reason=q.reason, quota=q.name, policy_version=version,
            as_of_seq=as_of, groups=list(groups),
            message=(
                f"Notice to {w.workload} on {w.host}: {w.subject} used {_used(s)}; it will be "
                f"terminated at {_at(action.terminate_at)} ({q.reason}) if still over then, "
                f"after {q.notice_seconds} s of notice."
            ),
            inputs=_inputs(s, {
                "host": w.host, "crossing": action.crossing, "notice_id": action.notice_id,
                "terminate_at": action.terminate_at, "notice_seconds": q.notice_seconds,
                "sentence": sentence,
            }),
        )  # fmt: skip
        host, subject, nid = w.host, w.subject, action.notice_id
    else:
        n = action.notice
        sentence = cancelled_sentence(n.quota, n.terminate_at, action.why)
        payload = TerminationCancelled(
            notice_id=n.notice_id, workload=n.workload, subject=n.subject, host=n.host,
            quota=n.quota, terminate_at=n.terminate_at, why=action.why, message=sentence,
            decided_at=now,
        ).to_json()  # fmt: skip
        extra: dict[str, object] = {
            "host": n.host, "crossing": n.crossing, "notice_id": n.notice_id,
            "terminate_at": n.terminate_at, "why": action.why, "sentence": sentence,
        }  # fmt: skip
        inputs = extra if action.standing is None else _inputs(action.standing, extra)
        now_used = "" if action.standing is None else f" (used {_used(action.standing)})"
        record = DecisionRecord(
            decision_id=f"cancel-{n.notice_id}", kind=CANCELLED, decided_at=now,
            subject=n.subject, workload=n.workload, reason=action.why.replace(" ", "_")[:100],
            quota=n.quota, policy_version=version, as_of_seq=as_of, groups=list(groups),
            message=(
                f"Cancel the termination of {n.workload} on {n.host} planned for "
                f"{_at(n.terminate_at)}: {action.why}{now_used}."
            ),
            inputs=inputs,
        )  # fmt: skip
        host, subject, nid = n.host, n.subject, record.decision_id
    rows = [
        OutboxRow(nid, record.decision_id, notice_subject(host, prefix), payload),
        OutboxRow(f"{nid}-event", record.decision_id, quota_events_subject(subject, prefix),
                  payload),
    ]  # fmt: skip
    return record, rows


def pending(action: Schedule, now: datetime) -> Notice:
    """The notice a scheduling decision leaves pending."""
    w, q = action.workload, action.standing.quota
    return Notice(
        action.notice_id, action.crossing, w.subject, w.workload, w.host, q.name,
        q.base_limit, action.terminate_at, now,
    )  # fmt: skip


_PENDING = """
    SELECT d.decision_id, d.subject, d.workload, d.quota, d.decided_at, d.inputs
    FROM policy_decisions d
    WHERE d.kind = 'termination_scheduled' AND d.decided_at >= $1
      AND NOT EXISTS (SELECT 1 FROM policy_decisions c
                      WHERE c.decision_id = 'cancel-' || d.decision_id)
      AND NOT EXISTS (SELECT 1 FROM policy_decisions t
                      WHERE t.kind = 'terminate' AND t.decided_at >= d.decided_at
                        AND t.inputs->>'notice_id' = d.decision_id)"""


async def load_notices(
    conn: asyncpg.Connection, since: datetime, workload: str | None = None
) -> dict[str, Notice]:
    """Notices neither cancelled nor carried out, by crossing (`workload`: only its own)."""
    query, args = _PENDING, [since]
    if workload is not None:
        query, args = query + " AND d.workload = $2", [since, workload]
    out: dict[str, Notice] = {}
    for r in await conn.fetch(query + " ORDER BY d.decided_at", *args):
        i = json.loads(r["inputs"])
        out[i["crossing"]] = Notice(
            r["decision_id"], i["crossing"], r["subject"], r["workload"] or "", i["host"],
            r["quota"] or "", Decimal(i["base_limit"]),
            datetime.fromisoformat(i["terminate_at"]), r["decided_at"],
        )  # fmt: skip
    return out
