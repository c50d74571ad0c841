"""Error replies: what a request/reply service answers a request it cannot take."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, Final, Literal

from pydantic import Field, ValidationError

from ._base import Contract, UtcDatetime, utcnow

ERROR_SCHEMA: Final = "tollgate.error.v1"
INVALID_REQUEST: Final = "invalid_request"
INTERNAL_ERROR: Final = "internal_error"
ErrorCode = Literal["invalid_request", "internal_error"]
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ud800-\udfff]")


class FieldError(Contract):
    """One field that is wrong, and why."""

    field: str = Field(description="dotted path of the field, e.g. 'resources.cpus' or 'groups.3'")
    message: str


class ErrorReply(Contract):
    """The reply to a request that could not be answered with a decision.

    `error` is `invalid_request` (fix the request; `field` names the first bad field, or is
    null when the body is not a JSON object at all) or `internal_error` (the service failed;
    retry, and see its log).
    """

    schema_: Literal["tollgate.error.v1"] = Field(default=ERROR_SCHEMA, alias="schema")
    error: ErrorCode
    message: str
    field: str | None = None
    errors: list[FieldError] = Field(default_factory=list)
    at: UtcDatetime = Field(default_factory=utcnow)


def printable(text: str, limit: int = 200) -> str:
    """`text` shortened and with control characters escaped, safe for a log line or header."""
    short = text if len(text) <= limit else text[:limit] + "…"
    return _UNPRINTABLE.sub(lambda m: m.group().encode("unicode_escape").decode(), short)


def field_errors(exc: ValidationError, limit: int = 5) -> list[FieldError]:
    """Pydantic's errors as dotted field paths and messages a person can act on."""
    return [_field_error(e) for e in exc.errors()[:limit]]


def _field_error(err: Any) -> FieldError:
    loc: Sequence[object] = err.get("loc", ())
    where = ".".join(printable(str(p), 80) for p in loc) or "body"
    message = str(err.get("msg", "invalid")).removeprefix("Value error, ")
    return FieldError(field=where, message=message)


def describe(errors: Sequence[FieldError], more: int = 0) -> str:
    """`field: message; field: message`, for logs, dead letters and error replies."""
    text = "; ".join(f"{e.field}: {e.message}" for e in errors)
    return f"{text}; and {more} more" if more > 0 else text
