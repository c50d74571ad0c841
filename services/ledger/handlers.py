"""Turning raw sample messages into batches, or into dead letters with a reason."""

from __future__ import annotations

from pydantic import ValidationError

from contracts import PayloadError, decode_token, parse_json
from contracts.dlq import DeadLetterReason
from contracts.samples import SCHEMA, CounterBatch

from .errors import DeadLetter


def parse_sample_message(subject: str, body: bytes, max_payload: int) -> CounterBatch:
    """Validate one message of the samples stream; raise DeadLetter if it is unusable."""
    if len(body) > max_payload:
        raise DeadLetter(
            DeadLetterReason.OVERSIZE,
            f"{len(body)} bytes is over the {max_payload}-byte limit; send smaller batches",
        )
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
        raise DeadLetter(DeadLetterReason.INVALID_PAYLOAD, _describe(exc)) from None
    # `<prefix>.v1.samples.<host>`, stored as `....<host>.<partition>` when partitioned.
    subject_host = decode_token(subject.split(".")[3])
    if batch.host != subject_host:
        raise DeadLetter(
            DeadLetterReason.HOST_MISMATCH,
            f"payload host {batch.host!r} was published on the subject of host "
            f"{subject_host!r}; a host may only report its own counters",
        )
    return batch


def _describe(exc: ValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        where = ".".join(str(p) for p in err["loc"]) or "body"
        parts.append(f"{where}: {err['msg']}")
    more = exc.error_count() - 5
    if more > 0:
        parts.append(f"and {more} more")
    return "; ".join(parts)
