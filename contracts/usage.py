"""The usage feed: one message per committed usage event (SPEC 2.3)."""

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

SCHEMA: Final = "tollgate.usage_recorded.v1"


class UsageRecorded(Contract):
    """A usage event the ledger committed, with its place in the hash chain."""

    schema_: Literal["tollgate.usage_recorded.v1"] = Field(default=SCHEMA, alias="schema")
    seq: int = Field(ge=1, description="ledger sequence number, gap-free from 1")
    recorded_at: UtcDatetime
    host: Name
    epoch: str
    subject: Name
    workload: Name
    metric: MetricName
    delta: DecimalText
    window_start: datetime | None = Field(
        default=None, description="where the reading this delta starts from was placed"
    )
    window_end: UtcDatetime
    reset: bool = False
    batch_hash: str
    labels: dict[str, str] = Field(
        default_factory=dict, description="the sample's labels, e.g. gpu_model (prices use it)"
    )
    received_at: UtcDatetime | None = Field(
        default=None, description="when JetStream stored the sample (events since 0004)"
    )
    sampled_at: UtcDatetime | None = Field(
        default=None, description="the sample's sampled_at as its host reported it"
    )
    clock_skew_seconds: DecimalText | None = Field(
        default=None,
        description="sampled_at - received_at in seconds, set only when beyond the ledger's "
        "clock-skew tolerance: window_end is then the clamped time, not sampled_at",
    )


def usage_subject(subject: str, prefix: str = DEFAULT_PREFIX) -> str:
    """`tollgate.v1.usage.<subject>`."""
    return subject_of(prefix, "usage", encode_token(subject))


def usage_wildcard(prefix: str = DEFAULT_PREFIX) -> str:
    """Every subject's usage."""
    return subject_of(prefix, "usage", "*")


def usage_stream(prefix: str = DEFAULT_PREFIX) -> str:
    """Stream TOLLGATE_USAGE."""
    return stream_of(prefix, "USAGE")
