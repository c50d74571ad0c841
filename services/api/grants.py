"""Grant requests checked against the quota file, and grants shown with what is left of them.

Every refusal is a `GrantRefused` naming the field, so the API answers 4xx with it.
"""

from __future__ import annotations

import uuid
from collections.abc import Sequence
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from contracts._base import MAX_AMOUNT, Name, UtcDatetime
from services.policy.config import PolicyConfig, QuotaRule, parse_duration
from services.policy.grants import Grant, GrantRecord
from services.policy.prices import COST, parse_money
from services.policy.units import Amount, UnitError, parse_amount

MAX_EXPIRY = timedelta(days=400)


class GrantRefused(Exception):
    """A grant request that cannot be recorded: `field` and a sentence on what to fix."""

    def __init__(self, field: str, message: str, status: int = 422) -> None:
        super().__init__(f"{field}: {message}")
        self.field = field
        self.status = status


class GrantRequest(BaseModel):
    """Extra allowance on one quota until it expires (give expires_in or expires_at)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    quota: str = Field(min_length=1, max_length=100, description="the quota's name in the file")
    amount: str = Field(
        min_length=1, max_length=100, description="in a unit of the quota's metric: '10 GiB*h'"
    )
    expires_in: str | None = Field(default=None, max_length=40, description="e.g. '7d', '12h'")
    expires_at: UtcDatetime | None = None
    reason: Name = Field(max_length=500, description="why; kept in the audited record")


class RevokeRequest(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    reason: Name = Field(max_length=500, description="why; kept in the audited record")


def _rules(config: PolicyConfig, name: str) -> QuotaRule:
    for rule in config.quotas:
        if rule.name == name:
            return rule
    known = ", ".join(r.name for r in config.quotas) or "(none: the quota file is empty)"
    raise GrantRefused("quota", f"no quota is named {name!r}; the quota file has: {known}")


def _amount(text: str, rule: QuotaRule, config: PolicyConfig) -> Amount:
    if text.strip().startswith("-"):
        raise GrantRefused(
            "amount", f"{text!r} is negative; a grant adds allowance (revoke a grant to take "
            "it back)",
        )  # fmt: skip
    try:
        if rule.metric == COST:  # a budget in money: the grant is in the prices' currency
            amount = parse_money(text, config.pricebook.currency)
        else:
            amount = parse_amount(text, rule.metric)
    except UnitError as exc:
        raise GrantRefused("amount", f"{exc} (quota {rule.name} limits {rule.metric})") from None
    if amount.base <= 0:
        raise GrantRefused("amount", f"{text!r} is zero; grant more than nothing")
    if amount.base >= MAX_AMOUNT:
        raise GrantRefused("amount", f"{text!r} is too large")
    return amount


def _expiry(body: GrantRequest, now: datetime) -> datetime:
    if body.expires_in is not None and body.expires_at is not None:
        raise GrantRefused("expires_in", "give expires_in or expires_at, not both")
    if body.expires_at is not None:
        if body.expires_at <= now:
            raise GrantRefused(
                "expires_at", f"{body.expires_at.isoformat()} is in the past; a grant must end "
                "in the future",
            )  # fmt: skip
        if body.expires_at - now > MAX_EXPIRY:
            raise GrantRefused("expires_at", "is more than 400 days away; raise the quota instead")
        return body.expires_at
    if body.expires_in is None:
        raise GrantRefused(
            "expires_in", "a grant needs an end: give expires_in (e.g. '7d') or expires_at"
        )
    try:
        length = parse_duration(body.expires_in)
    except ValueError as exc:
        raise GrantRefused("expires_in", str(exc)) from None
    except OverflowError:
        raise GrantRefused("expires_in", "is more than 400 days; raise the quota instead") from None
    if length <= timedelta(0):
        raise GrantRefused("expires_in", f"{body.expires_in!r} is not in the future")
    if length > MAX_EXPIRY:
        raise GrantRefused("expires_in", "is more than 400 days; raise the quota instead")
    return now + length


def plan_grant(
    config: PolicyConfig,
    body: GrantRequest,
    scope: Literal["subject", "group"],
    target: str,
    groups: Sequence[str],
    actor: str,
    now: datetime,
) -> GrantRecord:
    """The record a valid request becomes (seq and hash are filled in when it is appended).

    `groups` are the subject's groups (for a subject grant): the quota must apply to it.
    """
    rule = _rules(config, body.quota)
    if scope == "subject" and rule.per == "group":
        pools = ", ".join(rule.applies_to.groups)
        raise GrantRefused(
            "quota", f"{rule.name} is a pool shared by a group (per: group); grant to the group "
            f"instead: POST /v1/groups/{{group}}/grants (groups: {pools})",
        )  # fmt: skip
    if scope == "group":
        if rule.per != "group":
            raise GrantRefused(
                "quota", f"{rule.name} is counted per {rule.per}, not as a group pool; grant to "
                "each subject with POST /v1/subjects/{subject}/grants",
            )  # fmt: skip
        if target not in rule.applies_to.groups:
            raise GrantRefused(
                "group", f"{target!r} does not share {rule.name}; its groups are "
                f"{', '.join(rule.applies_to.groups)}",
                404 if not config.groups.get(target) else 422,
            )  # fmt: skip
    else:
        a = rule.applies_to
        if not (a.all or target in a.users or set(groups) & set(a.groups)):
            raise GrantRefused(
                "quota", f"{rule.name} does not apply to {target} (groups: "
                f"{', '.join(groups) or 'none'}); grant a quota that applies to them",
            )  # fmt: skip
    amount = _amount(body.amount, rule, config)
    return GrantRecord(
        seq=0,
        kind="grant",
        grant_id=f"g-{uuid.uuid4().hex[:12]}",
        scope=scope,
        target=target,
        quota=rule.name,
        actor=actor,
        reason=body.reason,
        recorded_at=now,
        amount=amount.base.quantize(Decimal("0.000001")),
        amount_text=body.amount.strip(),
        expires_at=_expiry(body, now),
    )


def remaining_of(
    grants: Sequence[Grant], base_limit: Decimal, used: Decimal, now: datetime
) -> dict[str, Decimal]:
    """What is left of each active grant: usage spends the configured limit first, then
    grants in the order they expire (so the one that would lapse first is used first)."""
    out: dict[str, Decimal] = {}
    spent = max(used - base_limit, Decimal(0))
    for g in sorted((g for g in grants if g.active(now)), key=lambda g: (g.expires_at, g.seq)):
        take = min(spent, g.amount)
        out[g.grant_id] = g.amount - take
        spent -= take
    return out
