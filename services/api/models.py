"""What the API returns: response models, separate from ledger rows and wire events."""

from __future__ import annotations

from datetime import date
from enum import StrEnum
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from contracts._base import DecimalText, UtcDatetime


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


class QuotaPublic(Public):
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


class QuotasPublic(Public):
    subject: str
    groups: list[str]
    policy_version: str
    quotas: list[QuotaPublic]
    as_of_seq: int
    as_of: UtcDatetime | None
    lag_seconds: float | None = Field(description="age of the newest committed usage")
