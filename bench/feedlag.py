"""How far the usage feed is behind the ledger head, read from Postgres alone.

The ledger commits events (`ledger_head.last_seq`) and its feed publisher advances
`feed_positions['usage']` past what JetStream acked, whatever the messages look like
(one per event, or `tollgate.usage_batch.v1` envelopes). So the lag in events is
`head - fed`, and the lag in seconds is how long the oldest committed event not yet on the
feed has waited since the ledger recorded it (`recorded_at`, stamped inside its batch's
transaction, so a little before its commit: the figure errs towards more lag, not less).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field

import asyncpg

POSITION = """
    SELECT h.last_seq AS head, coalesce(f.seq, 0) AS fed,
           extract(epoch FROM clock_timestamp() - (
               SELECT e.recorded_at FROM usage_events e WHERE e.seq = coalesce(f.seq, 0) + 1
               LIMIT 1))::float8 AS waited
    FROM ledger_head h LEFT JOIN feed_positions f ON f.feed = 'usage'
    WHERE h.id = 1"""
# How long after P1 to wait for the feed to be level with the head (reported, not a goal).
LEVEL_WAIT = 30.0


@dataclass(frozen=True)
class FeedSample:
    at: float  # time.perf_counter()
    head: int
    fed: int
    waited: float  # seconds the oldest unfed event has waited; 0 when the feed is level

    @property
    def behind(self) -> int:
        return max(0, self.head - self.fed)


async def sample(conn: asyncpg.Connection) -> FeedSample:
    row = await conn.fetchrow(POSITION)
    assert row is not None, "ledger_head row missing: run migrations"
    behind = row["head"] > row["fed"]
    waited = float(row["waited"] or 0.0) if behind else 0.0
    return FeedSample(time.perf_counter(), int(row["head"]), int(row["fed"]), max(waited, 0.0))


@dataclass
class FeedWatch:
    """Samples of the feed against the head every `interval` seconds while running."""

    pool: asyncpg.Pool
    interval: float = 0.1
    samples: list[FeedSample] = field(default_factory=list)
    _task: asyncio.Task[None] | None = None
    _stop: asyncio.Event = field(default_factory=asyncio.Event)

    async def start(self) -> FeedSample:
        first = await self.once()
        self._stop.clear()
        self._task = asyncio.create_task(self._run())
        return first

    async def once(self) -> FeedSample:
        async with self.pool.acquire() as conn:
            s = await sample(conn)
        self.samples.append(s)
        return s

    async def _run(self) -> None:
        while not self._stop.is_set():
            t0 = time.perf_counter()
            await self.once()
            pause = self.interval - (time.perf_counter() - t0)
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stop.wait(), max(pause, 0.0))

    async def stop(self) -> FeedSample:
        self._stop.set()
        if self._task is not None:
            await self._task
            self._task = None
        return await self.once()

    async def until_level(self, timeout: float) -> tuple[FeedSample, float]:
        """Sample until the feed has everything the ledger committed (or `timeout`);
        the last sample and the seconds it took."""
        t0 = time.perf_counter()
        s = await self.once()
        while s.behind and time.perf_counter() - t0 < timeout:
            await asyncio.sleep(self.interval)
            s = await self.once()
        return s, time.perf_counter() - t0


@dataclass(frozen=True)
class FeedLag:
    """The feed during one run of the ledger at full speed, and right after it."""

    max_seconds: float
    max_events: int
    # The same lag by the samples of the head alone (no ledger timestamp, so not counting
    # the ledger's own commit): how long the head had shown the oldest event not yet fed.
    max_seconds_by_head: float
    samples: int
    fed_per_s: float  # events the feed published per second over the run
    committed_per_s: float  # events the ledger committed per second over the same run
    backlog_after: int  # committed events not yet on the feed when the ingest had committed
    caught_up_in: float | None  # seconds from then until the feed had everything (None: never)


def summarize(
    during: list[FeedSample], first: FeedSample, last: FeedSample, after: FeedSample,
    level: FeedSample, level_seconds: float,
) -> FeedLag:  # fmt: skip
    """`during`: the samples of the run; `first`/`last` its ends; `after` the sample once
    the ledger had committed the whole run; `level` the last sample of waiting for the feed."""
    elapsed = max(last.at - first.at, 1e-9)
    window = [s for s in during if first.at <= s.at <= last.at] or [first, last]
    return FeedLag(
        max_seconds=max(s.waited for s in window),
        max_events=max(s.behind for s in window),
        max_seconds_by_head=_lag_by_head(during, window),
        samples=len(window),
        fed_per_s=(last.fed - first.fed) / elapsed,
        committed_per_s=(last.head - first.head) / elapsed,
        backlog_after=after.behind,
        caught_up_in=None if level.behind else level_seconds,
    )


def _lag_by_head(during: list[FeedSample], window: list[FeedSample]) -> float:
    """Max over `window` of how long the head had shown the oldest event the feed still
    lacked: this sample's time less the last sample's (of `during`) whose head had not yet
    passed the feed's position, an upper bound by at most one interval. When the head had
    passed it before the first sample, the event's recorded_at age stands in."""
    ordered = sorted(during, key=lambda s: s.at)
    worst, i = 0.0, 0
    for s in sorted(window, key=lambda s: s.at):
        if not s.behind:
            continue
        # The feed position only grows, so the first sample to pass it only moves forward.
        while i < len(ordered) and ordered[i].head <= s.fed:
            i += 1
        worst = max(worst, s.at - ordered[i - 1].at if i > 0 else s.waited)
    return worst
