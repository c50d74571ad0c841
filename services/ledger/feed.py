"""The usage feed: committed events published to `tollgate.v1.usage.<subject>` in seq order.

`usage_events` is the outbox: written in the ledger's transaction, read here after commit.
The feed's position is advanced only after JetStream acknowledged everything up to it, so
a crash between commit and publish loses nothing; republished events carry the same
`Nats-Msg-Id` (`usage:<seq>`) and JetStream drops them inside its duplicate window, and
consumers are idempotent by `seq` beyond it. The row lock on the position makes one
publisher active at a time when several ledger instances run.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from datetime import UTC, datetime

import asyncpg
import nats.errors
from nats.js import JetStreamContext

from contracts.usage import UsageRecorded, usage_subject

from . import metrics
from .app import TRANSIENT

log = logging.getLogger("tollgate.ledger.feed")
FEED = "usage"


def _event(row: asyncpg.Record) -> UsageRecorded:
    return UsageRecorded(
        seq=row["seq"],
        recorded_at=row["recorded_at"],
        host=row["host"],
        epoch=row["epoch"],
        subject=row["subject"],
        workload=row["workload"],
        metric=row["metric"],
        delta=row["delta"],
        window_start=row["window_start"],
        window_end=row["window_end"],
        reset=row["reset"],
        batch_hash=row["hash"],
        labels=_labels(row["labels"]),
        received_at=row["received_at"],
        sampled_at=row["sampled_at"],
        clock_skew_seconds=row["clock_skew_seconds"],
    )


def _labels(value: object) -> dict[str, str]:
    loaded = json.loads(value) if isinstance(value, str) else value
    return dict(loaded) if isinstance(loaded, dict) else {}


class UsageFeed:
    """Publishes every committed usage event once, gap-free, in ledger order."""

    def __init__(self, js: JetStreamContext, pool: asyncpg.Pool, prefix: str, batch: int = 500):
        self.js = js
        self.pool = pool
        self.prefix = prefix
        self.batch = batch
        self.published = 0

    async def publish_pending(self) -> int:
        """Publish what is committed but not yet published; return how many went out."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO feed_positions VALUES ($1, 0, now()) ON CONFLICT DO NOTHING", FEED
            )
            position = await conn.fetchval(
                "SELECT seq FROM feed_positions WHERE feed = $1 FOR UPDATE", FEED
            )
            rows = await conn.fetch(
                """SELECT e.seq, e.recorded_at, e.host, e.epoch, e.subject, e.workload,
                          e.metric, e.delta, e.window_start, e.window_end, e.reset, b.hash,
                          e.labels, e.received_at, e.sampled_at, e.clock_skew_seconds
                   FROM usage_events e JOIN ledger_batches b USING (batch_id)
                   WHERE e.seq > $1 ORDER BY e.seq LIMIT $2""",
                position,
                self.batch,
            )
            if not rows:
                return 0
            # Sent in order on one connection; JetStream stores them in that order.
            acks = await asyncio.gather(
                *(
                    self.js.publish(
                        usage_subject(r["subject"], self.prefix),
                        _event(r).to_json(),
                        headers={"Nats-Msg-Id": f"{FEED}:{r['seq']}"},
                    )
                    for r in rows
                ),
                return_exceptions=True,
            )
            done = position
            for row, ack in zip(rows, acks, strict=True):
                if isinstance(ack, BaseException):
                    break
                done = row["seq"]
            await conn.execute(
                "UPDATE feed_positions SET seq = $2, updated_at = $3 WHERE feed = $1",
                FEED,
                done,
                datetime.now(UTC),
            )
        failed = next((a for a in acks if isinstance(a, BaseException)), None)
        if failed is not None:
            raise failed
        self.published += done - position
        metrics.FEED_PUBLISHED.inc(done - position)
        return int(done - position)

    async def run(self, stop: asyncio.Event, wake: asyncio.Event) -> None:
        """Publish whenever the ledger commits (`wake`), and at least once a second."""
        backoff = 0.1
        while not stop.is_set():
            try:
                while await self.publish_pending() == self.batch:
                    pass  # more waiting: keep going before sleeping
                backoff = 0.1
            except (*TRANSIENT, nats.errors.Error) as exc:
                log.warning("usage feed: cannot publish (%s: %s); retrying in %.1fs",
                            type(exc).__name__, exc, backoff)  # fmt: skip
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            wake.clear()
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_first(stop, wake), 1.0)


async def _first(*events: asyncio.Event) -> None:
    waits = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
