"""The usage feed: every committed event on tollgate.v1.usage.<subject>, in order, once.

Many events to a message: `tollgate.usage_batch.v1` envelopes of consecutive seqs of one
subject, published from the committed batch in memory, read back from Postgres otherwise.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from types import MappingProxyType

import asyncpg
import nats
import nats.errors
import pytest
from nats.aio.client import Client
from nats.js.api import ConsumerConfig, DeliverPolicy

from contracts.samples import samples_subject
from contracts.usage import UsageBatch, UsageRecorded, usage_stream, usage_wildcard
from services.ledger.app import FAILPOINT_EXIT_AFTER_COMMIT, LedgerService
from services.ledger.domain import Reading, SeriesKey, arrival
from services.ledger.feed import UsageFeed, batch_of_result, committed_batches, envelopes
from services.ledger.replay import event_line, events_after
from services.ledger.store import apply_readings
from tests.conftest import unique, wait_until
from tests.integration.conftest import batch_json
from tests.servers import TestServers


async def read_envelopes(nc: Client, prefix: str, events: int) -> list[tuple[str, UsageBatch]]:
    """Replay the feed from stream sequence 1, the way an auditor would: (Msg-Id, envelope)."""
    sub = await nc.jetstream().pull_subscribe(
        usage_wildcard(prefix),
        stream=usage_stream(prefix),
        config=ConsumerConfig(deliver_policy=DeliverPolicy.ALL),
    )
    out: list[tuple[str, UsageBatch]] = []
    while sum(len(b.events) for _, b in out) < events:
        for msg in await sub.fetch(100, timeout=10):
            envelope = UsageBatch.model_validate_json(msg.data)
            assert msg.subject == f"{prefix}.v1.usage.{envelope.subject}"
            assert msg.headers is not None
            out.append((msg.headers["Nats-Msg-Id"], envelope))
            await msg.ack()
    info = await sub.consumer_info()
    assert info.num_pending == 0, "the feed holds more events than were committed"
    await sub.unsubscribe()
    return out


async def read_feed(nc: Client, prefix: str, count: int) -> list[UsageRecorded]:
    """The feed's events one by one, each envelope expanded, checked to follow on."""
    found = await read_envelopes(nc, prefix, count)
    for (_, before), (_, after) in itertools.pairwise(found):
        assert after.first_seq == before.last_seq + 1, "consecutive envelopes, consecutive seqs"
    assert all(msg_id == f"usage:{b.first_seq}-{b.last_seq}" for msg_id, b in found)
    return [r for _, b in found for r in b.records()]


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
    # What the feed says of each event is exactly what GET /v1/events and `replay` say.
    async with pool.acquire() as conn:
        rows = [json.loads(event_line(r)) async for r in events_after(conn, 0)]
    fields = ("seq", "subject", "host", "epoch", "workload", "metric", "delta", "window_start",
              "window_end", "reset", "labels", "batch_hash", "recorded_at", "received_at",
              "sampled_at", "clock_skew_seconds")  # fmt: skip
    fed = [json.loads(e.to_json()) for e in events]
    assert [{k: e[k] for k in fields} for e in fed] == [{k: r[k] for k in fields} for r in rows]
    assert fed[1]["delta"] == "1"  # exact string: 2.5 - 1.5


async def test_a_batch_is_numbered_by_subject_so_each_envelope_is_one_range(
    nc: Client, prefix: str, pool: asyncpg.Pool, database_url: str, streams: None
) -> None:
    a, b = unique("a"), unique("b")
    now = datetime.now(UTC)
    keys = {s: SeriesKey(unique("h"), "e1", s, "w", "log.bytes") for s in (a, b)}
    # One batch, subjects interleaved; b's series twice (its order must hold).
    readings = [Reading(keys[b], 1, Decimal(5), now), Reading(keys[a], 1, Decimal(7), now),
                Reading(keys[b], 2, Decimal(9), now + timedelta(seconds=1))]  # fmt: skip
    async with pool.acquire() as conn:
        result = await apply_readings(conn, "test", readings, 1)
    by_seq = [(e.seq, e.usage.key.subject, e.usage.delta) for e in result.events]
    first, second = sorted([a, b])
    expected = {a: [Decimal(7)], b: [Decimal(5), Decimal(4)]}
    assert by_seq == [(1 + i, s, d) for i, (s, d) in
                      enumerate([(first, x) for x in expected[first]] +
                                [(second, x) for x in expected[second]])]  # fmt: skip
    feed = UsageFeed(nc.jetstream(), pool, prefix)
    assert await feed.publish_pending() == 3
    found = await read_envelopes(nc, prefix, 3)
    assert [(e.subject, e.first_seq, e.last_seq) for _, e in found] == [
        (first, 1, len(expected[first])), (second, len(expected[first]) + 1, 3),
    ]  # fmt: skip
    verified = subprocess.run(
        [sys.executable, "-m", "tollgate.cli", "replay", "--verify"],
        env={**os.environ, "TOLLGATE_DATABASE_URL": database_url},
        capture_output=True, text=True, timeout=60, check=False,
    )  # fmt: skip
    assert verified.returncode == 0, verified.stdout + verified.stderr


async def test_memory_and_postgres_give_the_same_envelopes_byte_for_byte(
    pool: asyncpg.Pool, streams: None
) -> None:
    """So a republish after a crash carries the same Nats-Msg-Ids as the first publish."""
    now = datetime.now(UTC)
    keys = [SeriesKey(unique("h"), "e1", s, "w", m) for s in (unique("x"), unique("y"))
            for m in ("cpu.used.seconds", "log.bytes")]  # fmt: skip
    # jsonb reorders keys; read-only, as the ledger's fold makes them (domain.readings)
    labels = MappingProxyType({"zone": "b", "gpu_model": "H100", "a": "1"})
    results = []
    async with pool.acquire() as conn:
        for round_ in range(1, 4):
            sampled = now - timedelta(days=1) + timedelta(seconds=round_)
            skewed = arrival(sampled, now, timedelta(minutes=5))  # flagged: clock_skew_seconds
            readings = [
                Reading(k, round_, Decimal(round_ * 10) + Decimal("0.250000"), sampled,
                        labels=labels, arrival=skewed)
                for k in keys
            ]  # fmt: skip
            results.append(await apply_readings(conn, "test", readings, round_))
        from_db = await committed_batches(conn, 0)
    in_memory = [batch_of_result(r) for r in results]
    assert [b for b in in_memory if b is not None] == from_db
    assert [e.body for b in from_db for e in envelopes(b, "t")] == [
        e.body for b in in_memory if b is not None for e in envelopes(b, "t")
    ]
    # A read that starts inside a batch (at an envelope's end) gives the rest of it.
    async with pool.acquire() as conn:
        tail = await committed_batches(conn, 2)
    assert [e.first_seq for e in envelopes(tail[0], "t", 2)] == [3]


async def test_a_republish_after_a_lost_position_is_deduplicated(
    nc: Client, prefix: str, pool: asyncpg.Pool, streams: None
) -> None:
    carol = unique("carol")
    key = SeriesKey(unique("h"), "e1", carol, "w", "log.bytes")
    now = datetime.now(UTC)
    feed = UsageFeed(nc.jetstream(), pool, prefix)
    async with pool.acquire() as conn:  # committed while the publisher holds them in memory
        for seq in range(1, 4):
            feed.on_commit(
                await apply_readings(conn, "test", [Reading(key, seq, Decimal(seq * 10), now)], seq)
            )
    assert await feed.publish_pending() == 3
    assert feed.envelopes == 3
    # The publisher died after JetStream acked but before its position was saved; the new
    # one holds nothing in memory and republishes from Postgres, with the same Msg-Ids.
    await pool.execute("UPDATE feed_positions SET seq = 1")
    again = UsageFeed(nc.jetstream(), pool, prefix)
    assert await again.publish_pending() == 2
    info = await nc.jetstream().stream_info(usage_stream(prefix))
    assert info.state.messages == 3, "JetStream dropped the republished envelopes"
    async with pool.acquire() as conn:
        again.on_commit(await apply_readings(conn, "test", [Reading(key, 4, Decimal(45), now)], 4))
    assert await again.publish_pending() == 1
    events = await read_feed(nc, prefix, 4)
    assert [(e.seq, e.delta) for e in events] == [(1, 10), (2, 10), (3, 10), (4, 15)]


async def test_a_publisher_that_falls_behind_drops_its_copy_and_reads_postgres(
    nc: Client, prefix: str, pool: asyncpg.Pool, streams: None
) -> None:
    key = SeriesKey(unique("h"), "e1", unique("dan"), "w", "log.bytes")
    now = datetime.now(UTC)
    feed = UsageFeed(nc.jetstream(), pool, prefix, batch=2, max_buffered=3)
    async with pool.acquire() as conn:
        for seq in range(1, 6):
            feed.on_commit(
                await apply_readings(conn, "test", [Reading(key, seq, Decimal(seq), now)], seq)
            )
    assert feed.dropped == 1  # the 4th batch would have held 4 > 3 events
    total = 0
    while n := await feed.publish_pending():
        total += n
    assert total == 5
    assert [e.seq for e in await read_feed(nc, prefix, 5)] == [1, 2, 3, 4, 5]


async def test_a_ledger_killed_between_commit_and_publish_loses_and_repeats_nothing(
    servers: TestServers, nc: Client, prefix: str, database_url: str, pool: asyncpg.Pool,
    streams: None, tmp_path: Path,
) -> None:  # fmt: skip
    """The committed batch was only in the dead process's memory: Postgres has it."""
    host, subjects = unique("host"), [unique("u"), unique("v")]
    for seq in range(1, 4):
        counters = [{"subject": s, "workload": "w", "metric": "log.bytes", "value": seq * 10}
                    for s in subjects]  # fmt: skip
        await nc.jetstream().publish(
            samples_subject(host, prefix), batch_json(host, "e1", seq, counters),
            headers={"Nats-Msg-Id": f"{host}:e1:{seq}"},
        )  # fmt: skip
    env = {**os.environ, "TOLLGATE_NATS_URL": servers.nats_url,
           "TOLLGATE_DATABASE_URL": database_url, "TOLLGATE_PREFIX": prefix,
           "TOLLGATE_DATA_DIR": str(tmp_path), "TOLLGATE_LEDGER_BATCH": "1",
           "TOLLGATE_LEDGER_ACK_WAIT": "2"}  # fmt: skip
    died = subprocess.run(
        [sys.executable, "-m", "tollgate.cli", "ledger"],
        env={**env, FAILPOINT_EXIT_AFTER_COMMIT: "1"}, capture_output=True, timeout=60,
        check=False,
    )  # fmt: skip
    assert died.returncode == 137, died.stdout + died.stderr
    assert await pool.fetchval("SELECT count(*) FROM usage_events") == 2
    assert await pool.fetchval("SELECT coalesce(max(seq), 0) FROM feed_positions") == 0
    log = open(tmp_path / "ledger.log", "ab")  # noqa: SIM115 - the child writes to it
    again = subprocess.Popen(
        [sys.executable, "-m", "tollgate.cli", "ledger"], env=env, stdout=log,
        stderr=subprocess.STDOUT,
    )  # fmt: skip

    # The dead ledger may have fetched the later samples too: redelivered out of order,
    # an older one adds zero and a newer one its whole step, so count events, not samples.
    async def folded_and_fed() -> bool:
        total = await pool.fetchval("SELECT coalesce(sum(delta), 0) FROM usage_events")
        fed = await pool.fetchval("SELECT seq FROM feed_positions WHERE feed = 'usage'")
        head = await pool.fetchval("SELECT coalesce(max(seq), 0) FROM usage_events")
        return total == 60 and fed == head

    try:
        await wait_until(folded_and_fed, timeout=60)
        count = await pool.fetchval("SELECT count(*) FROM usage_events")
        events = await read_feed(nc, prefix, count)
    finally:
        again.terminate()
        again.wait(30)
        log.close()
    assert [e.seq for e in events] == list(range(1, count + 1))
    totals: dict[str, Decimal] = {}
    for e in events:
        totals[e.subject] = totals.get(e.subject, Decimal(0)) + e.delta
    assert totals == {s: Decimal(30) for s in subjects}


async def test_the_feed_catches_up_after_nats_was_unreachable(
    nc: Client, prefix: str, pool: asyncpg.Pool, streams: None
) -> None:
    dave = unique("dave")
    key = SeriesKey(unique("h"), "e1", dave, "w", "log.bytes")
    closed = await nats.connect(nc.connected_url.geturl())
    await closed.close()
    feed = UsageFeed(closed.jetstream(), pool, prefix)
    async with pool.acquire() as conn:
        feed.on_commit(
            await apply_readings(conn, "test", [Reading(key, 1, Decimal(7), datetime.now(UTC))], 1)
        )
    with pytest.raises(nats.errors.ConnectionClosedError):
        await feed.publish_pending()
    assert await pool.fetchval("SELECT seq FROM feed_positions") == 0

    async def published() -> bool:
        return await UsageFeed(nc.jetstream(), pool, prefix).publish_pending() == 1

    await wait_until(published, what="the feed to publish after the outage")
