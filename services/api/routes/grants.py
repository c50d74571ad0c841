"""Grants: admins add allowance on a quota for a while; everyone it concerns can read it.

`POST /v1/subjects/{subject}/grants`, `POST /v1/groups/{group}/grants` (a `per: group`
pool), `POST /v1/grants/{id}/revoke`, the lists, and `GET /v1/audit/grants/verify`. Only
admins grant and revoke (integrators are automation that reads; allowance is a person's
decision, and the record names who made it), and nobody grants to themselves.
"""

from __future__ import annotations

import logging
from datetime import datetime
from decimal import Decimal
from typing import Annotated, Literal

import nats.errors
from fastapi import APIRouter, HTTPException, Path
from pydantic import TypeAdapter, ValidationError

from contracts._base import Name
from contracts.grants import GrantRecorded, GrantRevoked, grants_subject
from services.policy import grantstore
from services.policy.config import PolicyConfig
from services.policy.grants import Grant, GrantBook, GrantRecord
from services.policy.quotas import subject_quotas

from ..auth import READ_ANY_SUBJECT, CurrentUser, ReadableSubject
from ..deps import ClockDep, ConfigDep, DepsDep, PoolDep
from ..grants import GrantRefused, GrantRequest, RevokeRequest, plan_grant, remaining_of
from ..models import GrantChainPublic, GrantPublic, GrantsPublic
from ..records import reported_groups
from ..tokens import Principal, Role
from .audit import Auditor

router = APIRouter(tags=["grants"])
log = logging.getLogger("tollgate.api")
_NAME: TypeAdapter[str] = TypeAdapter(Name)
NOT_JSON = {"description": "the body is not UTF-8 JSON"}
ADMIN_HOW = "Use the admin token (TOLLGATE_ADMIN_TOKEN, or the admin-token file of `tollgate up`)."


def _name(field: str, value: str) -> str:
    try:
        return _NAME.validate_python(value)
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise HTTPException(422, f"{field}: {reason}") from None


def _granter(principal: Principal, target: str | None = None) -> str:
    """Who is granting: an admin, and not for themselves."""
    if target is not None and principal.subject == target:
        raise HTTPException(
            403, f"You cannot grant allowance to yourself ({target}); ask another admin."
        )
    if principal.role is not Role.ADMIN:
        raise HTTPException(
            403, f"Granting or revoking allowance needs an admin token; yours is a "
            f"{principal.role.value} token. {ADMIN_HOW}",
        )  # fmt: skip
    return principal.subject or "admin"


async def _publish(deps: DepsDep, scope: str, target: str, body: bytes) -> None:
    """Cue the policy (it also polls, so a failure here only delays it)."""
    bus, nc = deps.channels(), deps.nc
    if bus is None or nc is None or not nc.is_connected:
        log.warning("grant recorded but NATS is not connected: the policy sees it on its next poll")
        return
    try:
        await bus.grants.publish(body, subject=grants_subject(scope, target, deps.prefix))
        await nc.flush(timeout=2)
    except (nats.errors.Error, OSError) as exc:
        log.warning("grant recorded; cueing the policy failed (%r): it polls", exc)


def _recorded_event(r: GrantRecord, config: PolicyConfig) -> bytes:
    assert r.amount is not None and r.expires_at is not None
    amount, unit = r.amount, ""
    rule = next((q for q in config.quotas if q.name == r.quota), None)
    if rule is not None:
        amount, unit = r.amount / rule.amount.factor, rule.amount.unit
    return GrantRecorded(
        seq=r.seq, grant_id=r.grant_id, scope=r.scope, target=r.target, quota=r.quota,
        amount=amount.normalize(), unit=unit, granted_by=r.actor, granted_at=r.recorded_at,
        expires_at=r.expires_at, reason=r.reason, hash=r.hash,
    ).to_json()  # fmt: skip


async def _shown(
    pool: PoolDep,
    config: PolicyConfig,
    scope: Literal["subject", "group"],
    target: str,
    groups: list[str],
    grants: list[Grant],
    at: datetime,
) -> list[GrantPublic]:
    """Grants as the API shows them, each with what is left of it."""
    # A pool's usage is its members' (the empty subject, which no one can be, adds none).
    found = await subject_quotas(pool, config, target if scope == "subject" else "", groups, at)
    out = []
    for g in grants:
        quota = next(
            ((q, st) for q, st in zip(found.quotas, found.statuses, strict=True)
             if g.quota == q.name or g.quota in {r.name for r in q.rules}),
            None,
        )  # fmt: skip
        rule = next((r for r in config.quotas if r.name == g.quota), None)
        factor, unit = (rule.amount.factor, rule.amount.unit) if rule else (Decimal(1), "")
        left = Decimal(0)
        if quota is not None:
            q, st = quota
            shares = remaining_of(q.grants, q.base_limit, st.used * q.amount.factor, at)
            left = shares.get(g.grant_id, Decimal(0))
        out.append(
            GrantPublic(
                grant_id=g.grant_id, scope=g.scope, target=g.target, quota=g.quota,
                metric=rule.metric if rule else None, amount=(g.amount / factor).normalize(),
                unit=unit, amount_text=g.amount_text,
                remaining=(left / factor).quantize(Decimal("0.000001")).normalize(),
                state=g.state(at), granted_by=g.granted_by, granted_at=g.granted_at,
                expires_at=g.expires_at, reason=g.reason, revoked_at=g.revoked_at,
                revoked_by=g.revoked_by, revoke_reason=g.revoke_reason, seq=g.seq,
            )
        )  # fmt: skip
    return out


async def _record(
    deps: DepsDep, config: PolicyConfig, body: GrantRequest, scope: Literal["subject", "group"],
    target: str, actor: str, clock: ClockDep,
) -> GrantPublic:  # fmt: skip
    pool, now = deps.pool, clock()
    groups = (
        config.groups_of(target, await reported_groups(pool, target))
        if scope == "subject"
        else [target]
    )
    try:
        planned = plan_grant(config, body, scope, target, groups, actor, now)
    except GrantRefused as exc:
        raise HTTPException(exc.status, str(exc)) from None
    async with pool.acquire() as conn:
        stored = await grantstore.append(conn, planned)
    await _publish(deps, scope, target, _recorded_event(stored, config))
    log.info("grant %s: %s on %s for %s %s by %s until %s", stored.grant_id, stored.amount_text,
             stored.quota, scope, target, actor, stored.expires_at)  # fmt: skip
    book = GrantBook()
    book.apply([stored])
    (shown,) = await _shown(pool, config, scope, target, groups, list(book.grants.values()), now)
    return shown


@router.post(
    "/v1/subjects/{subject:path}/grants",
    response_model=GrantPublic,
    status_code=201,
    responses={400: NOT_JSON, 401: {}, 403: {}, 404: {}, 422: {}},
)
async def post_subject_grant(
    subject: Annotated[str, Path(description="the subject, usually a user name")],
    body: GrantRequest,
    principal: CurrentUser,
    deps: DepsDep,
    config: ConfigDep,
    clock: ClockDep,
) -> GrantPublic:
    """Give a subject extra allowance on one quota until it expires (admin only)."""
    actor = _granter(principal, subject)
    target = _name("subject", subject)
    return await _record(deps, config, body, "subject", target, actor, clock)


@router.post(
    "/v1/groups/{group}/grants",
    response_model=GrantPublic,
    status_code=201,
    responses={400: NOT_JSON, 401: {}, 403: {}, 404: {}, 422: {}},
)
async def post_group_grant(
    group: Annotated[str, Path(description="a group whose members share a per: group quota")],
    body: GrantRequest,
    principal: CurrentUser,
    deps: DepsDep,
    config: ConfigDep,
    clock: ClockDep,
) -> GrantPublic:
    """Raise a group pool (a `per: group` quota) until the grant expires (admin only)."""
    actor = _granter(principal)
    if principal.subject is not None and principal.subject in config.groups.get(group, []):
        raise HTTPException(
            403, f"You cannot grant allowance to a pool you share ({group}); ask another admin."
        )
    target = _name("group", group)
    return await _record(deps, config, body, "group", target, actor, clock)


@router.get(
    "/v1/subjects/{subject:path}/grants",
    response_model=GrantsPublic,
    responses={401: {}, 404: {}, 422: {}},
)
async def get_subject_grants(
    subject: ReadableSubject, principal: CurrentUser, pool: PoolDep, config: ConfigDep,
    clock: ClockDep,
) -> GrantsPublic:  # fmt: skip
    """The subject's grants and its groups' pool grants, newest last, with what is left."""
    groups = set(await reported_groups(pool, subject))
    if principal.subject == subject:
        groups.update(principal.groups)
    resolved = config.groups_of(subject, sorted(groups))
    async with pool.acquire() as conn:
        records = await grantstore.for_targets(conn, subject, resolved)
    book = GrantBook()
    book.apply(records)
    own = [g for g in book.grants.values() if g.scope == "subject"]
    pooled = [g for g in book.grants.values() if g.scope == "group"]
    now = clock()
    shown = await _shown(pool, config, "subject", subject, resolved, own, now)
    for group in sorted({g.target for g in pooled}):
        mine = [g for g in pooled if g.target == group]
        shown += await _shown(pool, config, "group", group, [group], mine, now)
    return GrantsPublic(
        scope="subject", target=subject, groups=resolved,
        grants=sorted(shown, key=lambda g: g.seq),
    )  # fmt: skip


@router.get(
    "/v1/groups/{group}/grants",
    response_model=GrantsPublic,
    responses={401: {}, 403: {}, 422: {}},
)
async def get_group_grants(
    group: Annotated[str, Path(description="the group")],
    principal: CurrentUser, pool: PoolDep, config: ConfigDep, clock: ClockDep,
) -> GrantsPublic:  # fmt: skip
    """A group pool's grants (admins, auditors, integrators; members see them on their own)."""
    if principal.role not in READ_ANY_SUBJECT:
        raise HTTPException(
            403, "Listing a group's grants needs an admin, auditor or integrator token; "
            "yours are listed under GET /v1/subjects/{you}/grants.",
        )  # fmt: skip
    name = _name("group", group)
    async with pool.acquire() as conn:
        records = await grantstore.for_targets(conn, "", [name])
    book = GrantBook()
    book.apply(records)
    shown = await _shown(pool, config, "group", name, [name], list(book.grants.values()), clock())
    return GrantsPublic(scope="group", target=name, groups=[name], grants=shown)


@router.post(
    "/v1/grants/{grant_id}/revoke",
    response_model=GrantPublic,
    responses={400: NOT_JSON, 401: {}, 403: {}, 404: {}, 409: {}, 422: {}},
)
async def post_revoke(
    grant_id: Annotated[str, Path(max_length=100, description="e.g. g-3f9c2a1b0d4e")],
    body: RevokeRequest,
    principal: CurrentUser,
    deps: DepsDep,
    config: ConfigDep,
    clock: ClockDep,
) -> GrantPublic:
    """End a grant now; the revocation is a record of its own (admin only)."""
    actor = _granter(principal)
    now = clock()
    record = GrantRecord(
        seq=0, kind="revoke", grant_id=grant_id, scope="subject", target="", quota="",
        actor=actor, reason=body.reason, recorded_at=now,
    )  # fmt: skip
    async with deps.pool.acquire() as conn:
        try:
            stored = await grantstore.append(conn, record)
        except grantstore.GrantNotFound:
            raise HTTPException(
                404, f"grant {grant_id!r} not found; list grants with GET "
                "/v1/subjects/{subject}/grants",
            ) from None  # fmt: skip
        except grantstore.AlreadyRevoked as exc:
            raise HTTPException(409, f"{exc}; nothing to do") from None
        records = await grantstore.about(conn, grant_id)
    event = GrantRevoked(
        seq=stored.seq, grant_id=grant_id, scope=stored.scope, target=stored.target,
        quota=stored.quota, revoked_by=actor, revoked_at=now, reason=body.reason,
        hash=stored.hash,
    )  # fmt: skip
    await _publish(deps, stored.scope, stored.target, event.to_json())
    log.info("grant %s revoked by %s: %s", grant_id, actor, body.reason)
    book = GrantBook()
    book.apply(records)
    groups = [stored.target] if stored.scope == "group" else []
    (shown,) = await _shown(
        deps.pool, config, stored.scope, stored.target, groups, list(book.grants.values()), now
    )
    return shown


@router.get(
    "/v1/audit/grants/verify", response_model=GrantChainPublic, responses={401: {}, 403: {}}
)
async def get_grants_verify(_: Auditor, pool: PoolDep) -> GrantChainPublic:
    """Recompute the grants record's hash chain; name the first record that does not hold."""
    async with pool.acquire() as conn:
        v = await grantstore.verify_chain(conn)
    return GrantChainPublic(
        ok=v.ok, records=v.records, head_hash=v.head_hash, first_bad_seq=v.first_bad_seq,
        problem=v.problem,
    )  # fmt: skip
