"""POST /v1/spawn-checks: the NATS spawn check over HTTP, for integrators without NATS.

The request is forwarded to the policy on `tollgate.v1.spawn.check` and its decision is
returned as it is. When no policy answers (none running, NATS down, or too slow), the API
answers by the quota file's `failure_mode`, exactly as the policy does when it cannot read
usage: `open` allows and flags the decision `fail_open`, `closed` denies. Either way the
reason is `policy_unavailable`, the message says what happened, and the decision is stored
so `tollgate explain` and the web page show it.
"""

from __future__ import annotations

import json
import logging
import uuid

import asyncpg
import nats.errors
from fastapi import APIRouter, HTTPException
from pydantic import ValidationError

from contracts.errors import ERROR_SCHEMA, INTERNAL_ERROR
from contracts.spawn import SpawnDecision, SpawnRequest, spawn_check_subject

from ..auth import SpawnCaller
from ..deps import ClockDep, ConfigDep, DepsDep, OptionsDep
from ..errors import UNAVAILABLE
from ..metrics import SPAWN_CHECKS
from ..models import QuotaStatusPublic, SpawnDecisionPublic
from ..records import ApiDecision, record_decision

router = APIRouter(tags=["spawn checks"])
log = logging.getLogger("tollgate.api")


class PolicyUnavailable(Exception):
    """No decision came back from the policy; the message says why."""


@router.post(
    "/v1/spawn-checks",
    response_model=SpawnDecisionPublic,
    responses={
        400: {"description": "the body is not UTF-8 JSON"},
        401: {},
        403: {},
        422: {},
        502: {},
    },
)
async def post_spawn_check(
    body: SpawnRequest,
    _: SpawnCaller,
    deps: DepsDep,
    config: ConfigDep,
    options: OptionsDep,
    clock: ClockDep,
) -> SpawnDecisionPublic:
    """May this subject start this workload? The policy's decision, with a human sentence."""
    subject = spawn_check_subject(deps.prefix)
    try:
        reply = await _ask(deps, subject, body, options.spawn_check_timeout)
    except PolicyUnavailable as exc:
        return await _by_failure_mode(deps, config, clock, body, str(exc))
    decision = _decision(reply)
    SPAWN_CHECKS.labels("allowed" if decision.allowed else "denied").inc()
    return _public(decision)


async def _ask(deps: DepsDep, subject: str, body: SpawnRequest, timeout: float) -> bytes:
    bus, nc = deps.channels(), deps.nc
    if bus is None or nc is None or not nc.is_connected:
        raise PolicyUnavailable(f"the API is not connected to NATS at {deps.nats_address}")
    try:
        msg = await bus.spawn_check.request(body, subject=subject, timeout=timeout)
    except nats.errors.NoRespondersError:
        raise PolicyUnavailable(f"no policy service listens on {subject}") from None
    except nats.errors.TimeoutError:
        raise PolicyUnavailable(f"the policy did not answer within {timeout:g} s") from None
    except (nats.errors.Error, OSError) as exc:
        raise PolicyUnavailable(f"NATS failed the request ({type(exc).__name__})") from None
    return bytes(msg.body)


def _decision(reply: bytes) -> SpawnDecision:
    try:
        data = json.loads(reply)
    except ValueError:
        data = None
    if isinstance(data, dict) and data.get("schema") == ERROR_SCHEMA:
        message = str(data.get("message") or "the policy refused the request")
        if data.get("error") == INTERNAL_ERROR:
            # The policy failed, not the request: a gateway error the caller may retry.
            SPAWN_CHECKS.labels("policy_failed").inc()
            raise HTTPException(502, f"{message} (the policy failed; retry, or see its log)")
        SPAWN_CHECKS.labels("refused").inc()
        raise HTTPException(422, message)
    try:
        return SpawnDecision.model_validate(data)
    except ValidationError:
        SPAWN_CHECKS.labels("unreadable").inc()
        log.error("the policy's reply to a spawn check is not a decision: %.200r", reply)
        raise HTTPException(
            502, "the policy's reply is not a spawn decision; check that the policy and the API "
            "run the same Tollgate version"
        ) from None  # fmt: skip


def _public(d: SpawnDecision) -> SpawnDecisionPublic:
    return SpawnDecisionPublic(
        decision_id=d.decision_id,
        allowed=d.allowed,
        reason=d.reason,
        message=d.message,
        quotas=[QuotaStatusPublic.model_validate(q.model_dump()) for q in d.quotas],
        fail_open=d.fail_open,
        retry_at=d.retry_at,
    )


async def _by_failure_mode(
    deps: DepsDep, config: ConfigDep, clock: ClockDep, body: SpawnRequest, why: str
) -> SpawnDecisionPublic:
    allowed = config.failure_mode == "open"
    if allowed:
        message = (
            f"The quota policy could not be asked ({why}), so this spawn was allowed "
            "(failure_mode: open)."
        )
    else:
        message = (
            f"The quota policy could not be asked ({why}), so spawns are refused until it "
            "answers again (failure_mode: closed). Try again in a minute; tell your admin "
            "if it persists."
        )
    SPAWN_CHECKS.labels("policy_unavailable").inc()
    log.warning("spawn check for %s answered by failure_mode=%s: %s", body.subject,
                config.failure_mode, why)  # fmt: skip
    decision = ApiDecision(
        decision_id=f"api-{uuid.uuid4().hex}",
        decided_at=clock(),
        subject=body.subject,
        workload=body.workload,
        allowed=allowed,
        reason="policy_unavailable",
        message=message,
        policy_version=config.version,
        groups=list(body.groups),
        inputs={
            "request": body.model_dump(mode="json", by_alias=True),
            "failure_mode": config.failure_mode,
            "why": why,
            "decided_by": "api",
        },
    )
    try:
        await record_decision(deps.pool, decision)
    except (*UNAVAILABLE, asyncpg.PostgresError) as exc:  # the answer matters more
        log.warning("could not store decision %s: %r", decision.decision_id, exc)
    return SpawnDecisionPublic(
        decision_id=decision.decision_id,
        allowed=allowed,
        reason=decision.reason,
        message=message,
        quotas=[],
        fail_open=allowed,
    )
