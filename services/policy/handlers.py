"""Spawn checks: a SpawnRequest in, a SpawnDecision out, from the ledger's numbers."""

from __future__ import annotations

import json
import logging
import uuid
from dataclasses import dataclass, field
from datetime import UTC, datetime

import asyncpg
from pydantic import ValidationError

from contracts import PayloadError, parse_json
from contracts.spawn import REQUEST_SCHEMA, SpawnDecision, SpawnRequest

from .config import PolicyConfig
from .domain import decide_spawn
from .quotas import subject_quotas
from .source import ConfigSource

log = logging.getLogger("tollgate.policy")

# Faults that mean "usage state unavailable": answer by failure_mode, flagged.
UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
)


class BadRequest(ValueError):
    """A spawn request that cannot be answered; the reply says why."""


def parse_request(body: bytes) -> SpawnRequest:
    """Validate a spawn request body, with a message that names the bad field."""
    try:
        data = parse_json(body)
    except PayloadError as exc:
        raise BadRequest(str(exc)) from None
    if data.get("schema", REQUEST_SCHEMA) != REQUEST_SCHEMA:
        raise BadRequest(f"schema {data.get('schema')!r} is not {REQUEST_SCHEMA!r}")
    try:
        return SpawnRequest.model_validate(data)
    except ValidationError as exc:
        where = "; ".join(
            f"{'.'.join(str(p) for p in e['loc']) or 'body'}: {e['msg']}" for e in exc.errors()[:5]
        )
        raise BadRequest(where) from None


@dataclass
class SpawnChecker:
    """Answers spawn checks from the ledger's rollups."""

    pool: asyncpg.Pool
    config: ConfigSource
    fail_open_count: int = 0
    decisions: dict[str, int] = field(default_factory=lambda: {"allowed": 0, "denied": 0})

    async def check(self, request: SpawnRequest) -> SpawnDecision:
        config = self.config.current()
        decision_id = uuid.uuid4().hex
        try:
            found = await subject_quotas(self.pool, config, request.subject, request.groups)
        except UNAVAILABLE as exc:
            return self._unavailable(config, decision_id, request, exc)
        by_name = {s.name: s for s in found.statuses}
        verdict = decide_spawn(request.subject, found.quotas, by_name, config.help)
        self.decisions["allowed" if verdict.allowed else "denied"] += 1
        log.info(
            "spawn %s for %s (workload %s): %s [policy %s, ledger seq %d, groups %s]",
            "allowed" if verdict.allowed else "denied", request.subject, request.workload,
            verdict.reason, config.version, found.as_of_seq, ",".join(found.groups) or "-",
        )  # fmt: skip
        return SpawnDecision(
            decision_id=decision_id,
            allowed=verdict.allowed,
            reason=verdict.reason,
            message=verdict.message,
            quotas=found.statuses,
            retry_at=verdict.retry_at,
        )

    def _unavailable(
        self, config: PolicyConfig, decision_id: str, request: SpawnRequest, exc: BaseException
    ) -> SpawnDecision:
        allowed = config.failure_mode == "open"
        self.fail_open_count += allowed
        log.warning(
            "usage state unavailable (%s: %s); spawn for %s %s by failure_mode=%s",
            type(exc).__name__, exc, request.subject, "allowed" if allowed else "denied",
            config.failure_mode,
        )  # fmt: skip
        message = (
            "Usage could not be checked right now, so this spawn was allowed (fail-open)."
            if allowed
            else "Usage could not be checked right now, so spawns are refused until it can be "
            "(fail-closed). Try again in a minute; tell your admin if it persists."
        )
        return SpawnDecision(
            decision_id=decision_id,
            allowed=allowed,
            reason="usage_unavailable",
            message=message,
            fail_open=allowed,
        )


def error_reply(message: str) -> bytes:
    """The reply to a request that could not be parsed."""
    return json.dumps(
        {
            "schema": "tollgate.error.v1",
            "error": "invalid_request",
            "message": f"{message}. Send a tollgate.spawn_request.v1 object.",
            "at": datetime.now(UTC).isoformat(),
        }
    ).encode()
