"""What the API returns: response models, separate from ledger rows and wire events."""

from __future__ import annotations

from datetime import date
from decimal import Decimal
from enum import StrEnum
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from contracts._base import DecimalText, UtcDatetime
from contracts.spawn import QuotaStatus


class Public(BaseModel):
    model_config = ConfigDict(frozen=True, populate_by_name=True, serialize_by_alias=True)


class Check(Public):
    ok: bool
    detail: str
    fix: str | None = Field(default=None, description="what to do when not ok")


class Readiness(Public):
    status: Literal["ready", "not_ready"]
    checks: dict[str, Check]


class Liveness(Public):
    status: Literal["alive"] = "alive"


class GroupBy(StrEnum):
    METRIC = "metric"
    WORKLOAD = "workload"
    HOST = "host"
    HOUR = "hour"
    DAY = "day"


def _absent(value: object) -> bool:
    return value is None


class UsageRow(Public):
    """Total of one metric in one group. Only the field named by `group_by` is present."""

    metric: str
    unit: str = Field(description="base unit of the total: B, byte·s, s, or '' for counts")
    total: DecimalText = Field(description="exact decimal, as a string")
    events: int = Field(description="ledger events summed into this total")
    workload: str | None = Field(default=None, exclude_if=_absent)
    host: str | None = Field(default=None, exclude_if=_absent)
    hour: UtcDatetime | None = Field(
        default=None, exclude_if=_absent, description="start of the hour, UTC"
    )
    day: date | None = Field(
        default=None, exclude_if=_absent, description="the day, in the request's tz"
    )


class UsagePublic(Public):
    subject: str
    from_: UtcDatetime = Field(
        alias="from", description="start of the first hour bucket counted (inclusive)"
    )
    to: UtcDatetime = Field(description="end of the last hour bucket counted (exclusive)")
    group_by: GroupBy
    metric: str | None = Field(description="the metric filter, if one was given")
    tz: str = Field(description="time zone that days are counted in")
    rows: list[UsageRow]
    as_of_seq: int = Field(description="last ledger sequence the totals include")
    as_of: UtcDatetime | None = Field(description="when that ledger batch committed")


class QuotaGrantPublic(Public):
    grant_id: str
    amount: DecimalText = Field(description="in the quota's unit")
    expires_at: UtcDatetime
    scope: Literal["subject", "group"]


class LimitDetail(Public):
    """Soft limits, grace and grants (SPEC additions; `state` keeps the SPEC's three values)."""

    mode: Literal["hard", "soft"] = Field(
        default="hard", description="soft: over the limit is reported, never denied or terminated"
    )
    grace: DecimalText = Field(default=Decimal(0), description="fraction allowed over the limit")
    enforced_limit: DecimalText | None = Field(
        default=None, description="limit x (1 + grace): where denial and termination start"
    )
    enforced: bool = Field(
        default=False, description="true while this quota denies spawns / terminates workloads"
    )
    grace_remaining: DecimalText | None = Field(
        default=None, description="what may still be used before the grace runs out"
    )
    note: str | None = Field(default=None, description="e.g. 'over by 0.3 GiB·h, within grace'")
    base_limit: DecimalText | None = Field(default=None, description="the limit before grants")
    granted: DecimalText = Field(default=Decimal(0), description="active grants, in `limit`")
    grants: list[QuotaGrantPublic] = Field(default_factory=list)


class QuotaPublic(LimitDetail):
    name: str
    metric: str
    unit: str = Field(description="unit of used/limit/remaining, as the limit was written")
    used: DecimalText
    limit: DecimalText
    remaining: DecimalText
    window: str = Field(description="e.g. rolling:2592000s, calendar:month:UTC, lifetime")
    window_text: str = Field(description="the window in words, e.g. 'in the last 30 days'")
    state: Literal["ok", "warning", "exceeded"]
    retry_at: UtcDatetime | None = Field(
        description="when usage falls back under the limit if nothing more is used"
    )
    enforce: list[str]
    warn_at: list[DecimalText] = Field(
        default_factory=list, description="fractions of the limit at which a warning is given"
    )
    projected_exhaustion_at: UtcDatetime | None = Field(
        default=None,
        description=(
            "when the quota runs out at the recent rate (usage in the last min(window, 6 h) "
            "of hour buckets, projected linearly); null when nothing is being used, the quota "
            "is used up, or the instant lies beyond the window's end"
        ),
    )


class QuotasPublic(Public):
    subject: str
    groups: list[str]
    policy_version: str
    quotas: list[QuotaPublic]
    as_of_seq: int
    as_of: UtcDatetime | None
    lag_seconds: float | None = Field(description="age of the newest committed usage")


# ---- spawn checks ----------------------------------------------------------------------


class QuotaStatusPublic(LimitDetail):
    """One quota as the spawn decision saw it, in the quota's unit."""

    name: str
    metric: str
    unit: str
    used: DecimalText
    limit: DecimalText
    remaining: DecimalText
    reserved: DecimalText = Field(description="held for spawns allowed but not yet running")
    window: str
    state: Literal["ok", "warning", "exceeded"]
    retry_at: UtcDatetime | None
    enforce: list[str]


class SpawnDecisionPublic(Public):
    """The policy's answer to a spawn check: the same fields as the NATS reply."""

    schema_: Literal["tollgate.spawn_decision.v1"] = Field(
        default="tollgate.spawn_decision.v1", alias="schema"
    )
    decision_id: str = Field(description="`tollgate explain DECISION_ID` shows its inputs")
    allowed: bool
    reason: str
    message: str = Field(description="a sentence for the person who asked to spawn")
    quotas: list[QuotaStatusPublic]
    fail_open: bool = Field(
        description="true when allowed only because usage or the policy could not be checked"
    )
    retry_at: UtcDatetime | None = None


# ---- workloads -------------------------------------------------------------------------


class MetricTotal(Public):
    metric: str
    unit: str = Field(description="base unit of the total: B, byte·s, s, or '' for counts")
    total: DecimalText
    events: int
    cost: DecimalText | None = Field(
        default=None, exclude_if=_absent, description="in the report's currency (priced metrics)"
    )


class ResourcesPublic(Public):
    cpus: DecimalText
    mem_bytes: int
    gpus: int
    gpu_model: str | None


class TerminationPublic(Public):
    """The policy's decision to terminate the workload, with its explanation."""

    decision_id: str
    decided_at: UtcDatetime
    reason: str
    quota: str | None
    message: str


class ScheduledTerminationPublic(Public):
    """A notice before termination still pending: the workload stops then if still over."""

    notice_id: str
    decided_at: UtcDatetime
    terminate_at: UtcDatetime
    quota: str | None
    message: str = Field(
        description="the sentence `tollgate run` prints on the workload's stderr (show it as is)"
    )


class WorkloadPublic(Public):
    workload: str
    subject: str
    host: str | None = Field(description="where it ran (the host that announced it)")
    hosts: list[str] = Field(description="every host that reported usage for it")
    state: Literal["running", "stopped", "terminated", "unknown"] = Field(
        description="unknown: no lifecycle event reached the policy, only usage"
    )
    state_detail: str
    groups: list[str]
    resources: ResourcesPublic | None
    started_at: UtcDatetime | None
    stopped_at: UtcDatetime | None
    exit_status: int | None
    termination_reason: str | None
    termination: TerminationPublic | None
    scheduled_termination: ScheduledTerminationPublic | None = Field(
        default=None,
        description="a termination announced by a notice (termination.notice_seconds) that "
        "has neither happened nor been cancelled yet",
    )
    terminate_commands: int = Field(
        default=0, description="terminate commands the policy sent it (re-sent while it runs)"
    )
    ignored_commands: int = Field(
        default=0,
        description="of those, how many it outlived: usage sampled after the command's grace",
    )
    usage_from: UtcDatetime | None = Field(description="start of the first hour with usage")
    usage_to: UtcDatetime | None = Field(description="end of the last hour with usage")
    usage: list[MetricTotal]
    as_of_seq: int
    as_of: UtcDatetime | None


# ---- reports ---------------------------------------------------------------------------


class ReportGroupBy(StrEnum):
    SUBJECT = "subject"
    WORKLOAD = "workload"
    HOST = "host"
    DAY = "day"


class ReportFormat(StrEnum):
    JSON = "json"
    CSV = "csv"


class ReportRow(Public):
    """Total of one metric for one subject (and workload, host or day when grouped so)."""

    subject: str
    metric: str
    unit: str
    total: DecimalText
    events: int
    workload: str | None = Field(default=None, exclude_if=_absent)
    host: str | None = Field(default=None, exclude_if=_absent)
    day: date | None = Field(default=None, exclude_if=_absent, description="UTC day")
    cost: DecimalText | None = Field(
        default=None,
        exclude_if=_absent,
        description="what the usage costs in the report's currency, each hour at the price in "
        "force then, to 6 decimal places (half-even); absent for unpriced metrics",
    )


class UsageReportPublic(Public):
    from_: UtcDatetime = Field(alias="from", description="start of the first hour counted")
    to: UtcDatetime = Field(description="end of the last hour counted (exclusive)")
    group_by: ReportGroupBy
    metric: str | None
    subjects: int = Field(description="subjects with usage in the range")
    rows: list[ReportRow]
    totals: list[MetricTotal] = Field(description="every subject together, per metric")
    currency: str | None = Field(
        default=None, exclude_if=_absent, description="of every cost, when prices are configured"
    )
    total_cost: DecimalText | None = Field(
        default=None, exclude_if=_absent, description="every subject and metric together"
    )
    as_of_seq: int
    as_of: UtcDatetime | None


# ---- grants ----------------------------------------------------------------------------


class GrantPublic(Public):
    """A grant: extra allowance on one quota until it expires (SPEC addition)."""

    grant_id: str
    scope: Literal["subject", "group"]
    target: str = Field(description="the subject, or the group whose pool it raises")
    quota: str
    metric: str | None = Field(description="null when the quota is no longer in the file")
    amount: DecimalText = Field(description="in `unit`")
    unit: str
    amount_text: str = Field(description="as the admin wrote it")
    remaining: DecimalText = Field(
        description="what is left of it: usage spends the configured limit first, then "
        "grants in the order they expire"
    )
    state: Literal["active", "expired", "revoked"]
    granted_by: str
    granted_at: UtcDatetime
    expires_at: UtcDatetime
    reason: str
    revoked_at: UtcDatetime | None = None
    revoked_by: str | None = None
    revoke_reason: str | None = None
    seq: int = Field(description="position of the grant record in the hash chain")


class GrantsPublic(Public):
    scope: Literal["subject", "group"]
    target: str
    groups: list[str] = Field(description="for a subject: the groups whose pool grants count")
    grants: list[GrantPublic]


class GrantChainPublic(Public):
    """Whether the grants record's hash chain holds, and where it breaks if not."""

    ok: bool
    records: int
    head_hash: str
    first_bad_seq: int | None
    problem: str | None


def limit_detail(status: QuotaStatus) -> dict[str, Any]:
    """The `LimitDetail` fields of a quota status, to build a public model with."""
    return status.model_dump(include=set(LimitDetail.model_fields))
