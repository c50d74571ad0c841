"""Dead letters: malformed or unauthorised messages, kept with the reason (SPEC 2.2)."""

from __future__ import annotations

from enum import StrEnum

from ._base import DEFAULT_PREFIX, stream_of, subject_of


class DeadLetterReason(StrEnum):
    """Why a message could not be taken; the last token of its DLQ subject."""

    INVALID_JSON = "invalid_json"
    UNKNOWN_SCHEMA = "unknown_schema"
    INVALID_PAYLOAD = "invalid_payload"
    HOST_MISMATCH = "host_mismatch"
    OVERSIZE = "oversize"


# Headers a dead letter carries beside the original body.
REASON_HEADER = "Tollgate-Dlq-Reason"
DETAIL_HEADER = "Tollgate-Dlq-Detail"
SUBJECT_HEADER = "Tollgate-Original-Subject"
STREAM_SEQ_HEADER = "Tollgate-Original-Stream-Seq"


def dlq_subject(reason: DeadLetterReason, prefix: str = DEFAULT_PREFIX) -> str:
    """`tollgate.v1.dlq.<reason>`."""
    return subject_of(prefix, "dlq", reason.value)


def dlq_wildcard(prefix: str = DEFAULT_PREFIX) -> str:
    """Every dead letter."""
    return subject_of(prefix, "dlq", "*")


def dlq_stream(prefix: str = DEFAULT_PREFIX) -> str:
    """Stream TOLLGATE_DLQ."""
    return stream_of(prefix, "DLQ")
