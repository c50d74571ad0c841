"""Per-principal token buckets."""

from __future__ import annotations

import pytest

from services.api import ratelimit
from services.api.ratelimit import RateLimiter


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_a_burst_is_allowed_then_one_request_per_refill() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=2, burst=3, clock=clock)

    assert [limiter.take("alice") for _ in range(3)] == [None, None, None]
    assert limiter.take("alice") == pytest.approx(0.5)
    clock.now += 0.5
    assert limiter.take("alice") is None
    assert limiter.take("alice") == pytest.approx(0.5)


def test_buckets_are_per_principal_and_refill_only_to_the_burst() -> None:
    clock = Clock()
    limiter = RateLimiter(rate=1, burst=2, clock=clock)
    limiter.take("alice")
    limiter.take("alice")

    assert limiter.take("bob") is None
    clock.now += 1000
    assert [limiter.take("alice") for _ in range(3)][:2] == [None, None]
    assert limiter.take("alice") is not None


def test_a_zero_rate_means_no_limit() -> None:
    limiter = RateLimiter(rate=0, burst=1)

    assert not limiter.enabled
    assert all(limiter.take("alice") is None for _ in range(1000))


def test_full_buckets_are_forgotten_when_too_many_are_tracked(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(ratelimit, "MAX_TRACKED", 3)
    clock = Clock()
    limiter = RateLimiter(rate=1, burst=1, clock=clock)
    for name in ("a", "b", "c"):
        limiter.take(name)
    clock.now += 5  # every bucket is full again

    limiter.take("d")

    assert set(limiter._buckets) == {"d"}
