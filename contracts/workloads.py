"""Workload lifecycle events (SPEC 2.4)."""

from __future__ import annotations

from decimal import Decimal
from typing import Final, Literal

from pydantic import Field

from ._base import (
    DEFAULT_PREFIX,
    Contract,
    Name,
    Text,
    UtcDatetime,
    encode_token,
    stream_of,
    subject_of,
)

STARTED_SCHEMA: Final = "tollgate.workload_started.v1"
STOPPED_SCHEMA: Final = "tollgate.workload_stopped.v1"


class Resources(Contract):
    """What a workload was given (or asks for)."""

    cpus: Decimal = Field(default=Decimal(0), ge=0, le=100_000, decimal_places=6)
    mem_bytes: int = Field(default=0, ge=0, le=2**60)
    gpus: int = Field(default=0, ge=0, le=10_000)
    gpu_model: Text | None = Field(default=None, max_length=100)


class WorkloadStarted(Contract):
    """A workload began running on a host."""

    schema_: Literal["tollgate.workload_started.v1"] = Field(default=STARTED_SCHEMA, alias="schema")
    workload: Name
    subject: Name
    groups: list[Name] = Field(default_factory=list, max_length=100)
    host: Name
    resources: Resources = Field(default_factory=Resources)
    started_at: UtcDatetime


class WorkloadStopped(Contract):
    """A workload ended, by itself or by a termination command."""

    schema_: Literal["tollgate.workload_stopped.v1"] = Field(default=STOPPED_SCHEMA, alias="schema")
    workload: Name
    subject: Name | None = None
    host: Name | None = None
    stopped_at: UtcDatetime
    exit_status: int | None = None
    termination_reason: Text | None = None


def workloads_subject(host: str, prefix: str = DEFAULT_PREFIX) -> str:
    """`tollgate.v1.workloads.<host>`."""
    return subject_of(prefix, "workloads", encode_token(host))


def workloads_wildcard(prefix: str = DEFAULT_PREFIX) -> str:
    """Every host's workload events."""
    return subject_of(prefix, "workloads", "*")


def workloads_stream(prefix: str = DEFAULT_PREFIX) -> str:
    """Stream TOLLGATE_WORKLOADS."""
    return stream_of(prefix, "WORKLOADS")
