"""Spawn checks: a SpawnRequest in, a SpawnDecision out, from the in-memory state."""

from __future__ import annotations

import logging
import uuid
from datetime import datetime

from pydantic import ValidationError

from contracts import PayloadError, parse_json
from contracts.errors import (
    INVALID_REQUEST,
    ErrorCode,
    ErrorReply,
    FieldError,
    describe,
    field_errors,
)
from contracts.spawn import REQUEST_SCHEMA, SpawnDecision, SpawnRequest

from .config import PolicyConfig
from .domain import RESERVABLE, decide_spawn, need_of
from .journal import DecisionJournal
from .live import LiveState
from .orders import quota_inputs
from .records import DecisionRecord
from .reservations import hold
from .standings import Ask, display_standings, resolve_groups, standings_for

log = logging.getLogger("tollgate.policy")


class BadRequest(ValueError):
    """A spawn request that cannot be answered; the reply says why and names the field."""

    def __init__(self, message: str, errors: list[FieldError] | None = None) -> None:
        super().__init__(message)
        self.errors = errors or []


def parse_request(body: bytes) -> SpawnRequest:
    """Validate a spawn request body, with a message that names the bad field."""
    try:
        data = parse_json(body)
    except PayloadError as exc:
        raise BadRequest(str(exc)) from None
    schema = data.get("schema", REQUEST_SCHEMA)
    if schema != REQUEST_SCHEMA:
        wrong = FieldError(field="schema", message=f"{schema!r} is not {REQUEST_SCHEMA!r}")
        raise BadRequest(describe([wrong]), [wrong])
    try:
        return SpawnRequest.model_validate(data)
    except ValidationError as exc:
        errors = field_errors(exc)
        raise BadRequest(describe(errors, exc.error_count() - len(errors)), errors) from None


class SpawnChecker:
    """Answers spawn checks from the live state and holds what an allowed spawn will use."""

    def __init__(self, live: LiveState, journal: DecisionJournal) -> None:
        self.live = live
        self.journal = journal

    async def check(self, request: SpawnRequest) -> SpawnDecision:
        return self.decide(request)

    def decide(self, request: SpawnRequest) -> SpawnDecision:
        """Decide and hold in one step (no await inside: concurrent checks see each other)."""
        live = self.live
        now = live.clock()
        config = live.config.current()
        decision_id = uuid.uuid4().hex
        if request.groups and live.book.learn_groups(request.subject, request.groups):
            self.journal.learn(request.subject, request.groups, "spawn_request", now)
            live.touch(request.subject)
        groups = resolve_groups(config, live.book, request.subject, request.groups)
        if not live.ready or live.is_stale(now):
            return self._unavailable(config, decision_id, request, groups, now)
        view = live.view(now, config)
        ask = Ask(request.resources, request.expected_seconds)
        standings = standings_for(view, request.subject, groups, ask)
        verdict = decide_spawn(request.subject, standings, now, config.help)
        reservation = None
        if verdict.allowed:
            amounts = {
                m: need_of(m, request.resources, request.expected_seconds) for m in RESERVABLE
            }
            held = hold(
                decision_id,
                request.subject,
                request.workload,
                amounts,
                now,
                request.expected_seconds,
            )
            live.holds.add(held)
            if not held.empty:
                reservation = {"amounts": dict(held.remaining), "expires": held.expires}
        live.stats.bump("spawn_allowed" if verdict.allowed else "spawn_denied")
        statuses = [s.status(now) for s in display_standings(standings)]
        as_of = view.usage.last_seq
        log.info(
            "spawn %s for %s (workload %s): %s [policy %s, ledger seq %d, groups %s]",
            "allowed" if verdict.allowed else "denied",
            request.subject,
            request.workload,
            verdict.reason,
            config.version,
            as_of,
            ",".join(groups) or "-",
        )
        self.journal.add(
            DecisionRecord(
                decision_id=decision_id,
                kind="spawn",
                decided_at=now,
                subject=request.subject,
                workload=request.workload,
                allowed=verdict.allowed,
                reason=verdict.reason,
                message=verdict.message,
                policy_version=config.version,
                as_of_seq=as_of,
                groups=groups,
                reservation=reservation,
                quota=",".join(verdict.blocking) or None,
                inputs={
                    "request": request.model_dump(mode="json", by_alias=True),
                    "quotas": [
                        {
                            "name": s.quota.name,
                            "metric": s.quota.metric,
                            "per": s.quota.per,
                            "window": s.quota.window.key(),
                            "window_text": s.quota.window.describe(),
                            "used": s.used,
                            "reserved": s.reserved,
                            "need": s.need,
                            "limit": s.quota.limit,
                            "unit": s.quota.amount.unit,
                            "factor": s.quota.amount.factor,
                            "period": s.period,
                            "workload": s.workload,
                            "enforce": sorted(s.quota.enforce),
                            **quota_inputs(s.quota),
                        }
                        for s in standings
                    ],
                    "retry_at": verdict.retry_at,
                    "lag_events": live.lag(),
                },
            )
        )
        return SpawnDecision(
            decision_id=decision_id,
            allowed=verdict.allowed,
            reason=verdict.reason,
            message=verdict.message,
            quotas=statuses,
            retry_at=verdict.retry_at,
        )

    def _unavailable(
        self,
        config: PolicyConfig,
        decision_id: str,
        request: SpawnRequest,
        groups: list[str],
        now: datetime,
    ) -> SpawnDecision:
        live = self.live
        allowed = config.failure_mode == "open"
        reason = "usage_unavailable" if not live.ready else "usage_stale"
        age = live.staleness(now)
        why = (
            "usage has not been loaded yet"
            if not live.ready
            else f"usage is {age.total_seconds():.0f} s behind the ledger"
            if age is not None
            else "usage is behind the ledger"
        )
        if allowed:
            live.stats.bump("spawn_fail_open")
            message = f"Usage could not be checked ({why}), so this spawn was allowed (fail-open)."
        else:
            live.stats.bump("spawn_fail_closed")
            message = (
                f"Usage could not be checked ({why}), so spawns are refused until it can be "
                "(fail-closed). Try again in a minute; tell your admin if it persists."
            )
        log.warning(
            "spawn for %s %s by failure_mode=%s: %s",
            request.subject,
            "allowed" if allowed else "denied",
            config.failure_mode,
            why,
        )
        self.journal.add(
            DecisionRecord(
                decision_id=decision_id,
                kind="spawn",
                decided_at=now,
                subject=request.subject,
                workload=request.workload,
                allowed=allowed,
                reason=reason,
                message=message,
                policy_version=config.version,
                as_of_seq=live.usage.last_seq if live.usage is not None else 0,
                groups=groups,
                fail_open=allowed,
                inputs={
                    "request": request.model_dump(mode="json", by_alias=True),
                    "failure_mode": config.failure_mode,
                    "why": why,
                },
            )
        )
        return SpawnDecision(
            decision_id=decision_id,
            allowed=allowed,
            reason=reason,
            message=message,
            fail_open=allowed,
        )


def error_reply(
    message: str, errors: list[FieldError] | None = None, error: ErrorCode = "invalid_request"
) -> bytes:
    """The `tollgate.error.v1` reply to a request that could not be decided."""
    errors = errors or []
    hint = " Send a tollgate.spawn_request.v1 object." if error == INVALID_REQUEST else ""
    return ErrorReply(
        error=error,
        message=f"{message}.{hint}",
        field=errors[0].field if errors else None,
        errors=errors,
    ).to_json()
