"""Spawn checks: request/reply on NATS and POST /v1/spawn-checks (SPEC 2.5)."""

from __future__ import annotations

from decimal import Decimal
from typing import Final, Literal

from pydantic import Field

from ._base import DEFAULT_PREFIX, Contract, DecimalText, Name, UtcDatetime, subject_of
from .workloads import Resources

REQUEST_SCHEMA: Final = "tollgate.spawn_request.v1"
DECISION_SCHEMA: Final = "tollgate.spawn_decision.v1"


class SpawnRequest(Contract):
    """May this subject start this workload?"""

    schema_: Literal["tollgate.spawn_request.v1"] = Field(default=REQUEST_SCHEMA, alias="schema")
    subject: Name
    groups: list[Name] = Field(default_factory=list, max_length=100)
    workload: Name | None = None
    host: Name | None = None
    resources: Resources = Field(default_factory=Resources)
    expected_seconds: Decimal = Field(
        default=Decimal(3600),
        ge=0,
        le=10**9,
        decimal_places=6,
        description="how long the workload will run; 0 reserves nothing for it",
    )


class QuotaGrant(Contract):
    """A grant raising a quota's limit, in the quota's unit (SPEC addition)."""

    grant_id: str
    amount: DecimalText
    expires_at: UtcDatetime
    scope: Literal["subject", "group"] = "subject"


class QuotaStatus(Contract):
    """One quota as it stands for one subject.

    `state` keeps the SPEC's three values (exceeded = at or over `limit`); the fields after
    `reserved` are additions: whether being over is enforced now (`enforced`), the grace
    still left before it is, soft mode, and the grants included in `limit`.
    """

    name: str
    metric: str
    unit: str
    used: DecimalText
    limit: DecimalText
    remaining: DecimalText
    window: str
    state: Literal["ok", "warning", "exceeded"]
    retry_at: UtcDatetime | None = None
    enforce: list[str] = Field(default_factory=list)
    reserved: DecimalText = Field(
        default=Decimal(0), description="held for spawns allowed but not yet showing usage"
    )
    projected_exhaustion_at: UtcDatetime | None = Field(
        default=None,
        description=(
            "when the quota runs out at the subject's recent rate (usage over the last "
            "min(window, 6 h) of hour buckets); null when nothing is being used, the quota is "
            "already used up, or the instant lies beyond the window's end"
        ),
    )
    mode: Literal["hard", "soft"] = Field(
        default="hard", description="soft: over the limit is reported, never denied or terminated"
    )
    grace: DecimalText = Field(default=Decimal(0), description="fraction allowed over the limit")
    enforced_limit: DecimalText | None = Field(
        default=None, description="limit x (1 + grace): where denial and termination start; "
        "null for a soft quota",
    )  # fmt: skip
    enforced: bool = Field(
        default=False, description="true when spawns are denied / workloads terminated by it now"
    )
    grace_remaining: DecimalText | None = Field(
        default=None, description="how much more may be used before the grace runs out"
    )
    note: str | None = Field(
        default=None, description="what being over means, e.g. 'over by 0.3 GiB·h, within grace'"
    )
    base_limit: DecimalText | None = Field(default=None, description="the limit before grants")
    granted: DecimalText = Field(default=Decimal(0), description="active grants, in `limit`")
    grants: list[QuotaGrant] = Field(default_factory=list)


class SpawnDecision(Contract):
    """The answer to a spawn request, with a sentence a person can act on."""

    schema_: Literal["tollgate.spawn_decision.v1"] = Field(default=DECISION_SCHEMA, alias="schema")
    decision_id: str
    allowed: bool
    reason: str
    message: str
    quotas: list[QuotaStatus] = Field(default_factory=list)
    fail_open: bool = False
    retry_at: UtcDatetime | None = None


def spawn_check_subject(prefix: str = DEFAULT_PREFIX) -> str:
    """`tollgate.v1.spawn.check` (request/reply)."""
    return subject_of(prefix, "spawn", "check")
