"""Per-principal token buckets: each principal may make `burst` requests at once and
`rate` per second after that. Pure: the clock is passed in."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass

# Past this many principals, buckets that have refilled completely are forgotten (a full
# bucket is the same as no bucket), so memory stays bounded.
MAX_TRACKED = 50_000


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """`take(key)` spends one token of `key`'s bucket, or says how long until one is back."""

    def __init__(
        self, rate: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate = rate
        self.burst = burst
        self.clock = clock
        self._buckets: dict[str, _Bucket] = {}

    @property
    def enabled(self) -> bool:
        return self.rate > 0

    def take(self, key: str) -> float | None:
        """None when the request may go ahead; else the seconds to wait before retrying."""
        if not self.enabled:
            return None
        now = self.clock()
        bucket = self._buckets.get(key)
        if bucket is None:
            if len(self._buckets) >= MAX_TRACKED:
                self._forget_full(now)
            bucket = self._buckets[key] = _Bucket(float(self.burst), now)
        else:
            bucket.tokens = min(
                float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate
            )
            bucket.updated = now
        if bucket.tokens >= 1:
            bucket.tokens -= 1
            return None
        return (1 - bucket.tokens) / self.rate

    def _forget_full(self, now: float) -> None:
        full = [
            k
            for k, b in self._buckets.items()
            if b.tokens + (now - b.updated) * self.rate >= self.burst
        ]
        for k in full:
            del self._buckets[k]
