"""The usage feed (SPEC 2.3): committed usage events, many to a message.

`tollgate.usage_recorded.v1` (`UsageRecorded`) is one event: what `GET /v1/events` and
`tollgate replay --after` give, one per line. On the bus the ledger publishes
`tollgate.usage_batch.v1` (`UsageBatch`): one message per (ledger batch, subject, chunk of at
most `MAX_BATCH_EVENTS` events and `MAX_BATCH_BYTES` bytes), covering a contiguous range of
ledger seqs, so consecutive envelopes on the stream are consecutive ranges. `records()`
expands an envelope into the per-event `UsageRecorded` objects it stands for.
"""

from __future__ import annotations

from datetime import datetime
from typing import Final, Literal, Self

from pydantic import Field, model_validator

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
BATCH_SCHEMA: Final = "tollgate.usage_batch.v1"
# One envelope holds at most this many events and this many bytes of JSON.
MAX_BATCH_EVENTS: Final = 1000
MAX_BATCH_BYTES: Final = 512 * 1024


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


class UsageBatchEvent(Contract):
    """One event of a `UsageBatch`: a `UsageRecorded` without what the batch says once."""

    seq: int = Field(ge=1, description="ledger sequence number, gap-free from 1")
    host: Name
    epoch: str
    workload: Name
    metric: MetricName
    delta: DecimalText
    window_start: datetime | None = Field(
        default=None, description="where the reading this delta starts from was placed"
    )
    window_end: UtcDatetime
    reset: bool = False
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


class UsageBatch(Contract):
    """Consecutive usage events of one subject from one ledger batch (the feed's message).

    `events` are exactly seqs `first_seq`..`last_seq` in order; header
    `Nats-Msg-Id: usage:<first_seq>-<last_seq>`. The next envelope on the stream starts at
    `last_seq + 1`.
    """

    schema_: Literal["tollgate.usage_batch.v1"] = Field(default=BATCH_SCHEMA, alias="schema")
    subject: Name
    batch_id: int = Field(ge=1, description="the ledger batch (hash-chain link) of the events")
    batch_hash: str
    recorded_at: UtcDatetime = Field(description="when the ledger committed the batch")
    first_seq: int = Field(ge=1)
    last_seq: int = Field(ge=1)
    events: list[UsageBatchEvent] = Field(min_length=1, max_length=MAX_BATCH_EVENTS)

    @model_validator(mode="after")
    def _contiguous(self) -> Self:
        if self.last_seq - self.first_seq + 1 != len(self.events) or any(
            e.seq != self.first_seq + i for i, e in enumerate(self.events)
        ):
            raise ValueError(
                f"events must be exactly seqs {self.first_seq}..{self.last_seq} in order"
            )
        return self

    @property
    def msg_id(self) -> str:
        return usage_msg_id(self.first_seq, self.last_seq)

    def records(self) -> list[UsageRecorded]:
        """The per-event `tollgate.usage_recorded.v1` messages this envelope stands for."""
        batch = {"recorded_at": self.recorded_at, "subject": self.subject,
                 "batch_hash": self.batch_hash}  # fmt: skip
        return [UsageRecorded(**dict(e), **batch) for e in self.events]


def usage_msg_id(first_seq: int, last_seq: int) -> str:
    """`Nats-Msg-Id` of the envelope of seqs first..last: republished, it is deduplicated."""
    return f"usage:{first_seq}-{last_seq}"


def usage_subject(subject: str, prefix: str = DEFAULT_PREFIX) -> str:
    """`tollgate.v1.usage.<subject>`."""
    return subject_of(prefix, "usage", encode_token(subject))


def usage_wildcard(prefix: str = DEFAULT_PREFIX) -> str:
    """Every subject's usage."""
    return subject_of(prefix, "usage", "*")


def usage_stream(prefix: str = DEFAULT_PREFIX) -> str:
    """Stream TOLLGATE_USAGE."""
    return stream_of(prefix, "USAGE")
