"""The usage feed as the policy consumes it: by ledger seq, once, whatever JetStream delivers.

No ledger runs here, so the ledger table is empty and cannot fill gaps: what the policy
knows comes from the feed messages the test publishes itself (envelopes of consecutive seqs,
and one per-event message as the feed carried before envelopes).
"""

from __future__ import annotations

import asyncio
import json
import logging
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
import pytest
from nats.aio.client import Client

from contracts.spawn import SpawnRequest
from contracts.usage import UsageBatch, UsageBatchEvent, UsageRecorded, usage_stream, usage_subject
from services.ledger.domain import Reading, SeriesKey
from services.ledger.store import apply_readings
from services.policy.feed import FOLD_SLICE, decode_envelope
from tests.conftest import unique, wait_until
from tests.integration.test_policy_support import GIB_HOUR, spawn

pytest_plugins = ["tests.integration.test_policy_support"]
CONFIG = """
quotas:
  - {name: memory, metric: mem.alloc.byte_seconds, limit: 100000 GiB*h, window: {rolling: 7d}}
"""


def envelope(subject: str, first: int, gib_hours: list[str]) -> UsageBatch:
    now = datetime.now(UTC)
    common = {"host": "node-1", "epoch": "e1", "workload": "nb", "window_end": now,
              "metric": "mem.alloc.byte_seconds"}  # fmt: skip
    events = [
        UsageBatchEvent(seq=first + i, delta=Decimal(g) * GIB_HOUR, **common)
        for i, g in enumerate(gib_hours)
    ]
    return UsageBatch(
        subject=subject, batch_id=1, batch_hash="0" * 64, recorded_at=now, first_seq=first,
        last_seq=first + len(events) - 1, events=events,
    )  # fmt: skip


async def test_feed_envelopes_count_once_in_seq_order_across_duplicates_and_gaps(
    nc: Client, prefix: str, policy_for
) -> None:
    alice = unique("alice")
    policy = await policy_for(CONFIG)
    js = nc.jetstream()

    async def publish(first: int, *gib_hours: str, msg_id: str | None = None) -> None:
        batch = envelope(alice, first, list(gib_hours))
        await js.publish(
            usage_subject(alice, prefix), batch.to_json(),
            headers={"Nats-Msg-Id": msg_id or batch.msg_id},
        )  # fmt: skip

    async def used_is(gib_hours: str) -> bool:
        (status,) = (await spawn(nc, prefix, SpawnRequest(subject=alice))).quotas
        return status.used == Decimal(gib_hours)

    await publish(1, "1", "2")
    # A per-event message, as published before envelopes: still read.
    old = UsageRecorded(
        seq=3, recorded_at=datetime.now(UTC), host="node-1", epoch="e1", subject=alice,
        workload="nb", metric="mem.alloc.byte_seconds", delta=Decimal(3) * GIB_HOUR,
        window_end=datetime.now(UTC), batch_hash="0" * 64,
    )  # fmt: skip
    await js.publish(usage_subject(alice, prefix), old.to_json())
    await publish(2, "2", "3", msg_id="usage:2-3:replayed")  # past the dedupe: seq drops it
    await publish(6, "6")  # 4 and 5 are missing, and the ledger cannot supply them

    async def held_back() -> bool:
        return policy.service.live.stats.usage_feed_gaps >= 1 and await used_is("6")

    await wait_until(held_back, what="seq 1..3 counted once, 6 held back at the gap")
    await publish(3, "3", "4", "5")  # overlaps what was folded: only 4 and 5 count
    await publish(7, "0.5")
    await wait_until(lambda: used_is("21.5"), what="1..7 counted once each")
    assert policy.service.live.usage is not None
    assert policy.service.live.usage.last_seq == 7


async def test_hostile_feed_messages_are_logged_and_terminated_not_fatal(
    nc: Client, prefix: str, policy_for, caplog: pytest.LogCaptureFixture
) -> None:
    bob = unique("bob")
    policy = await policy_for(CONFIG)
    js = nc.jetstream()
    good = json.loads(envelope(bob, 1, ["1", "2"]).to_json())
    e0, e1 = good["events"]
    hostile = [
        b"{not json",
        b'{"schema": "tollgate.usage_batch.v7", "events": []}',
        json.dumps({**good, "last_seq": 5}).encode(),  # claims seqs it does not carry
        json.dumps({**good, "events": [{**e0, "delta": "-7"}, e1]}).encode(),
        json.dumps({**good, "events": [{**e0, "window_end": "yesterday"}, e1]}).encode(),
    ]
    caplog.set_level(logging.ERROR, "tollgate.policy.feed")
    for body in hostile:
        await js.publish(usage_subject(bob, prefix), body)
    await js.publish(usage_subject(bob, prefix), json.dumps(good).encode())

    async def counted() -> bool:
        (status,) = (await spawn(nc, prefix, SpawnRequest(subject=bob))).quotas
        return status.used == Decimal(3)

    await wait_until(counted, what="the good envelope folded behind the hostile ones")
    refused = [r for r in caplog.records if "is not a usage envelope" in r.getMessage()]
    assert len(refused) == len(hostile)
    info = await js.consumer_info(usage_stream(prefix), policy.service.usage.durable)
    assert info.num_ack_pending == 0 and info.num_pending == 0  # terminated, not redelivered


async def test_a_large_envelope_is_folded_in_slices_that_let_spawn_checks_in(
    nc: Client, prefix: str, policy_for
) -> None:
    carol = unique("carol")
    policy = await policy_for(CONFIG)
    follower = policy.service.usage
    live = policy.service.live
    assert live.usage is not None
    first = live.usage.last_seq + 1
    events = envelope(carol, first, ["0.001"] * 1000)
    turns = 0
    folding = True

    async def other_work() -> None:  # stands for spawn checks waiting on the loop
        nonlocal turns
        while folding:
            turns += 1
            await asyncio.sleep(0)

    other = asyncio.create_task(other_work())
    await asyncio.sleep(0)
    turns = 0
    assert await follower._fold(decode_envelope(events.to_json()))
    folding = False
    await other
    assert live.usage.last_seq == first + 999
    assert turns >= 1000 // FOLD_SLICE


async def test_events_the_feed_never_brings_are_read_from_the_ledger(
    nc: Client, prefix: str, pool: asyncpg.Pool, policy_for
) -> None:
    """No feed publisher runs: the watcher sees the ledger head move and reads the events."""
    dave = unique("dave")
    policy = await policy_for(CONFIG)
    key = SeriesKey(unique("h"), "e1", dave, "nb", "mem.alloc.byte_seconds")
    async with pool.acquire() as conn:
        for seq, gib_hours in enumerate(("2", "5"), 1):
            reading = Reading(key, seq, Decimal(gib_hours) * GIB_HOUR, datetime.now(UTC))
            await apply_readings(conn, "test", [reading], seq)

    async def caught_up() -> bool:
        (status,) = (await spawn(nc, prefix, SpawnRequest(subject=dave))).quotas
        return status.used == Decimal(5)

    await wait_until(caught_up, what="the ledger's events folded without the feed")
    assert policy.service.live.stats.usage_catchup_events >= 2
