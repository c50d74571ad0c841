"""Notice before termination: a workload told it will be stopped, and told when it will not.

Addition to SPEC 2.5 (README, "Notice before termination"). Both messages go to the
workload's host (`tollgate.v1.commands.notice.<host>`, stored in the commands stream, read by
`tollgate run` and the meter agent like terminate commands) and to integrators on the quota
events subject of the subject.
"""

from __future__ import annotations

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
    subject_of,
)

SCHEDULED_SCHEMA: Final = "tollgate.termination_scheduled.v1"
CANCELLED_SCHEMA: Final = "tollgate.termination_cancelled.v1"


class TerminationScheduled(Contract):
    """A workload is over a terminate-enforced quota with a notice: it stops at terminate_at."""

    schema_: Literal["tollgate.termination_scheduled.v1"] = Field(
        default=SCHEDULED_SCHEMA, alias="schema"
    )
    notice_id: str = Field(min_length=1, max_length=200)
    command_id: str = Field(
        min_length=1, max_length=200, description="the terminate command that follows, if any"
    )
    workload: Name
    subject: Name
    host: Name
    quota: str
    metric: MetricName
    used: DecimalText = Field(description="in the quota's unit")
    limit: DecimalText = Field(description="in the quota's unit")
    unit: str
    terminate_at: UtcDatetime
    reason: str = Field(min_length=1, max_length=100)
    message: str = Field(description="the sentence to show the workload's owner")
    decided_at: UtcDatetime


class TerminationCancelled(Contract):
    """A scheduled termination will not happen: a grant, a raised limit or usage falling."""

    schema_: Literal["tollgate.termination_cancelled.v1"] = Field(
        default=CANCELLED_SCHEMA, alias="schema"
    )
    notice_id: str = Field(min_length=1, max_length=200)
    workload: Name
    subject: Name
    host: Name
    quota: str
    terminate_at: UtcDatetime = Field(description="when the stop was planned")
    why: str
    message: str = Field(description="the sentence to show the workload's owner")
    decided_at: UtcDatetime


Notice = TerminationScheduled | TerminationCancelled


def notice_subject(host: str, prefix: str = DEFAULT_PREFIX) -> str:
    """`tollgate.v1.commands.notice.<host>`."""
    return subject_of(prefix, "commands", "notice", encode_token(host))
