"""The bench's reading of the usage feed against the ledger head, and of feed messages."""

from __future__ import annotations

import json

import pytest

from bench.enforcement import mentions
from bench.feedlag import FeedSample, summarize


def test_the_lag_is_the_worst_sample_inside_the_run_and_the_rate_its_ends() -> None:
    first = FeedSample(10.0, head=1000, fed=900, waited=0.2)
    during = [
        FeedSample(9.0, head=10, fed=0, waited=9.0),  # before the run: not counted
        first,
        FeedSample(10.5, head=1500, fed=1000, waited=0.8),
        FeedSample(11.0, head=2000, fed=1400, waited=0.3),
    ]
    last = FeedSample(12.0, head=3000, fed=2950, waited=0.1)
    after = FeedSample(13.0, head=3400, fed=3000, waited=0.5)
    level = FeedSample(13.5, head=3400, fed=3400, waited=0.0)
    lag = summarize([*during, last], first, last, after, level, 0.5)
    assert lag.max_seconds == pytest.approx(0.8) and lag.max_events == 600
    # At 11.0 the feed lacked seq 1401: the head showed it at 10.5, not yet at 10.0.
    assert lag.max_seconds_by_head == pytest.approx(1.0)
    assert lag.samples == 4
    assert lag.fed_per_s == pytest.approx((2950 - 900) / 2)
    assert lag.committed_per_s == pytest.approx((3000 - 1000) / 2)
    assert lag.backlog_after == 400 and lag.caught_up_in == 0.5


def test_a_feed_that_never_catches_up_says_so() -> None:
    s = FeedSample(1.0, head=10, fed=4, waited=2.0)
    lag = summarize([s], s, s, s, s, 120.0)
    assert lag.caught_up_in is None and lag.backlog_after == 6
    assert FeedSample(0.0, head=3, fed=5, waited=0.0).behind == 0


def test_feed_messages_of_either_schema_are_read_for_the_workload() -> None:
    one = json.dumps({"schema": "tollgate.usage_recorded.v1", "workload": "w1"}).encode()
    batch = json.dumps({
        "schema": "tollgate.usage_batch.v1", "first_seq": 7, "last_seq": 8,
        "events": [{"seq": 7, "workload": "w0"}, {"seq": 8, "workload": "w1"}],
    }).encode()  # fmt: skip
    assert mentions(one, "w1") and not mentions(one, "w2")
    assert mentions(batch, "w1") and not mentions(batch, "w2")
