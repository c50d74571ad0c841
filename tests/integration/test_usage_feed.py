"""The usage feed: every committed event on tollgate.v1.usage.<subject>, in order, once."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.js.api import ConsumerConfig, DeliverPolicy

from contracts.samples import samples_subject
from contracts.usage import UsageRecorded, usage_stream, usage_subject, usage_wildcard
from services.ledger.app import LedgerService
from services.ledger.domain import Reading, SeriesKey
from services.ledger.feed import UsageFeed
from services.ledger.store import apply_readings
from tests.conftest import unique, wait_until
from tests.integration.conftest import batch_json


async def read_feed(nc: Client, prefix: str, count: int) -> list[UsageRecorded]:
    """Replay the feed from sequence 1, the way an auditor would."""
    sub = await nc.jetstream().pull_subscribe(
        usage_wildcard(prefix),
        stream=usage_stream(prefix),
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
    )
    events: list[UsageRecorded] = []
    while len(events) < count:
        for msg in await sub.fetch(count - len(events), timeout=10):
            events.append(UsageRecorded.model_validate_json(msg.data))
            await msg.ack()
    info = await sub.consumer_info()
    assert info.num_pending == 0, "the feed holds more events than were committed"
    await sub.unsubscribe()
    return events


async def test_committed_events_reach_the_feed_gap_free_in_ledger_order(
    nc: Client, prefix: str, pool: asyncpg.Pool, ledger: LedgerService
) -> None:
    host, subjects = unique("host"), [unique("alice"), unique("bob")]
    for seq in range(1, 6):
        counters = [
            {"subject": s, "workload": "w", "metric": "cpu.used.seconds", "value": f"{seq}.5"}
            for s in subjects
        ]
        await nc.jetstream().publish(
            samples_subject(host, prefix), batch_json(host, "e1", seq, counters)
        )
    events = await read_feed(nc, prefix, 10)
    assert [e.seq for e in events] == list(range(1, 11))
    rows = await pool.fetch(
        """SELECT e.seq, e.subject, e.delta, b.hash FROM usage_events e
           JOIN ledger_batches b USING (batch_id) ORDER BY seq"""
    )
    assert [(e.seq, e.subject, e.delta, e.batch_hash) for e in events] == [
        (r["seq"], r["subject"], r["delta"], r["hash"]) for r in rows
    ]
    # Each event is on its subject's own subject, with the delta as an exact string.
    msg = await nc.jetstream().get_last_msg(
        usage_stream(prefix), usage_subject(subjects[1], prefix)
    )
    assert json.loads(msg.data)["delta"] == "1"


async def test_a_crash_between_commit_and_publish_loses_nothing_and_repeats_nothing(
    nc: Client, prefix: str, pool: asyncpg.Pool, streams: None
) -> None:
    carol = unique("carol")
    key = SeriesKey(unique("h"), "e1", carol, "w", "log.bytes")
    now = datetime.now(UTC)
    async with pool.acquire() as conn:  # committed while no feed publisher ran
        for seq in range(1, 4):
            await apply_readings(conn, "test", [Reading(key, seq, Decimal(seq * 10), now)], seq)
    feed = UsageFeed(nc.jetstream(), pool, prefix)
    assert await feed.publish_pending() == 3
    # The publisher died after JetStream acked but before its position was saved.
    await pool.execute("UPDATE feed_positions SET seq = 1")
    assert await feed.publish_pending() == 2  # re-sent, with the same Nats-Msg-Id
    async with pool.acquire() as conn:
        await apply_readings(conn, "test", [Reading(key, 4, Decimal(45), now)], 4)
    assert await feed.publish_pending() == 1
    events = await read_feed(nc, prefix, 4)
    assert [(e.seq, e.delta) for e in events] == [(1, 10), (2, 10), (3, 10), (4, 15)]


async def test_the_feed_catches_up_after_nats_was_unreachable(
    nc: Client, prefix: str, pool: asyncpg.Pool, streams: None
) -> None:
    dave = unique("dave")
    key = SeriesKey(unique("h"), "e1", dave, "w", "log.bytes")
    async with pool.acquire() as conn:
        await apply_readings(conn, "test", [Reading(key, 1, Decimal(7), datetime.now(UTC))], 1)
    closed = await nats.connect(nc.connected_url.geturl())
    await closed.close()
    with pytest.raises(nats.errors.ConnectionClosedError):
        await UsageFeed(closed.jetstream(), pool, prefix).publish_pending()
    assert await pool.fetchval("SELECT seq FROM feed_positions") == 0

    async def published() -> bool:
        return await UsageFeed(nc.jetstream(), pool, prefix).publish_pending() == 1

    await wait_until(published, what="the feed to publish after the outage")
