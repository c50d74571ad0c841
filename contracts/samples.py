"""Counter samples: what meter agents publish (SPEC 2.1)."""

from __future__ import annotations

from typing import Final, Literal

from pydantic import Field, field_validator, model_validator

from ._base import (
    DEFAULT_PREFIX,
    Amount,
    Contract,
    Labels,
    MetricName,
    Name,
    UtcDatetime,
    encode_token,
    stream_of,
    subject_of,
)

SCHEMA: Final = "tollgate.counter_batch.v1"
STANDARD_METRICS = frozenset(
    {
        "net.tx.wan.bytes",
        "net.rx.wan.bytes",
        "net.tx.lan.bytes",
        "net.rx.lan.bytes",
        "log.bytes",
        "cpu.used.seconds",
        "cpu.alloc.seconds",
        "mem.used.byte_seconds",
        "mem.alloc.byte_seconds",
        "gpu.alloc.seconds",
        "gpu.used.seconds",
    }
)
MAX_COUNTERS = 10_000


def is_byte_metric(metric: str) -> bool:
    """Byte metrics are whole numbers of bytes."""
    return metric.endswith(".bytes")


class CounterSample(Contract):
    """One cumulative counter reading of one series."""

    subject: Name
    workload: Name
    metric: MetricName
    value: Amount
    labels: Labels = Field(default_factory=dict)

    @model_validator(mode="after")
    def _bytes_are_integers(self) -> CounterSample:
        if is_byte_metric(self.metric) and self.value != self.value.to_integral_value():
            raise ValueError(f"{self.metric} counts bytes and must be an integer")
        return self


class CounterBatch(Contract):
    """All counters one host read at one instant, cumulative within `epoch`."""

    schema_: Literal["tollgate.counter_batch.v1"] = Field(default=SCHEMA, alias="schema")
    host: Name
    epoch: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9_\-]+$")
    seq: int = Field(ge=0, le=2**62)
    sampled_at: UtcDatetime
    counters: list[CounterSample] = Field(max_length=MAX_COUNTERS)
    final: bool = False

    @field_validator("counters")
    @classmethod
    def _one_reading_per_series(cls, counters: list[CounterSample]) -> list[CounterSample]:
        seen: set[tuple[str, str, str]] = set()
        for c in counters:
            key = (c.subject, c.workload, c.metric)
            if key in seen:
                raise ValueError(
                    f"series {key} appears twice in one batch; send one reading per series"
                )
            seen.add(key)
        return counters

    @property
    def msg_id(self) -> str:
        """The Nats-Msg-Id JetStream deduplicates on."""
        return f"{self.host}:{self.epoch}:{self.seq}"


def samples_subject(host: str, prefix: str = DEFAULT_PREFIX) -> str:
    """`tollgate.v1.samples.<host>`: where a host publishes its counters."""
    return subject_of(prefix, "samples", encode_token(host))


def samples_wildcard(prefix: str = DEFAULT_PREFIX) -> str:
    """All hosts' samples."""
    return subject_of(prefix, "samples", "*")


def samples_stream(prefix: str = DEFAULT_PREFIX) -> str:
    """Stream TOLLGATE_SAMPLES."""
    return stream_of(prefix, "SAMPLES")
