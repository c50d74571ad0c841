"""The msgspec sample decoder and the CounterBatch schema agree on every body.

`parse_sample_message` reads a body with msgspec when it can vouch for it and falls back to
CounterBatch otherwise; the property here is that what it returns or dead-letters is exactly
what CounterBatch alone would (same values, same reason, same detail), and that canonical
bodies, what meters publish, take the fast path.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import Any

from hypothesis import example, given, settings
from hypothesis import strategies as st

from contracts.dlq import DeadLetter
from contracts.samples import SCHEMA, CounterBatch, CounterSample, decode_counter_batch
from services.ledger.handlers import check_origin, parse_sample_message, validate_sample_body

LIMIT = 1 << 20
NAMES = st.one_of(
    st.sampled_from(["alice", "bob", "node-1", "john.doe", "Zoë", "a b", "日本"]),
    st.text(min_size=1, max_size=12),
)
METRICS = st.sampled_from(
    ["cpu.used.seconds", "net.tx.wan.bytes", "log.bytes", "myapp.requests", "mem.used.byte_seconds"]
)
AMOUNTS = st.decimals(min_value=0, max_value=10**12, places=6, allow_nan=False)
LABEL_VALUES = st.text(st.characters(codec="utf-8", exclude_categories=["Cc", "Cs"]), max_size=5)
INSTANTS = st.datetimes(
    min_value=datetime(2000, 1, 1), max_value=datetime(2100, 1, 1), timezones=st.just(UTC)
)


@st.composite
def batches(draw: st.DrawFn) -> CounterBatch:
    """Valid batches, as a meter would build them."""
    n = draw(st.integers(0, 6))
    counters = []
    seen = set()
    for i in range(n):
        metric = draw(METRICS)
        value = draw(AMOUNTS)
        if metric.endswith(".bytes"):
            value = value.to_integral_value()
        key = (f"user{i}", draw(st.sampled_from(["w1", "w2"])), metric)
        if key in seen:
            continue
        seen.add(key)
        labels = draw(st.dictionaries(st.sampled_from(["gpu_model", "zone"]), LABEL_VALUES))
        counters.append(CounterSample(subject=key[0], workload=key[1], metric=metric,
                                      value=value, labels=labels))  # fmt: skip
    return CounterBatch(
        host=draw(st.sampled_from(["node1", "node-2"])),
        epoch=draw(st.sampled_from(["boot1", "e-2_x"])),
        seq=draw(st.integers(0, 2**62)),
        sampled_at=draw(INSTANTS),
        counters=counters,
        final=draw(st.booleans()),
    )


# What a mutation may put in place of a field: the odd spellings and the outright wrong.
ODDITIES: list[Any] = [
    "1.5", " 1.5 ", "1_000", "1e3", "1E+3", "-1", "-0", "-0.0", "NaN", "Infinity", "sNaN",
    "1.0000001", "1.10000000", "0.0000001", "١٢", "", "x", True, False, None, [], {},
    "2026-11-22T10:00:00Z", "2026-11-22T10:00:00", "2026-11-22 10:00:00Z",
    "2026-11-22T10:00:00.1234567Z", "2026-11-22T10:00:00.5+01:00", "2026-11-22T10:00Z",
    "0001-01-01T00:00:00+01:00", "9999-12-31T23:59:59-01:00", "2026-11-22T10:00:00+0100",
    "2026-11-22T10:00:00z", "2026-11-22T24:00:00Z", 1700000000, "1700000000",
    "a\n", "a\x00b", " a", "\ud800", "x" * 201, "abc\n", "tollgate.counter_batch.v2",
    2**62, 2**62 + 1, -1, 2**64, 1.5, 0.1, 1e-7, 12345678901234567890.5, 10**32, 10**32 - 1,
    "Net.tx", "net", "1net.tx",
]  # fmt: skip
ODD_VALUES = st.one_of(
    st.sampled_from(ODDITIES),
    st.integers(),
    st.decimals(allow_nan=True, allow_infinity=True),
    st.text(max_size=8),
)


def _paths(doc: Any, prefix: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    out = [prefix]
    if isinstance(doc, dict):
        for k, v in doc.items():
            out += _paths(v, (*prefix, k))
    elif isinstance(doc, list):
        for i, v in enumerate(doc):
            out += _paths(v, (*prefix, i))
    return out


def _set(doc: Any, path: tuple[Any, ...], value: Any) -> Any:
    if not path:
        return value
    head, *rest = path
    doc[head] = _set(doc[head], tuple(rest), value)
    return doc


def _dumps(doc: Any) -> bytes:
    def default(o: object) -> object:
        if isinstance(o, Decimal):
            return float(o) if o.is_finite() and abs(o) < 10**15 else str(o)
        raise TypeError(type(o).__name__)

    return json.dumps(doc, default=default, ensure_ascii=False).encode("utf-8", "surrogatepass")


@st.composite
def mutated_bodies(draw: st.DrawFn) -> bytes:
    batch = draw(batches())
    doc = json.loads(batch.to_json())
    for _ in range(draw(st.integers(1, 3))):
        if not isinstance(doc, dict):
            break  # the whole body was replaced: that is the mutation
        path = draw(st.sampled_from(_paths(doc)))
        kind = draw(st.sampled_from(["replace", "delete", "duplicate", "extra"]))
        if kind == "replace":
            doc = _set(doc, path, draw(ODD_VALUES))
        elif kind == "delete" and path and isinstance(path[-1], str):
            parent = doc
            for p in path[:-1]:
                parent = parent[p]
            del parent[path[-1]]
        elif kind == "duplicate" and isinstance(doc.get("counters"), list) and doc["counters"]:
            doc["counters"].append(json.loads(_dumps(doc["counters"][0])))
        else:
            doc[draw(st.text(max_size=5))] = draw(ODD_VALUES)
    body = _dumps(doc)
    tail = draw(st.sampled_from([b"", b" ", b"\n", b"x", b"\xff", b"\xef\xbb\xbf"]))
    if draw(st.booleans()):
        return tail + body if tail == b"\xef\xbb\xbf" else body + tail
    return body


def outcome(parse: Any, body: bytes) -> tuple[Any, ...]:
    """What parsing `body` decided: the batch's fields, or the dead letter's reason and detail."""
    try:
        b = parse(body)
    except DeadLetter as dead:
        return ("dead", dead.reason, dead.detail)
    counters = [
        (c.subject, c.workload, c.metric, c.value, str(c.value), dict(c.labels)) for c in b.counters
    ]
    return ("ok", b.host, b.epoch, b.seq, b.sampled_at, b.final, counters)


def fast(body: bytes) -> Any:
    return parse_sample_message("tollgate.v1.samples.node1", body, LIMIT)


def reference(body: bytes) -> Any:
    return check_origin(validate_sample_body(body), "tollgate.v1.samples.node1", None)


@settings(max_examples=300, deadline=None)
@given(batches())
def test_a_canonical_body_takes_the_fast_path_and_reads_as_the_schema_reads_it(
    batch: CounterBatch,
) -> None:
    body = batch.to_json()
    assert decode_counter_batch(body) is not None
    assert outcome(fast, body) == outcome(reference, body)


@settings(max_examples=1500, deadline=None)
@given(mutated_bodies())
@example(b'{"schema": "tollgate.counter_batch.v1", "host": "node1", "epoch": "e", "seq": 1,'
         b' "sampled_at": "2026-11-22T10:00:00Z", "counters": [], "x": "\xff"}')  # fmt: skip
@example(b'{"schema": "tollgate.counter_batch.v1", "host": "node1", "epoch": "e\\n", "seq": 1,'
         b' "sampled_at": "2026-11-22T10:00:00Z", "counters": []}')  # fmt: skip
def test_the_fast_decoder_and_the_schema_agree_on_mutated_bodies(body: bytes) -> None:
    assert outcome(fast, body) == outcome(reference, body)


def test_a_100_series_body_reads_the_same_both_ways() -> None:
    at = datetime(2026, 11, 22, 10, tzinfo=UTC)
    counters = [
        {"subject": f"user{i % 20}", "workload": f"w{i // 4}",
         "metric": ("cpu.used.seconds", "net.tx.wan.bytes")[i % 2],
         "value": i * 10 if i % 2 else f"{i}.25"}
        for i in range(100)
    ]  # fmt: skip
    body = json.dumps({"schema": SCHEMA, "host": "node1", "epoch": "e", "seq": 3,
                       "sampled_at": (at + timedelta(seconds=1)).isoformat(),
                       "counters": counters}).encode()  # fmt: skip
    assert decode_counter_batch(body) is not None
    assert outcome(fast, body) == outcome(reference, body)
