"""Shared building blocks of the wire contract: the base model, exact amounts, names, subjects."""

from __future__ import annotations

import json
import re
from datetime import UTC, datetime
from decimal import Decimal, InvalidOperation
from typing import Annotated, Any

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, PlainSerializer
from pydantic_core import PydanticCustomError

DEFAULT_PREFIX = "tollgate"
VERSION = "v1"

# Custom metric names follow the SPEC; the standard ones match it too.
METRIC_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z0-9_]+)+$")
PREFIX_RE = re.compile(r"^[a-z][a-z0-9_-]{0,31}$")
_TOKEN_SAFE = re.compile(r"[A-Za-z0-9_\-@+=]")
# C0 and C1 controls, DEL, the Unicode line and paragraph separators, and U+FFFD (what a
# decoder leaves of bytes that were not UTF-8): none can be part of a name a person reads.
_CONTROL = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\ufffd]")
# A lone surrogate is text no encoder (UTF-8, Postgres, NATS) can carry.
_SURROGATE = re.compile("[\ud800-\udfff]")
_TOKEN_HEX = re.compile(r"%([0-9A-F]{2})")
MAX_NAME = 200
MAX_TEXT = 200
# Label keys are identifiers, like the words of a metric name.
LABEL_KEY_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.\-]{0,63}$")
MAX_LABELS = 32
MAX_FRACTION_DIGITS = 6
# NUMERIC(38, 6) in the ledger: 32 integer digits.
MAX_AMOUNT = Decimal(10) ** 32


class Contract(BaseModel):
    """Base of every wire message: immutable, tolerant of unknown fields, JSON by alias."""

    model_config = ConfigDict(
        frozen=True,
        extra="ignore",
        validate_by_alias=True,
        validate_by_name=True,
        serialize_by_alias=True,
    )

    def to_json(self) -> bytes:
        """Serialize as the JSON object that goes on the wire."""
        return self.model_dump_json(by_alias=True).encode()


def _to_decimal(value: Any) -> Any:
    # Binary floats never enter the ledger: a float is taken by its shortest repr, which
    # is exactly the decimal text the publisher wrote when it has <= 15 significant digits.
    kind = type(value)
    if kind is Decimal:  # what parse_json makes of a JSON fraction: the common case first
        return value
    if kind is int:
        return Decimal(value)
    if isinstance(value, bool):
        raise ValueError("must be a number, not a boolean")
    if isinstance(value, float):
        return Decimal(repr(value))
    if isinstance(value, int | Decimal):
        return Decimal(value)
    if isinstance(value, str):
        try:
            return Decimal(value.strip())
        except InvalidOperation:
            raise ValueError(f"{value!r} is not a decimal number") from None
    raise ValueError(f"must be a number, got {type(value).__name__}")


def _check_amount(value: Decimal) -> Decimal:
    if not value.is_finite():
        raise ValueError("must be a finite number (NaN and Infinity are not counters)")
    if value < 0:
        raise ValueError(f"must not be negative (got {value}); counters only grow")
    if value >= MAX_AMOUNT:
        raise ValueError(f"is too large (got {value}); the ledger keeps 32 integer digits")
    exponent = value.as_tuple().exponent
    if isinstance(exponent, int) and exponent < -MAX_FRACTION_DIGITS:
        normalized = value.normalize().as_tuple().exponent
        if isinstance(normalized, int) and normalized < -MAX_FRACTION_DIGITS:
            raise ValueError(f"has more than {MAX_FRACTION_DIGITS} fractional digits (got {value})")
    return value


def _json_number(value: Decimal) -> int | float | str:
    # Integral amounts go out as JSON integers, short decimals as JSON numbers whose repr
    # is exact, anything longer as a string; receivers accept all three.
    if value == value.to_integral_value():
        return int(value)
    digits = len(value.normalize().as_tuple().digits)
    if digits <= 15:
        as_float = float(value)
        if Decimal(repr(as_float)) == value:
            return as_float
    return format(value, "f")


def format_decimal(value: Decimal) -> str:
    """Canonical text of an exact amount: plain notation, no exponent, no trailing zeros."""
    if value == value.to_integral_value():
        return str(int(value))
    text = format(value.normalize(), "f")
    return text


Amount = Annotated[
    Decimal,
    BeforeValidator(_to_decimal),
    AfterValidator(_check_amount),
    PlainSerializer(_json_number, when_used="json"),
]
"""A non-negative exact decimal with at most six fractional digits (JSON number or string)."""

DecimalText = Annotated[
    Decimal,
    BeforeValidator(_to_decimal),
    PlainSerializer(format_decimal, when_used="json"),
]
"""An exact decimal that travels as a JSON string, e.g. a usage delta."""


# Names and metrics repeat in every batch: remember the ones already found good.
_GOOD_NAMES: set[str] = set()
_GOOD_METRICS: set[str] = set()
_REMEMBER = 100_000


def name_problem(value: str) -> str | None:
    """Why `value` cannot be a name (subject, workload, host, group), or None."""
    if not value or len(value) > MAX_NAME:
        return f"must be 1 to {MAX_NAME} characters (got {len(value)})"
    if _SURROGATE.search(value):
        return "must be valid Unicode (it holds a lone surrogate, which no encoder can carry)"
    if _CONTROL.search(value):
        return "must not contain control characters (newlines, tabs, NUL, escapes)"
    if value != value.strip():
        return "must not start or end with whitespace"
    return None


def _check_name(value: str) -> str:
    if value in _GOOD_NAMES:
        return value
    problem = name_problem(value)
    if problem is not None:
        # A type of its own, so the edges can tell a bad name (`invalid_name`) from the rest.
        raise PydanticCustomError("invalid_name", problem)
    if len(_GOOD_NAMES) >= _REMEMBER:
        _GOOD_NAMES.clear()
    _GOOD_NAMES.add(value)
    return value


def _check_text(value: str) -> str:
    if len(value) > MAX_TEXT:
        raise ValueError(f"must be at most {MAX_TEXT} characters (got {len(value)})")
    if _SURROGATE.search(value):
        raise ValueError("must be valid Unicode (it holds a lone surrogate)")
    if _CONTROL.search(value):
        raise ValueError("must not contain control characters (newlines, tabs, NUL, escapes)")
    return value


def _check_labels(value: dict[str, str]) -> dict[str, str]:
    if len(value) > MAX_LABELS:
        raise ValueError(f"at most {MAX_LABELS} labels (got {len(value)})")
    for key in value:
        if not LABEL_KEY_RE.match(key):
            raise PydanticCustomError(
                "invalid_name",
                "label key {key} is not an identifier: a letter or '_', then letters, digits, "
                "'_', '.' or '-', at most 64 characters",
                {"key": repr(key[:80])},
            )
    return value


def _check_metric(value: str) -> str:
    if value in _GOOD_METRICS:
        return value
    if len(_GOOD_METRICS) >= _REMEMBER:
        _GOOD_METRICS.clear()
    if len(value) > 100 or not METRIC_RE.match(value):
        raise ValueError(
            f"{value!r} is not a metric name: use lower-case dotted words such as "
            "'net.tx.wan.bytes' or 'myapp.requests'"
        )
    _GOOD_METRICS.add(value)
    return value


def _utc(value: datetime) -> datetime:
    if value.tzinfo is None:
        raise ValueError("must carry a time zone, e.g. '2026-11-22T10:00:00Z'")
    try:
        return value.astimezone(UTC)
    except OverflowError:  # 0001-01-01T00:00:00+01:00: before year 1 in UTC
        raise ValueError("is out of range once converted to UTC") from None


def _check_quota_metric(value: str) -> str:
    return value if value == "cost" else _check_metric(value)


Name = Annotated[str, AfterValidator(_check_name)]
"""A subject, workload, host or group: 1-200 characters of valid Unicode without control
characters or surrounding whitespace. Anything else ('.', '*', '>', '@', '/', spaces, any
script) is allowed, and travels %-encoded when it is a subject token (`encode_token`)."""
Text = Annotated[str, AfterValidator(_check_text)]
"""Free text stored and shown (a GPU model, a label value): short, printable, valid Unicode."""
Labels = Annotated[dict[str, Text], AfterValidator(_check_labels)]
"""Series labels: identifier keys, short printable values."""
MetricName = Annotated[str, AfterValidator(_check_metric)]
# What a quota limits: a metric, or "cost" (a budget in money over every priced metric).
QuotaMetric = Annotated[str, AfterValidator(_check_quota_metric)]
UtcDatetime = Annotated[datetime, AfterValidator(_utc)]


def encode_token(value: str) -> str:
    """Encode a free-form name (user, host) as one NATS subject token, reversibly.

    Characters outside [A-Za-z0-9_-@+=] become %XX of their UTF-8 bytes, so `john.doe`
    travels as `john%2Edoe` and can never split into two tokens or act as a wildcard.
    """
    out: list[str] = []
    for ch in value:
        if _TOKEN_SAFE.match(ch):
            out.append(ch)
        else:
            out.extend(f"%{b:02X}" for b in ch.encode())
    return "".join(out)


def decode_token(token: str) -> str:
    """Inverse of `encode_token`; ValueError for a token `encode_token` cannot have written.

    Only the one canonical spelling decodes: `john%2edoe` or `%41` are refused rather than
    taken for `john.doe` or `A`, so a name has exactly one subject token.
    """
    raw = bytearray()
    i = 0
    while i < len(token):
        if token[i] == "%":
            escape = _TOKEN_HEX.match(token, i)
            if escape is None:
                raise ValueError(f"{token!r} has a '%' not followed by two upper-case hex digits")
            raw.append(int(escape.group(1), 16))
            i += 3
        else:
            raw.extend(token[i].encode("utf-8", "surrogatepass"))
            i += 1
    try:
        name = raw.decode()
    except UnicodeDecodeError:
        raise ValueError(f"{token!r} does not decode to UTF-8 text") from None
    if encode_token(name) != token:
        raise ValueError(f"{token!r} is not how {name!r} is spelled as a subject token")
    return name


def check_prefix(prefix: str) -> str:
    """Validate a subject prefix: one lower-case token."""
    if not PREFIX_RE.match(prefix):
        raise ValueError(
            f"subject prefix {prefix!r} must be one lower-case token like 'tollgate' "
            "(letters, digits, '_' or '-', at most 32 characters)"
        )
    return prefix


def subject_of(prefix: str, *tokens: str) -> str:
    """`<prefix>.v1.<tokens...>`: every subject of the contract is built here."""
    return ".".join((check_prefix(prefix), VERSION, *tokens))


def stream_of(prefix: str, kind: str) -> str:
    """Stream name for a prefix: `tollgate` + `SAMPLES` -> `TOLLGATE_SAMPLES`."""
    return f"{check_prefix(prefix).upper().replace('-', '_')}_{kind}"


def utcnow() -> datetime:
    """Now, in UTC."""
    return datetime.now(UTC)


class PayloadError(ValueError):
    """A message body that is not a JSON object."""


def parse_json(body: bytes) -> dict[str, Any]:
    """Parse a message body exactly: numbers become Decimal, NaN/Infinity are refused."""

    def _no_constants(name: str) -> Any:
        raise PayloadError(f"{name} is not a number a counter can hold")

    try:
        data = json.loads(body, parse_float=Decimal, parse_constant=_no_constants)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise PayloadError(f"body is not valid JSON: {exc}") from None
    except RecursionError:
        raise PayloadError("body is nested too deeply to be a Tollgate message") from None
    if not isinstance(data, dict):
        raise PayloadError(f"body must be a JSON object, got {type(data).__name__}")
    return data
