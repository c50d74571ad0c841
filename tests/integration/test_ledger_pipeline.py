"""The ledger's planned-ahead commits: stale plans are folded again, rows read back exact."""

from __future__ import annotations

import asyncio
import contextlib
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
from nats.aio.client import Client

from contracts.dlq import dlq_stream
from contracts.samples import samples_stream, samples_subject
from infra.broker import TollgateBroker
from services.ledger import store
from services.ledger.app import LedgerService
from services.ledger.domain import Arrival, Reading, SeriesKey
from services.ledger.ingest import SeriesCache, plan_ahead
from services.ledger.replay import verify_chain
from tests.conftest import unique, wait_until
from tests.integration.conftest import TRUSTED_CLOCKS, batch_json, total
from tests.servers import TestServers

T0 = datetime(2026, 11, 22, 10, tzinfo=UTC)


async def test_a_plan_another_writer_overtook_is_folded_again_and_counts_once(
    pool: asyncpg.Pool,
) -> None:
    key = SeriesKey(unique("h"), "e", "alice", "w", "cpu.used.seconds")
    async with pool.acquire() as conn:
        await store.apply_readings(conn, "a", [Reading(key, 1, Decimal(10), T0)], 1)
    cache = SeriesCache()
    second = [Reading(key, 2, Decimal(25), T0 + timedelta(seconds=10))]
    planned = await plan_ahead(pool, cache, second, 2, None)
    assert [u.delta for u in planned.usage] == [Decimal(15)]
    async with pool.acquire() as conn:
        # Another ledger instance took the same sample (a redelivery) and committed first.
        await store.apply_readings(conn, "b", second, 2)
        done = await store.commit(conn, "a", second, 2, planned)
    assert not done.as_planned
    assert done.plan.usage == []  # the sample was counted once, by the other writer
    total = await pool.fetchval("SELECT sum(delta) FROM usage_events WHERE host = $1", key.host)
    assert total == 25
    async with pool.acquire() as conn:
        assert (await verify_chain(conn)).ok


async def test_a_plan_on_the_head_it_expected_is_written_as_planned(pool: asyncpg.Pool) -> None:
    key = SeriesKey(unique("h"), "e", "alice", "w", "cpu.used.seconds")
    cache = SeriesCache()
    first = [Reading(key, 1, Decimal(10), T0)]
    async with pool.acquire() as conn:
        done = await store.commit(
            conn, "a", first, 1, await plan_ahead(pool, cache, first, 1, None)
        )
    assert done.as_planned
    cache.committed(done)
    second = [Reading(key, 2, Decimal(12), T0 + timedelta(seconds=10))]
    planned = await plan_ahead(pool, cache, second, 2, None)
    assert planned.states == {key: done.plan.changed[key]}  # from memory, not the database
    async with pool.acquire() as conn:
        done = await store.commit(conn, "a", second, 2, planned)
    assert done.as_planned
    assert done.head == await _head(pool)
    async with pool.acquire() as conn:
        assert (await verify_chain(conn)).ok


async def _head(pool: asyncpg.Pool) -> store.Head:
    async with pool.acquire() as conn:
        return await store.read_head(conn)


async def test_binary_copy_rows_read_back_exactly_as_folded(pool: asyncpg.Pool) -> None:
    host = unique("h")
    received = datetime(1999, 12, 31, 23, 59, 59, 999_999, tzinfo=UTC)
    skewed = Arrival(received, received - timedelta(minutes=5), received + timedelta(minutes=5),
                     Decimal("-12345.678901"))  # fmt: skip
    values = [Decimal("0.000001"), Decimal("1234.5"), Decimal(10**31) + Decimal("0.25"),
              Decimal("1E+3"), Decimal("7.100000")]  # fmt: skip
    labels = {"gpu_model": 'Zoë "x" \\ y\u00a0', "zone": "ä"}
    items = [
        Reading(
            SeriesKey(host, "e", f"s{i}\\t", "w ü", "cpu.used.seconds"),
            1,
            v,
            received,
            False,
            labels if i % 2 else {},
            7 + i,
            skewed if i % 2 else None,
        )
        for i, v in enumerate(values)
    ]
    later = datetime(2262, 4, 11, 23, 47, 16, 854_775, tzinfo=UTC)
    items.append(Reading(items[0].key, 2, Decimal(1), later, stream_seq=20))
    async with pool.acquire() as conn:
        result = await store.apply_readings(conn, "rows", items, 20)
        rows = await conn.fetch("SELECT * FROM usage_events WHERE host = $1 ORDER BY seq", host)
        assert (await verify_chain(conn)).ok
    assert len(rows) == len(result.events) == len(items)
    for row, event in zip(rows, result.events, strict=True):
        u = event.usage
        assert row["seq"] == event.seq and row["batch_id"] == event.batch_id
        assert row["recorded_at"] == event.recorded_at
        assert (row["host"], row["epoch"], row["subject"], row["workload"], row["metric"]) == u.key
        assert row["delta"] == u.delta
        assert (row["window_start"], row["window_end"]) == (u.window_start, u.window_end)
        assert (row["sample_seq"], row["stream_seq"], row["reset"]) == (
            u.sample_seq, u.stream_seq, u.reset,
        )  # fmt: skip
        assert json.loads(row["labels"]) == dict(u.labels)
        assert (row["received_at"], row["sampled_at"]) == (u.received_at, u.sampled_at)
        assert row["clock_skew_seconds"] == u.clock_skew


async def test_on_commit_gets_every_committed_event_once_in_seq_order(
    nc: Client, pool: asyncpg.Pool, prefix: str, streams: None
) -> None:
    seen: list[store.CommittedEvent] = []
    service = LedgerService(
        nc, pool, prefix=prefix, batch=50, fetch_timeout=0.2, max_points=7,
        max_clock_skew=TRUSTED_CLOCKS, on_commit=lambda r: seen.extend(r.events),
    )  # fmt: skip
    await service.subscribe()
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))
    js = nc.jetstream()
    host = unique("h")
    subjects = [unique("s") for _ in range(3)]
    for seq in range(1, 11):
        counters = [
            {"subject": s, "workload": "w", "metric": "cpu.used.seconds", "value": seq * (i + 1)}
            for i, s in enumerate(subjects)
        ]
        await js.publish(samples_subject(host, prefix), batch_json(host, "e", seq, counters))
    try:

        async def all_in() -> bool:
            return len(seen) == 30

        await wait_until(all_in, what="30 events handed to on_commit")
    finally:
        stop.set()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
    stored = await pool.fetch("SELECT seq, subject FROM usage_events ORDER BY seq")
    assert [(e.seq, e.usage.key.subject) for e in seen] == [(r[0], r[1]) for r in stored]
    assert sum(e.usage.delta for e in seen) == 10 * (1 + 2 + 3)


async def test_the_ledger_on_a_faststream_subscriber_commits_then_acks_and_dead_letters(
    servers: TestServers, nc: Client, pool: asyncpg.Pool, prefix: str, streams: None
) -> None:
    broker = TollgateBroker(servers.nats_url, name="ledger")
    await broker.connect()
    stop = asyncio.Event()
    service = LedgerService(
        broker.nc, pool, prefix=prefix, batch=50, fetch_timeout=0.2, max_points=7,
        max_clock_skew=TRUSTED_CLOCKS,
    )  # fmt: skip
    service.declare(broker, stop)
    await broker.start()
    serving = asyncio.create_task(service.serve(stop))
    js = nc.jetstream()
    host, subject = unique("h"), unique("s")
    try:
        for seq in range(1, 6):
            counter = {"subject": subject, "workload": "w", "metric": "log.bytes", "value": seq}
            await js.publish(samples_subject(host, prefix), batch_json(host, "e", seq, [counter]))
        await js.publish(samples_subject(host, prefix), b"{not json")

        async def drained() -> bool:
            info = await js.consumer_info(samples_stream(prefix), "ledger")
            return info.num_pending == 0 and info.num_ack_pending == 0

        await wait_until(drained, what="every sample acked or dead-lettered")
    finally:
        stop.set()
        await asyncio.wait_for(serving, 10)
        await broker.stop()
    assert await total(pool, subject, "log.bytes") == 5
    dead = await js.stream_info(dlq_stream(prefix))
    assert dead.state.messages == 1


async def test_a_ledger_other_writers_keep_overtaking_folds_under_the_lock_and_counts_once(
    nc: Client, pool: asyncpg.Pool, prefix: str, streams: None
) -> None:
    service = LedgerService(
        nc, pool, prefix=prefix, batch=50, fetch_timeout=0.2, max_clock_skew=TRUSTED_CLOCKS
    )
    await service.subscribe()
    assert service._sub is not None
    js = nc.jetstream()
    host, subject = unique("h"), unique("s")
    other = SeriesKey(unique("h"), "e", subject, "w", "log.bytes")
    for seq in range(1, 7):
        counter = {"subject": subject, "workload": "w", "metric": "log.bytes", "value": seq * 2}
        await js.publish(samples_subject(host, prefix), batch_json(host, "e", seq, [counter]))
        await service.handle(await service._sub.fetch(1, timeout=5))
        async with pool.acquire() as conn:  # another ledger commits between every two
            await store.apply_readings(conn, "other", [Reading(other, seq, Decimal(seq), T0)], 0)
    assert service._stale >= 2  # it stopped planning ahead
    assert await total(pool, subject, "log.bytes") == 12 + 6
    async with pool.acquire() as conn:
        assert (await verify_chain(conn)).ok
