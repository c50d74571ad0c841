"""Dead letters: a message no consumer can ever take, filed with its reason (SPEC 2.2)."""

from __future__ import annotations

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from contracts.dlq import (
    DETAIL_HEADER,
    REASON_HEADER,
    STREAM_SEQ_HEADER,
    SUBJECT_HEADER,
    DeadLetterReason,
    dlq_subject,
)
from contracts.errors import printable

MAX_BODY = 900_000


async def file_dead_letter(
    js: JetStreamContext,
    msg: Msg,
    reason: DeadLetterReason,
    detail: str,
    *,
    prefix: str,
    consumer: str,
) -> None:
    """Copy `msg` to `<prefix>.v1.dlq.<reason>` with why, then terminate it (no redelivery)."""
    stream_seq = msg.metadata.sequence.stream
    headers = {
        REASON_HEADER: reason.value,
        # Printable: a header line must not carry the newlines a hostile name holds.
        DETAIL_HEADER: printable(detail, 1000),
        SUBJECT_HEADER: msg.subject,
        STREAM_SEQ_HEADER: str(stream_seq),
        # Redelivery after a crash must not file the same dead letter twice.
        "Nats-Msg-Id": f"dlq:{consumer}:{stream_seq}",
    }
    body = msg.data if len(msg.data) <= MAX_BODY else msg.data[:MAX_BODY]
    await js.publish(dlq_subject(reason, prefix), body, headers=headers)
    await msg.term()
