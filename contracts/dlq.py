"""Dead letters: malformed or unauthorised messages, kept with the reason (SPEC 2.2)."""

from __future__ import annotations

from enum import StrEnum

from pydantic import ValidationError

from ._base import DEFAULT_PREFIX, decode_token, stream_of, subject_of
from .errors import describe, field_errors, printable


class DeadLetterReason(StrEnum):
    """Why a message could not be taken; the last token of its DLQ subject."""

    INVALID_JSON = "invalid_json"
    UNKNOWN_SCHEMA = "unknown_schema"
    INVALID_PAYLOAD = "invalid_payload"
    HOST_MISMATCH = "host_mismatch"
    OVERSIZE = "oversize"
    # A host, subject, workload, group or label key no service can carry (control
    # characters, lone surrogates, over 200 characters, a subject token not canonically
    # %-encoded); see README "Names".
    INVALID_NAME = "invalid_name"
    # A `Nats-Msg-Id` header that is not `<host>:<epoch>:<seq>` of the payload: JetStream
    # would drop or keep it as the sample it names, so the ledger must not count it as another.
    MSG_ID_MISMATCH = "msg_id_mismatch"


class DeadLetter(Exception):
    """A message that can never be taken; it goes to the DLQ with this reason."""

    def __init__(self, reason: DeadLetterReason, detail: str) -> None:
        super().__init__(f"{reason.value}: {detail}")
        self.reason = reason
        self.detail = detail


def host_of_subject(subject: str) -> str:
    """The host a `<prefix>.v1.<kind>.<host>[...]` subject names; DeadLetter if none can."""
    try:
        return decode_token(subject.split(".")[3])
    except (IndexError, ValueError) as exc:
        raise DeadLetter(
            DeadLetterReason.INVALID_NAME,
            f"subject {printable(subject)!r} does not name a host: {exc}; build it with "
            "contracts' subject builders (names are %-encoded with upper-case hex)",
        ) from None


def invalid(exc: ValidationError) -> DeadLetter:
    """A payload that failed validation: `invalid_name` when a name is at fault."""
    errors = field_errors(exc)
    names = any(e["type"] == "invalid_name" for e in exc.errors())
    reason = DeadLetterReason.INVALID_NAME if names else DeadLetterReason.INVALID_PAYLOAD
    return DeadLetter(reason, describe(errors, exc.error_count() - len(errors)))


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
