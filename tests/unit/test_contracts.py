"""The wire contract: exact numbers, safe subject tokens, clear validation errors."""

from __future__ import annotations

import json
from decimal import Decimal

import pytest
from hypothesis import given
from hypothesis import strategies as st
from pydantic import ValidationError

from contracts import PayloadError, decode_token, encode_token, parse_json
from contracts._base import name_problem
from contracts.samples import CounterBatch, samples_stream, samples_subject
from contracts.usage import UsageRecorded

GOOD = {
    "schema": "tollgate.counter_batch.v1", "host": "node-7", "epoch": "3f9c2a", "seq": 42,
    "sampled_at": "2026-11-22T10:00:00.000Z",
    "counters": [
        {"subject": "alice", "workload": "job-123", "metric": "net.tx.wan.bytes",
         "value": 123456789},
        {"subject": "alice", "workload": "job-123", "metric": "cpu.used.seconds",
         "value": 812.25, "labels": {"gpu_model": "H100"}},
    ],
    "final": False,
}  # fmt: skip


def batch(**changes: object) -> CounterBatch:
    data = json.loads(json.dumps(GOOD))
    data.update(changes)
    return CounterBatch.model_validate(parse_json(json.dumps(data).encode()))


def test_the_spec_example_parses_exactly() -> None:
    b = batch()
    assert b.counters[1].value == Decimal("812.25")
    assert b.msg_id == "node-7:3f9c2a:42"


def test_unknown_fields_are_ignored() -> None:
    assert batch(extra_field={"x": 1}).seq == 42


@given(st.decimals(min_value=0, max_value=10**9, places=6, allow_nan=False))
def test_amounts_survive_a_round_trip_through_json_exactly(value: Decimal) -> None:
    data = json.loads(json.dumps(GOOD))
    data["counters"] = [dict(GOOD["counters"][1], value=str(value))]  # type: ignore[call-overload]
    b = CounterBatch.model_validate(data)
    again = CounterBatch.model_validate(parse_json(b.to_json()))
    assert again.counters[0].value == value


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1, "must not be negative"),
        ("NaN", "finite"),
        ("1.0000001", "more than 6 fractional digits"),
        ("1e40", "too large"),
        (True, "not a boolean"),
    ],
)
def test_bad_values_are_refused_with_a_reason(value: object, message: str) -> None:
    counters = [dict(GOOD["counters"][1], value=value)]  # type: ignore[call-overload]
    with pytest.raises(ValidationError, match=message):
        CounterBatch.model_validate(dict(GOOD, counters=counters))


def test_byte_metrics_must_be_whole_bytes() -> None:
    counters = [dict(GOOD["counters"][0], value="10.5")]  # type: ignore[call-overload]
    with pytest.raises(ValidationError, match="counts bytes and must be an integer"):
        CounterBatch.model_validate(dict(GOOD, counters=counters))


@pytest.mark.parametrize("metric", ["Net.tx", "net", "net..tx", "net.tx-wan", "1net.tx"])
def test_bad_metric_names_are_refused(metric: str) -> None:
    counters = [dict(GOOD["counters"][0], metric=metric)]  # type: ignore[call-overload]
    with pytest.raises(ValidationError, match="is not a metric name"):
        CounterBatch.model_validate(dict(GOOD, counters=counters))


def test_a_series_twice_in_one_batch_is_refused() -> None:
    counters = [GOOD["counters"][0], GOOD["counters"][0]]  # type: ignore[index]
    with pytest.raises(ValidationError, match="appears twice"):
        CounterBatch.model_validate(dict(GOOD, counters=counters))


def test_naive_timestamps_are_refused() -> None:
    with pytest.raises(ValidationError, match="time zone"):
        batch(sampled_at="2026-11-22T10:00:00")


def test_nan_in_json_is_refused_at_parse_time() -> None:
    with pytest.raises(ValueError, match="NaN"):
        parse_json(b'{"value": NaN}')


@given(st.text(min_size=1, max_size=40))
def test_any_name_becomes_one_safe_subject_token_and_back(name: str) -> None:
    token = encode_token(name)
    assert not any(c in token for c in ".*> \t\r\n")
    assert decode_token(token) == name


def test_subjects_and_streams_follow_the_prefix() -> None:
    assert samples_subject("node-7") == "tollgate.v1.samples.node-7"
    assert samples_subject("a.b", "acme") == "acme.v1.samples.a%2Eb"
    assert samples_stream() == "TOLLGATE_SAMPLES"


def test_usage_deltas_travel_as_exact_strings() -> None:
    event = UsageRecorded(
        seq=1, recorded_at="2026-11-22T10:00:00Z", host="h", epoch="e", subject="s",
        workload="w", metric="cpu.used.seconds", delta=Decimal("0.100000"),
        window_end="2026-11-22T10:00:00Z", batch_hash="ab",
    )  # fmt: skip
    assert json.loads(event.to_json())["delta"] == "0.1"


@given(st.text(min_size=1, max_size=200).filter(lambda s: name_problem(s) is None))
def test_every_valid_name_is_one_subject_token_with_exactly_one_spelling(name: str) -> None:
    token = encode_token(name)

    assert "." not in token and "*" not in token and ">" not in token and " " not in token
    assert decode_token(token) == name
    lower = token.replace("%2E", "%2e").replace("%C3", "%c3")
    if lower != token:
        with pytest.raises(ValueError, match="upper-case hex"):
            decode_token(lower)


@pytest.mark.parametrize(
    ("token", "says"),
    [
        ("a%ZZ", "two upper-case hex digits"),
        ("a%4", "two upper-case hex digits"),
        ("a%FF", "does not decode to UTF-8"),
        ("%41", "is not how 'A' is spelled"),
        ("j\u00f6rg", "is not how"),
    ],
)
def test_a_subject_token_no_encoder_wrote_does_not_decode(token: str, says: str) -> None:
    with pytest.raises(ValueError, match=says):
        decode_token(token)


@pytest.mark.parametrize(
    ("name", "says"),
    [
        ("", "1 to 200 characters"),
        ("x" * 201, "1 to 200 characters"),
        ("a\x00", "control characters"),
        ("a\x9b", "control characters"),
        ("a\u2029", "control characters"),
        ("a\ufffd", "control characters"),
        ("a\udfff", "valid Unicode"),
        ("a\t", "control characters"),
        ("a ", "whitespace"),
        ("\u3000a", "whitespace"),
    ],
)
def test_a_name_no_service_can_carry_is_refused_with_the_reason(name: str, says: str) -> None:
    assert says in (name_problem(name) or "")
    with pytest.raises(ValidationError, match=says) as caught:
        CounterBatch.model_validate(
            {"host": name, "epoch": "e", "seq": 1, "sampled_at": "2026-11-22T10:00:00Z",
             "counters": []}
        )  # fmt: skip
    assert caught.value.errors()[0]["type"] == "invalid_name"


def test_a_body_nested_beyond_the_parser_is_a_payload_error_not_a_crash() -> None:
    with pytest.raises(PayloadError, match="nested too deeply"):
        parse_json(b"[" * 100_000 + b"]" * 100_000)
