"""Quota warnings and crossings (SPEC 2.5)."""

from __future__ import annotations

from datetime import datetime
from typing import Final, Literal

from pydantic import Field

from ._base import (
    DEFAULT_PREFIX,
    Contract,
    DecimalText,
    Name,
    QuotaMetric,
    UtcDatetime,
    encode_token,
    stream_of,
    subject_of,
)

WARNING_SCHEMA: Final = "tollgate.quota_warning.v1"
EXCEEDED_SCHEMA: Final = "tollgate.quota_exceeded.v1"
FORECAST_SCHEMA: Final = "tollgate.quota_forecast.v1"


class QuotaWarning(Contract):
    """A subject passed a configured fraction of a quota."""

    schema_: Literal["tollgate.quota_warning.v1"] = Field(default=WARNING_SCHEMA, alias="schema")
    subject: Name
    quota: str
    metric: QuotaMetric
    threshold: DecimalText
    workload: Name | None = Field(default=None, description="set for per-workload quotas")
    used: DecimalText
    limit: DecimalText
    unit: str
    decided_at: UtcDatetime


class QuotaExceeded(Contract):
    """A subject (or workload, or group pool) went over a quota."""

    schema_: Literal["tollgate.quota_exceeded.v1"] = Field(default=EXCEEDED_SCHEMA, alias="schema")
    subject: Name
    quota: str
    metric: QuotaMetric
    used: DecimalText
    limit: DecimalText
    unit: str
    retry_at: datetime | None = None
    workload: Name | None = Field(default=None, description="set for per-workload quotas")
    decided_at: UtcDatetime


class QuotaForecast(Contract):
    """At its recent rate, a subject (or group pool) will use up a quota within its window.

    Sent once when the projection first falls inside the window, not on every update; the
    projection itself is on every quota status as `projected_exhaustion_at`.
    """

    schema_: Literal["tollgate.quota_forecast.v1"] = Field(default=FORECAST_SCHEMA, alias="schema")
    subject: Name
    quota: str
    metric: QuotaMetric
    used: DecimalText
    limit: DecimalText
    unit: str
    rate_per_hour: DecimalText = Field(
        description="the recent rate, in the quota's unit per hour (rounded to 6 places)"
    )
    projected_exhaustion_at: UtcDatetime
    window: str = Field(description="the quota's window, e.g. 'rolling:2592000s'")
    decided_at: UtcDatetime


def quota_events_subject(subject: str, prefix: str = DEFAULT_PREFIX) -> str:
    """`tollgate.v1.events.quota.<subject>`."""
    return subject_of(prefix, "events", "quota", encode_token(subject))


def events_wildcard(prefix: str = DEFAULT_PREFIX) -> str:
    """Every quota event."""
    return subject_of(prefix, "events", ">")


def events_stream(prefix: str = DEFAULT_PREFIX) -> str:
    """Stream TOLLGATE_EVENTS: warnings and crossings, replayable by integrators."""
    return stream_of(prefix, "EVENTS")
