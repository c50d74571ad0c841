"""Policy output: termination and spawn-block commands (SPEC 2.5)."""

from __future__ import annotations

from decimal import Decimal
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

TERMINATE_SCHEMA: Final = "tollgate.terminate_workload.v1"
BLOCK_SCHEMA: Final = "tollgate.spawn_block.v1"

# Reasons the SPEC names; a quota may configure its own.
LOG_QUOTA_EXCEEDED = "log_quota_exceeded"
DATA_TRANSFER_QUOTA_EXCEEDED = "data_transfer_quota_exceeded"
COMPUTE_QUOTA_EXCEEDED = "compute_quota_exceeded"


class TerminateWorkload(Contract):
    """Order to a host: stop this workload (SIGTERM, grace, SIGKILL)."""

    schema_: Literal["tollgate.terminate_workload.v1"] = Field(
        default=TERMINATE_SCHEMA, alias="schema"
    )
    command_id: str = Field(min_length=1, max_length=200)
    workload: Name
    subject: Name
    reason: str = Field(min_length=1, max_length=100)
    quota: str
    metric: QuotaMetric
    used: DecimalText
    limit: DecimalText
    grace_seconds: Decimal = Field(default=Decimal(30), ge=0, le=86_400)
    decided_at: UtcDatetime


class SpawnBlock(Contract):
    """Order to integrators: refuse (block) or allow again (unblock) spawns of a subject."""

    schema_: Literal["tollgate.spawn_block.v1"] = Field(default=BLOCK_SCHEMA, alias="schema")
    subject: Name
    quota: str
    reason: str
    until: UtcDatetime | None = None


def terminate_subject(host: str, prefix: str = DEFAULT_PREFIX) -> str:
    """`tollgate.v1.commands.terminate.<host>`."""
    return subject_of(prefix, "commands", "terminate", encode_token(host))


def block_subject(subject: str, prefix: str = DEFAULT_PREFIX) -> str:
    """`tollgate.v1.commands.block.<subject>`."""
    return subject_of(prefix, "commands", "block", encode_token(subject))


def unblock_subject(subject: str, prefix: str = DEFAULT_PREFIX) -> str:
    """`tollgate.v1.commands.unblock.<subject>`."""
    return subject_of(prefix, "commands", "unblock", encode_token(subject))


def commands_wildcard(prefix: str = DEFAULT_PREFIX) -> str:
    """Every command."""
    return subject_of(prefix, "commands", ">")


def commands_stream(prefix: str = DEFAULT_PREFIX) -> str:
    """Stream TOLLGATE_COMMANDS."""
    return stream_of(prefix, "COMMANDS")
