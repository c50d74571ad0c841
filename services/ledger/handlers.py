"""Turning raw sample messages into batches, or into dead letters with a reason."""

from __future__ import annotations

from pydantic import ValidationError

from contracts import PayloadError, parse_json
from contracts.dlq import DeadLetter, DeadLetterReason, host_of_subject, invalid
from contracts.errors import printable
from contracts.samples import SCHEMA, CounterBatch, FastCounterBatch, decode_counter_batch


def parse_sample_message(
    subject: str, body: bytes, max_payload: int, msg_id: str | None = None
) -> CounterBatch | FastCounterBatch:
    """Validate one message of the samples stream; raise DeadLetter if it is unusable.

    msgspec reads what it can vouch for; everything else (poison, lax spellings) is read by
    the CounterBatch schema, whose verdict and dead-letter detail are the reference.
    """
    if len(body) > max_payload:
        raise DeadLetter(
            DeadLetterReason.OVERSIZE,
            f"{len(body)} bytes is over the {max_payload}-byte limit; send smaller batches",
        )
    batch = decode_counter_batch(body)
    if batch is None:
        batch = validate_sample_body(body)
    return check_origin(batch, subject, msg_id)


def validate_sample_body(body: bytes) -> CounterBatch:
    """The schema-of-record path: CounterBatch validates `body`, or DeadLetter says why not."""
    try:
        data = parse_json(body)
    except PayloadError as exc:
        raise DeadLetter(DeadLetterReason.INVALID_JSON, str(exc)) from None
    schema = data.get("schema")
    if schema != SCHEMA:
        raise DeadLetter(
            DeadLetterReason.UNKNOWN_SCHEMA,
            f"schema {schema!r} is not one this ledger reads (expected {SCHEMA!r})",
        )
    try:
        batch = CounterBatch.model_validate(data)
    except ValidationError as exc:
        raise invalid(exc) from None
    return batch


def check_origin(
    batch: CounterBatch | FastCounterBatch, subject: str, msg_id: str | None
) -> CounterBatch | FastCounterBatch:
    """A host may only publish its own counters, under the Nats-Msg-Id that names them."""
    # `<prefix>.v1.samples.<host>`, stored as `....<host>.<partition>` when partitioned.
    subject_host = host_of_subject(subject)
    if batch.host != subject_host:
        raise DeadLetter(
            DeadLetterReason.HOST_MISMATCH,
            f"payload host {batch.host!r} was published on the subject of host "
            f"{subject_host!r}; a host may only report its own counters",
        )
    if msg_id is not None and msg_id != batch.msg_id:
        raise DeadLetter(
            DeadLetterReason.MSG_ID_MISMATCH,
            f"header Nats-Msg-Id {printable(msg_id)!r} names another sample than this one "
            f"({batch.msg_id!r}); publish each sample with Nats-Msg-Id <host>:<epoch>:<seq>",
        )
    return batch
