"""From engine actions to wire messages (SPEC 2.5) and the decision records that explain them."""

from __future__ import annotations

import hashlib
import uuid
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import Decimal
from functools import partial

from contracts.commands import (
    SpawnBlock,
    TerminateWorkload,
    block_subject,
    terminate_subject,
    unblock_subject,
)
from contracts.quota_events import (
    QuotaExceeded,
    QuotaForecast,
    QuotaWarning,
    quota_events_subject,
)

from .domain import EffectiveQuota, Standing, when
from .engine import Action, Block, Exceeded, Forecast, Terminate, Unblock, Warn
from .forecast import rate_per_second
from .grants import Grant
from .prices import COST, to_money
from .records import DecisionRecord, OutboxRow
from .units import format_number


def _digest(*parts: str) -> str:
    return hashlib.sha256("\x1f".join(parts).encode()).hexdigest()[:32]


def _at(t: datetime) -> str:
    return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _used(s: Standing) -> str:
    q = s.quota
    text = f"{q.amount.number(s.used)} of {q.limit_text()} ({q.name})"
    if q.window.workload_hour:
        text = f"{text} in hour {s.period.removeprefix('h')} of the workload"
    else:
        text = f"{text} {q.window.describe()}"
    if q.hard and q.grace and s.breached:
        text += f", past its {q.grace:%} grace"
    return text


def _lapsed(s: Standing) -> str:
    """Grants that no longer lift the quota: why a block came back."""
    q, parts = s.quota, []
    for g in q.lapsed:
        if g.revoked_at is not None:
            parts.append(
                f"grant {g.grant_id} ({q.show(g.amount)}) revoked {when(g.revoked_at)} by "
                f"{g.revoked_by}: {g.revoke_reason}"
            )
        else:
            parts.append(f"grant {g.grant_id} ({q.show(g.amount)}) expired {when(g.expires_at)}")
    return "; ".join(parts)


def _grant_inputs(g: Grant) -> dict[str, object]:
    return {
        "grant_id": g.grant_id, "scope": g.scope, "target": g.target, "amount": g.amount,
        "expires_at": g.expires_at, "granted_by": g.granted_by, "seq": g.seq,
        "revoked_at": g.revoked_at,
    }  # fmt: skip


def quota_inputs(q: EffectiveQuota) -> dict[str, object]:
    """What a decision stores of a quota beyond usage: mode, grace and grants."""
    return {
        "mode": q.mode,
        "grace": q.grace,
        "base_limit": q.base_limit,
        "enforced_limit": q.enforced_limit,
        "grants": [_grant_inputs(g) for g in q.grants],
        "lapsed_grants": [_grant_inputs(g) for g in q.lapsed],
        "grant_seq": q.grant_seq,
    }


def _wire(metric: str, base: Decimal) -> Decimal:
    """Amounts on the wire are in the metric's base unit; a cost's is the currency."""
    return to_money(base).normalize() if metric == COST else base


def _rate(per_hour: Decimal) -> str:
    """A rate people can read even when small: '1.2', '0.0031'."""
    return format_number(per_hour) if per_hour >= 1 else f"{per_hour.normalize():.2g}"


def _in_unit(s: Standing, base: Decimal) -> Decimal:
    return s.quota.amount.in_unit(base).quantize(Decimal("0.000001")).normalize()


def _forecast(
    action: Forecast, decision: partial[DecisionRecord], prefix: str, now: datetime
) -> tuple[DecisionRecord, OutboxRow]:
    """A forecast is stored as a warning decision (reason forecast) and sent as its event."""
    s, q = action.standing, action.standing.quota
    recent = s.recent
    per_hour = _in_unit(s, rate_per_second(q.window, recent, now, s.recent_since) * 3600)
    event = QuotaForecast(
        subject=action.subject,
        quota=q.name,
        metric=q.metric,
        used=_in_unit(s, s.used),
        limit=q.amount.in_unit(q.limit).normalize(),
        unit=q.amount.unit,
        rate_per_hour=per_hour,
        projected_exhaustion_at=action.projected,
        window=q.window.key(),
        decided_at=now,
    )
    msg_id = f"forecast-{uuid.uuid4().hex}"
    record = decision(
        decision_id=msg_id,
        kind="warning",
        subject=action.subject,
        reason="forecast",
        quota=q.name,
        inputs=_inputs(s, {"projected_exhaustion_at": action.projected, "recent": recent}),
        message=(
            f"At this rate ({_rate(per_hour)} {q.amount.unit} per hour) {action.subject} "
            f"runs out of {q.name} on {when(action.projected)}: used {_used(s)}."
        ),
    )
    return record, OutboxRow(
        msg_id, msg_id, quota_events_subject(action.subject, prefix), event.to_json()
    )


def _inputs(s: Standing, extra: dict[str, object] | None = None) -> dict[str, object]:
    q = s.quota
    out: dict[str, object] = {
        "metric": q.metric,
        "window": q.window.key(),
        "window_text": q.window.describe(),
        "per": q.per,
        "used": s.used,
        "limit": q.limit,
        "unit": q.amount.unit,
        "factor": q.amount.factor,
        "period": s.period,
        "rules": [r.name for r in q.rules],
        "enforce": sorted(q.enforce),
        **quota_inputs(q),
    }
    out.update(extra or {})
    return out


def translate(
    action: Action,
    *,
    prefix: str,
    now: datetime,
    version: str,
    as_of: int,
    groups: Sequence[str],
) -> tuple[DecisionRecord, OutboxRow]:
    """The decision record and the message of one action (the record's id names the message)."""
    decision = partial(
        DecisionRecord, decided_at=now, policy_version=version, as_of_seq=as_of,
        groups=list(groups),
    )  # fmt: skip
    if isinstance(action, Terminate):
        s, w, q = action.standing, action.workload, action.standing.quota
        payload = TerminateWorkload(
            command_id=action.command_id,
            workload=w.workload,
            subject=w.subject,
            reason=q.reason,
            quota=q.name,
            metric=q.metric,
            used=_wire(q.metric, s.used),
            limit=_wire(q.metric, q.limit),
            grace_seconds=q.grace_seconds,
            decided_at=now,
        )
        message = (
            f"Terminate {w.workload} on {w.host}: {w.subject} used {_used(s)}; "
            f"{q.reason}, SIGKILL after {format_number(q.grace_seconds)} s of grace."
        )
        repeat: dict[str, object] = {"attempt": action.attempt, "crossing": action.crossing}
        if action.notice is not None:
            n = action.notice
            message += (
                f" Its notice {n.notice_id} (decided {_at(n.decided_at)}) ran out at "
                f"{_at(n.terminate_at)} and it was still over."
            )
            repeat |= {"notice_id": n.notice_id, "notice_terminate_at": n.terminate_at}
        if action.previous is not None:
            p = action.previous
            message = (
                f"Terminate {w.workload} on {w.host} again (command {action.attempt}): it "
                f"still sent usage sampled at {_at(action.usage_until or now)}, after "
                f"command {p.number} at {_at(p.decided_at)} and its "
                f"{format_number(p.grace_seconds)} s of grace; {w.subject} used {_used(s)}."
            )
            repeat |= {
                "previous_command_id": p.command_id,
                "previous_decided_at": p.decided_at,
                "previous_host": p.host,
                "usage_until": action.usage_until,
            }
        record = decision(
            decision_id=action.command_id,
            kind="terminate",
            subject=w.subject,
            workload=w.workload,
            reason=q.reason,
            message=message,
            quota=q.name,
            inputs=_inputs(
                s,
                {
                    "host": w.host,
                    "started_at": w.started_at,
                    "announced": w.announced,
                    "grace_seconds": q.grace_seconds,
                    **repeat,
                },
            ),
        )
        subject = terminate_subject(w.host, prefix)
        return record, OutboxRow(action.command_id, record.decision_id, subject, payload.to_json())
    if isinstance(action, Block):
        s, q = action.standing, action.standing.quota
        # The grant record's position is part of the id: a block that returns when a grant
        # is revoked is a new command, while re-deciding the same one after a restart is not.
        msg_id = "block-" + _digest(
            action.subject,
            q.name,
            s.period,
            str(action.until),
            *([str(q.grant_seq)] * bool(q.grant_seq)),
        )
        until = f"until {when(action.until)}" if action.until else "until an admin raises it"
        lapsed = _lapsed(s)
        record = decision(
            decision_id=msg_id,
            kind="block",
            subject=action.subject,
            allowed=False,
            reason="quota_exceeded",
            quota=q.name,
            inputs=_inputs(s, {"until": action.until}),
            message=f"Block spawns of {action.subject} {until}: used {_used(s)}"
            + (f"; {lapsed}." if lapsed else "."),
        )
        block = SpawnBlock(
            subject=action.subject, quota=q.name, reason="quota_exceeded", until=action.until
        )
        return record, OutboxRow(
            msg_id, msg_id, block_subject(action.subject, prefix), block.to_json()
        )
    if isinstance(action, Unblock):
        msg_id = f"unblock-{uuid.uuid4().hex}"
        now_used = "" if action.standing is None else f" (used {_used(action.standing)})"
        inputs: dict[str, object] = {"why": action.why}
        if action.standing is not None:
            inputs.update(_inputs(action.standing))
        record = decision(
            decision_id=msg_id,
            kind="unblock",
            subject=action.subject,
            allowed=True,
            reason=action.why.replace(" ", "_"),
            quota=action.quota,
            inputs=inputs,
            message=f"Unblock spawns of {action.subject} ({action.quota}): {action.why}{now_used}.",
        )
        unblock = SpawnBlock(subject=action.subject, quota=action.quota, reason=action.why)
        return record, OutboxRow(
            msg_id, msg_id, unblock_subject(action.subject, prefix), unblock.to_json()
        )
    if isinstance(action, Forecast):
        return _forecast(action, decision, prefix, now)
    s, q = action.standing, action.standing.quota
    unit_used = _in_unit(s, s.used)
    unit_limit = q.amount.in_unit(q.limit).normalize()
    event: QuotaWarning | QuotaExceeded
    if isinstance(action, Warn):
        event = QuotaWarning(
            subject=action.subject,
            quota=q.name,
            metric=q.metric,
            threshold=action.threshold,
            workload=s.workload,
            used=unit_used,
            limit=unit_limit,
            unit=q.amount.unit,
            decided_at=now,
        )
        kind, text = "warning", f"{action.subject} passed {action.threshold:%} of a quota"
    else:
        assert isinstance(action, Exceeded)
        event = QuotaExceeded(
            subject=action.subject,
            quota=q.name,
            metric=q.metric,
            used=unit_used,
            limit=unit_limit,
            unit=q.amount.unit,
            retry_at=action.retry_at,
            workload=s.workload,
            decided_at=now,
        )
        kind, text = "exceeded", f"{action.subject} went over a quota"
    msg_id = f"{kind}-{uuid.uuid4().hex}"
    record = decision(
        decision_id=msg_id,
        kind=kind,
        subject=action.subject,
        workload=s.workload,
        reason=kind,
        quota=q.name,
        inputs=_inputs(s),
        message=f"{text}: used {_used(s)}.",
    )
    return record, OutboxRow(
        msg_id, msg_id, quota_events_subject(action.subject, prefix), event.to_json()
    )
