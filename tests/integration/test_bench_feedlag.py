"""The bench's feed-lag probe reads the ledger head and the feed's position from Postgres."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg

from bench.feedlag import FeedWatch, sample
from services.ledger.domain import Reading, SeriesKey
from services.ledger.store import apply_readings


async def commit(conn: asyncpg.Connection, n: int, stream_seq: int) -> None:
    at = datetime.now(UTC) - timedelta(minutes=5)
    readings = [
        Reading(SeriesKey("h", "e", "alice", f"w{i}", "cpu.used.seconds"), stream_seq,
                Decimal(stream_seq), at + timedelta(seconds=stream_seq))
        for i in range(n)
    ]  # fmt: skip
    await apply_readings(conn, "bench-test", readings, stream_seq)


async def test_the_probe_says_how_many_events_and_how_long_the_feed_is_behind(
    pool: asyncpg.Pool,
) -> None:
    async with pool.acquire() as conn:
        await commit(conn, 4, 1)
        await commit(conn, 4, 2)  # every counter grew: usage events
        head = await conn.fetchval("SELECT last_seq FROM ledger_head")
        # No feed position yet: nothing is on the feed.
        nothing = await sample(conn)
        assert (nothing.head, nothing.fed, nothing.behind) == (head, 0, head)
        await conn.execute("INSERT INTO feed_positions VALUES ('usage', 2, now())")
        first_unfed = await conn.fetchval("SELECT recorded_at FROM usage_events WHERE seq = 3")
        behind = await sample(conn)
        age = (datetime.now(UTC) - first_unfed).total_seconds()
        assert behind.behind == head - 2 and 0 < behind.waited <= age + 1
        await conn.execute("UPDATE feed_positions SET seq = $1 WHERE feed = 'usage'", head)
        level = await sample(conn)
        assert level.behind == 0 and level.waited == 0
    watch = FeedWatch(pool, interval=0.01)
    await watch.start()
    s, _ = await watch.until_level(5)
    await watch.stop()
    assert s.behind == 0 and len(watch.samples) >= 3
