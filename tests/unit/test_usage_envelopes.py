"""The usage feed's envelopes: chunked deterministically, within the limits, exact, decodable."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from contracts import format_decimal
from contracts.usage import MAX_BATCH_BYTES, MAX_BATCH_EVENTS, UsageBatch
from services.ledger.domain import SeriesKey, UsageDelta
from services.ledger.feed import (
    FeedBatch,
    FeedEvent,
    batch_of_result,
    delta_text,
    encode_event,
    envelopes,
    subject_runs,
)
from services.ledger.store import BatchResult, CommittedEvent
from services.policy.feed import NotUsage, decode_envelope

AT = datetime(2026, 12, 2, 10, 0, tzinfo=UTC)


def batch(
    subjects: list[str], first_seq: int = 1, labels: dict[str, str] | None = None
) -> FeedBatch:
    events = []
    for i in range(len(subjects)):
        event = FeedEvent(
            first_seq + i, "node-1", "e1", f"w{i % 3}", "cpu.used.seconds", "0.000001", AT,
            window_start=AT - timedelta(seconds=10), labels=dict(labels or {}),
            received_at=AT, sampled_at=AT,
        )  # fmt: skip
        events.append(encode_event(event))
    return FeedBatch(7, "ab" * 32, AT, first_seq, subjects, events)


def ranges(b: FeedBatch, after: int = 0, **limits: int) -> list[tuple[str, int, int]]:
    return [(e.subject, e.first_seq, e.last_seq) for e in envelopes(b, "t", after, **limits)]


def test_one_envelope_per_subject_run_and_chunk_consecutive_ranges() -> None:
    b = batch(["a"] * 7 + ["b"] * 2, first_seq=11)
    assert ranges(b, max_events=3) == [
        ("a", 11, 13), ("a", 14, 16), ("a", 17, 17), ("b", 18, 19),
    ]  # fmt: skip
    # Starting at any envelope's end gives the same envelopes after it (a restart republishes
    # exactly what went out before, under the same Nats-Msg-Id).
    assert ranges(b, after=16, max_events=3) == [("a", 17, 17), ("b", 18, 19)]
    assert ranges(b, after=19, max_events=3) == []


def test_default_limits_1000_events_and_512_kib() -> None:
    small = batch(["alice"] * 2500)
    assert [(f, la) for _, f, la in ranges(small)] == [(1, 1000), (1001, 2000), (2001, 2500)]
    # Labels make events of ~3 KiB: the byte limit cuts first.
    big = batch(["bob"] * 600, labels={f"k{i}": "x" * 90 for i in range(32)})
    envs = list(envelopes(big, "t"))
    assert len(envs) > 3
    assert all(len(e.body) <= MAX_BATCH_BYTES for e in envs)
    assert max(len(e.body) for e in envs) > MAX_BATCH_BYTES - 8 * 1024  # filled, not timid
    assert all(e.last_seq - e.first_seq + 1 <= MAX_BATCH_EVENTS for e in envs)
    assert [e.first_seq for e in envs[1:]] == [e.last_seq + 1 for e in envs[:-1]]


def test_an_event_larger_than_the_limit_still_goes_alone() -> None:
    envs = list(envelopes(batch(["a"] * 3, labels={"k": "x" * 200}), "t", max_bytes=2500))
    assert [(e.first_seq, e.last_seq) for e in envs] == [(1, 1), (2, 2), (3, 3)]


def test_envelopes_are_the_contract_and_expand_to_usage_recorded() -> None:
    b = batch(["carol", "carol", "dave"], labels={"gpu_model": "H100", "a": "1"})
    envs = list(envelopes(b, "t"))
    parsed = [UsageBatch.model_validate_json(e.body) for e in envs]
    assert [(p.subject, p.first_seq, p.last_seq, p.msg_id) for p in parsed] == [
        ("carol", 1, 2, "usage:1-2"), ("dave", 3, 3, "usage:3-3"),
    ]  # fmt: skip
    assert [e.msg_id for e in envs] == ["usage:1-2", "usage:3-3"]
    records = [r for p in parsed for r in p.records()]
    assert [(r.seq, r.subject, r.delta, r.batch_hash, r.recorded_at) for r in records] == [
        (1, "carol", Decimal("0.000001"), "ab" * 32, AT),
        (2, "carol", Decimal("0.000001"), "ab" * 32, AT),
        (3, "dave", Decimal("0.000001"), "ab" * 32, AT),
    ]
    assert records[0].labels == {"gpu_model": "H100", "a": "1"}
    assert (records[0].window_start, records[0].received_at, records[0].sampled_at) == (
        AT - timedelta(seconds=10), AT, AT,
    )  # fmt: skip
    assert json.loads(records[0].to_json())["delta"] == "0.000001"  # exact, as a string


def test_the_policy_decodes_envelopes_exactly() -> None:
    body = next(envelopes(batch(["erin"] * 2, labels={"gpu_model": "A10"}), "t")).body
    events = decode_envelope(body)
    assert [(e.seq, e.subject, e.delta, e.at, e.gpu_model) for e in events] == [
        (1, "erin", Decimal("0.000001"), AT, "A10"),
        (2, "erin", Decimal("0.000001"), AT, "A10"),
    ]


def _envelope(**changes: object) -> bytes:
    doc = json.loads(next(envelopes(batch(["f"] * 2, first_seq=5), "t")).body)
    doc.update(changes)
    return json.dumps(doc).encode()


@pytest.mark.parametrize(
    ("body", "says"),
    [
        (b"{not json", "malformed"),
        (b"[1, 2]", "Expected `object`"),
        (b'{"schema": "tollgate.usage_batch.v9"}', "Invalid value"),
        (_envelope(last_seq=7), "do not cover seqs 5..7"),
        (_envelope(first_seq=4, last_seq=5), "has seq 5, expected 4"),
        (_envelope(events=[]), "do not cover"),
        (_envelope(events=[{"seq": 5}, {"seq": 6}]), "missing required field"),
    ],
)
def test_hostile_envelopes_are_refused_with_a_reason(body: bytes, says: str) -> None:
    with pytest.raises(NotUsage, match=says):
        decode_envelope(body)
    with pytest.raises(ValidationError):
        UsageBatch.model_validate_json(body)


def test_negative_or_zoneless_events_are_refused() -> None:
    doc = json.loads(_envelope())
    doc["events"][1]["delta"] = "-1"
    with pytest.raises(NotUsage, match="not a usage amount"):
        decode_envelope(json.dumps(doc).encode())
    doc["events"][1]["delta"] = "1"
    doc["events"][0]["window_end"] = "2026-12-02T10:00:00"
    with pytest.raises(NotUsage, match="timezone"):
        decode_envelope(json.dumps(doc).encode())


# Up to 28 significant digits: beyond, format_decimal's normalize() rounds (delta_text does not).
@given(st.decimals(allow_nan=False, allow_infinity=False, min_value=0, max_value=10**21, places=6))
def test_delta_text_is_format_decimal(value: Decimal) -> None:
    assert delta_text(value) == format_decimal(value)
    assert delta_text(value.quantize(Decimal("0.000001"))) == format_decimal(value)


def test_a_batch_sent_a_subject_at_a_time_is_the_batch_sent_whole() -> None:
    """The publisher encodes a subject's run at a time; a republish from Postgres reads the
    batch whole: the envelopes, and so their Msg-Ids, must be the same."""
    usage = []
    for subject in ("a", "b", "c"):
        for i in range(5):
            key = SeriesKey("h", "e1", subject, f"w{i}", "log.bytes")
            usage.append(UsageDelta(key, Decimal(i), None, AT, i, i, False, {}, AT, AT, None))
    committed = [CommittedEvent(10 + i, 3, "cd" * 32, AT, u) for i, u in enumerate(usage)]
    result = BatchResult(committed, 15, 0)
    whole = batch_of_result(result)
    assert whole is not None
    for after in (0, 11, 14, 16):
        sliced = [
            e.body
            for lo, hi in subject_runs(result)
            for e in envelopes(batch_of_result(result, lo, hi), "t", after, max_events=2)  # type: ignore[arg-type]
        ]
        assert sliced == [e.body for e in envelopes(whole, "t", after, max_events=2)]
    assert list(subject_runs(result)) == [(0, 5), (5, 10), (10, 15)]
