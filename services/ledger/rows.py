"""usage_events rows as PostgreSQL binary COPY data, built from pieces a batch shares.

asyncpg's `copy_records_to_table` encodes every field of every row anew: five timestamps
(each an astimezone and a subtraction), a Decimal through `as_tuple`, five strings. A
batch's rows share nearly all of them (its host, epoch, instants, names), so here each
distinct value is encoded once per batch and a row is mostly a join of cached bytes.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from datetime import UTC, datetime
from decimal import ROUND_HALF_UP, Context, Decimal

from .domain import UsageDelta

# The order of the binary rows below; COPY takes the columns in any order it is told.
COLUMNS = (
    "seq", "subject", "workload", "metric", "delta", "window_start", "window_end", "reset",
    "labels", "host", "epoch", "sample_seq", "stream_seq", "received_at", "sampled_at",
    "clock_skew_seconds", "batch_id", "recorded_at",
)  # fmt: skip
HEADER = b"PGCOPY\n\xff\r\n\x00" + bytes(8)  # signature, flags, no header extension
TRAILER = b"\xff\xff"
_NULL = b"\xff\xff\xff\xff"
_FIELDS = struct.pack(">h", len(COLUMNS))
_INT8 = struct.Struct(">iq").pack
_LEN = struct.Struct(">i").pack
_PG_EPOCH = datetime(2000, 1, 1, tzinfo=UTC)
_TRUE, _FALSE = b"\x00\x00\x00\x01\x01", b"\x00\x00\x00\x01\x00"
_NO_LABELS = b"\x00\x00\x00\x03\x01{}"  # jsonb, version 1
# Wide enough for NUMERIC(38, 6); rounding as Postgres rounds to a column's scale.
_EXACT = Context(prec=80, rounding=ROUND_HALF_UP)
_MICRO = Decimal("0.000001")


def timestamptz(value: datetime | None) -> bytes:
    """A field of type timestamptz: microseconds since 2000-01-01 UTC."""
    if value is None:
        return _NULL
    d = value - _PG_EPOCH
    return _INT8(8, (d.days * 86_400 + d.seconds) * 1_000_000 + d.microseconds)


def text(value: str) -> bytes:
    raw = value.encode()
    return _LEN(len(raw)) + raw


def numeric(value: Decimal | None) -> bytes:
    """A field of type numeric(_, 6): base-10000 digits, scale 6."""
    if value is None:
        return _NULL
    sign = 0x4000 if value.is_signed() else 0
    plain = str(abs(value))
    whole, _, fraction = plain.partition(".")
    if "E" in plain or len(fraction) > 6:
        plain = str(abs(value).quantize(_MICRO, context=_EXACT))
        whole, _, fraction = plain.partition(".")
    n, f = int(whole), int(fraction.ljust(6, "0"))
    digits: list[int] = []
    while n:
        n, d = divmod(n, 10_000)
        digits.append(d)
    digits.reverse()
    weight = len(digits) - 1
    digits += (f // 100, f % 100 * 100)
    count = len(digits)
    return struct.pack(f">ihhhh{count}h", 8 + 2 * count, count, weight, sign, 6, *digits)


def jsonb(labels: object) -> bytes:
    raw = b"\x01" + json.dumps(labels).encode()
    return _LEN(len(raw)) + raw


def copy_data(
    first_seq: int, batch_id: int, recorded_at: datetime, usage: Sequence[UsageDelta]
) -> bytes:
    """The whole binary COPY stream of `usage`, committed from `first_seq` on."""
    names: dict[tuple[str, ...], bytes] = {}
    times: dict[datetime | None, bytes] = {None: _NULL}
    amounts: dict[Decimal, bytes] = {}
    sources: dict[tuple[object, ...], bytes] = {}
    batch = _INT8(8, batch_id) + timestamptz(recorded_at)
    out = [HEADER]
    append = out.append
    for seq, u in enumerate(usage, first_seq):
        k = u.key
        series = names.get(k)
        if series is None:
            series = names[k] = text(k.subject) + text(k.workload) + text(k.metric)
        delta = amounts.get(u.delta) or amounts.setdefault(u.delta, numeric(u.delta))
        start, end = u.window_start, u.window_end
        start_b = times.get(start) or times.setdefault(start, timestamptz(start))
        end_b = times.get(end) or times.setdefault(end, timestamptz(end))
        # Everything of the sample message the reading came from, and of the batch.
        source = (k.host, k.epoch, u.sample_seq, u.stream_seq, u.received_at, u.sampled_at,
                  u.clock_skew)  # fmt: skip
        tail = sources.get(source)
        if tail is None:
            tail = sources[source] = b"".join((
                text(k.host), text(k.epoch), _INT8(8, u.sample_seq), _INT8(8, u.stream_seq),
                timestamptz(u.received_at), timestamptz(u.sampled_at), numeric(u.clock_skew),
                batch,
            ))  # fmt: skip
        labels = jsonb(dict(u.labels)) if u.labels else _NO_LABELS
        append(b"".join((
            _FIELDS, _INT8(8, seq), series, delta, start_b, end_b,
            _TRUE if u.reset else _FALSE, labels, tail,
        )))  # fmt: skip
    append(TRAILER)
    return b"".join(out)
