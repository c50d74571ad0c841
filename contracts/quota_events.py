"""Quota warnings and crossings (SPEC 2.5)."""

from __future__ import annotations

from datetime import datetime
from typing import Final, Literal

from pydantic import Field

from ._base import (
    DEFAULT_PREFIX,
    Contract,
    DecimalText,
    MetricName,
    Name,
    UtcDatetime,
    encode_token,
    stream_of,
    subject_of,
)

WARNING_SCHEMA: Final = "tollgate.quota_warning.v1"
EXCEEDED_SCHEMA: Final = "tollgate.quota_exceeded.v1"


class QuotaWarning(Contract):
    """A subject passed a configured fraction of a quota."""

    schema_: Literal["tollgate.quota_warning.v1"] = Field(default=WARNING_SCHEMA, alias="schema")
    subject: Name
    quota: str
    metric: MetricName
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
    metric: MetricName
    used: DecimalText
    limit: DecimalText
    unit: str
    retry_at: datetime | None = None
    workload: Name | None = Field(default=None, description="set for per-workload quotas")
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
