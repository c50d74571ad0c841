"""The ledger against real NATS JetStream and Postgres."""

from __future__ import annotations

from decimal import Decimal

import asyncpg
import pytest
from nats.aio.client import Client

from contracts.dlq import REASON_HEADER, STREAM_SEQ_HEADER, dlq_stream, dlq_wildcard
from contracts.samples import samples_stream, samples_subject
from infra.bus import ensure_streams
from services.ledger import replay
from services.ledger.app import LedgerService
from tests.conftest import unique, wait_until
from tests.integration.conftest import MAX_PAYLOAD, batch_json, total


def counter(subject: str, metric: str, value: object, workload: str = "w1") -> dict[str, object]:
    return {"subject": subject, "workload": workload, "metric": metric, "value": value}


async def publish(nc: Client, prefix: str, host: str, body: bytes, msg_id: str | None = None):
    headers = {"Nats-Msg-Id": msg_id} if msg_id else None
    return await nc.jetstream().publish(samples_subject(host, prefix), body, headers=headers)


async def send(
    nc: Client, prefix: str, host: str, seq: int, subject: str, metric: str, value: object,
    epoch: str = "e1",
) -> None:  # fmt: skip
    """One reading of one series, as a raw batch without a Msg-Id (so only the ledger dedupes)."""
    await publish(nc, prefix, host, batch_json(host, epoch, seq, [counter(subject, metric, value)]))


async def test_cumulative_samples_fold_into_exact_deltas(
    nc: Client, prefix: str, pool: asyncpg.Pool, ledger: LedgerService
) -> None:
    host, alice = unique("host"), unique("alice")
    for seq, value in enumerate(["10.5", "10.5", "25.25", "100.000001"], start=1):
        await send(nc, prefix, host, seq, alice, "cpu.used.seconds", value)

    async def done() -> bool:
        return await total(pool, alice, "cpu.used.seconds") == Decimal("100.000001")

    await wait_until(done, what="cpu total 100.000001")
    deltas = await pool.fetch(
        "SELECT delta FROM usage_events WHERE subject = $1 ORDER BY seq", alice
    )
    assert [r["delta"] for r in deltas] == [
        Decimal("10.5"),
        Decimal("14.75"),
        Decimal("74.750001"),
    ]


async def test_redelivered_and_stale_samples_add_nothing(
    nc: Client, prefix: str, pool: asyncpg.Pool, ledger: LedgerService
) -> None:
    host, bob = unique("host"), unique("bob")
    body = batch_json(host, "e1", 2, [counter(bob, "net.tx.wan.bytes", 5000)])
    # Same sample three times without a Msg-Id (JetStream cannot dedupe): the ledger must.
    for _ in range(3):
        await publish(nc, prefix, host, body)
    # An older reading arrives late, with a lower value: stale, not a reset.
    await send(nc, prefix, host, 1, bob, "net.tx.wan.bytes", 1000)
    await send(nc, prefix, host, 3, bob, "net.tx.wan.bytes", 7000)

    async def caught_up() -> bool:
        pos = await pool.fetchval("SELECT stream_seq FROM consumer_positions")
        return pos == 5

    await wait_until(caught_up, what="ledger to consume all five messages")
    assert await total(pool, bob, "net.tx.wan.bytes") == 7000
    assert await pool.fetchval("SELECT count(*) FROM usage_events WHERE reset") == 0


async def test_a_counter_that_drops_is_a_reset_counted_from_zero(
    nc: Client, prefix: str, pool: asyncpg.Pool, ledger: LedgerService
) -> None:
    host, carol = unique("host"), unique("carol")
    for seq, value in [(1, 800), (2, 900), (3, 40), (4, 90)]:
        await send(nc, prefix, host, seq, carol, "log.bytes", value)
    # A new epoch restarts from zero too, without being a reset.
    await publish(nc, prefix, host, batch_json(host, "e2", 1, [counter(carol, "log.bytes", 15)]))

    async def done() -> bool:
        return await total(pool, carol, "log.bytes") == 900 + 90 + 15

    await wait_until(done, what="log.bytes total 1005")
    resets = await pool.fetch("SELECT delta FROM usage_events WHERE reset")
    assert [r["delta"] for r in resets] == [Decimal(40)]


def _bad(host: str, subject: str, case: str) -> bytes:
    """A message that can never be folded, by what is wrong with it."""
    one = {"subject": subject, "workload": "w1", "metric": "cpu.used.seconds", "value": 3}
    bodies = {
        "invalid_json": lambda: b"{not json",
        "not_an_object": lambda: b"[1, 2, 3]",
        "unknown_schema": lambda: b'{"schema": "tollgate.counter_batch.v9"}',
        "negative": lambda: batch_json(host, "e1", 1, [dict(one, value=-3)]),
        "nan": lambda: batch_json(host, "e1", 1, [one]).replace(b'"value": 3', b'"value": NaN'),
        "too_many_decimals": lambda: batch_json(host, "e1", 1, [dict(one, value="1.0000001")]),
        "bad_metric": lambda: batch_json(host, "e1", 1, [dict(one, metric="CPU Seconds")]),
        "fractional_bytes": lambda: batch_json(
            host, "e1", 1, [dict(one, metric="log.bytes", value="1.5")]
        ),
        "host_mismatch": lambda: batch_json("someone-else", "e1", 1, [one]),
        "oversize": lambda: batch_json(host, "e1", 1, [one]) + b" " * MAX_PAYLOAD,
    }
    return bodies[case]()


@pytest.mark.parametrize(
    ("case", "reason"),
    [
        ("invalid_json", "invalid_json"),
        ("not_an_object", "invalid_json"),
        ("unknown_schema", "unknown_schema"),
        ("negative", "invalid_payload"),
        ("nan", "invalid_json"),
        ("too_many_decimals", "invalid_payload"),
        ("bad_metric", "invalid_payload"),
        ("fractional_bytes", "invalid_payload"),
        ("host_mismatch", "host_mismatch"),
        ("oversize", "oversize"),
    ],
)
async def test_bad_messages_become_dead_letters_and_good_ones_keep_flowing(
    nc: Client,
    prefix: str,
    pool: asyncpg.Pool,
    ledger: LedgerService,
    case: str,
    reason: str,
) -> None:
    host, dave = unique("host"), unique("dave")
    body = _bad(host, dave, case)
    dlq_sub = await nc.jetstream().subscribe(dlq_wildcard(prefix), stream=dlq_stream(prefix))
    bad = await publish(nc, prefix, host, body)
    await send(nc, prefix, host, 2, dave, "cpu.used.seconds", 7)

    dead = await dlq_sub.next_msg(timeout=30)
    assert dead.subject.endswith(f".dlq.{reason}")
    assert dead.headers[REASON_HEADER] == reason
    assert dead.headers[STREAM_SEQ_HEADER] == str(bad.seq)
    assert dead.data == body

    async def good_one_counted() -> bool:
        return await total(pool, dave, "cpu.used.seconds") == 7

    await wait_until(good_one_counted, what="the valid message behind the bad one")


async def test_usage_events_are_append_only(
    nc: Client, prefix: str, pool: asyncpg.Pool, ledger: LedgerService
) -> None:
    host, erin = unique("host"), unique("erin")
    await publish(nc, prefix, host, batch_json(host, "e1", 1, [counter(erin, "log.bytes", 10)]))

    async def one() -> bool:
        return await total(pool, erin, "log.bytes") == 10

    await wait_until(one, what="one event")
    for sql in (
        "UPDATE usage_events SET delta = 0",
        "DELETE FROM usage_events",
        "TRUNCATE usage_events CASCADE",
        "DELETE FROM ledger_batches",
    ):
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await pool.execute(sql)


async def test_tampering_is_detected_at_the_first_bad_batch(
    nc: Client, prefix: str, pool: asyncpg.Pool, ledger: LedgerService
) -> None:
    host, frank = unique("host"), unique("frank")
    for seq in range(1, 6):
        await send(nc, prefix, host, seq, frank, "log.bytes", seq * 100)

        async def committed(seq: int = seq) -> bool:
            return await total(pool, frank, "log.bytes") == seq * 100

        await wait_until(committed, what=f"batch {seq}")
    async with pool.acquire() as conn:
        verdict = await replay.verify_chain(conn)
        assert verdict.ok and verdict.events == 5
        # An attacker with superuser rights bypasses the trigger and edits history.
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            await conn.execute(
                "UPDATE usage_events SET delta = 1 WHERE subject = $1 AND sample_seq = 3", frank
            )
        verdict = await replay.verify_chain(conn)
    assert not verdict.ok
    assert verdict.first_bad_batch == 3
    assert verdict.batches == 2


async def test_jetstream_drops_a_repeated_msg_id_within_the_configurable_window(
    nc: Client, prefix: str, pool: asyncpg.Pool, ledger: LedgerService
) -> None:
    js = nc.jetstream()
    info = await js.stream_info(samples_stream(prefix))
    assert info.config.duplicate_window == 120  # the fixture's setting
    await ensure_streams(js, prefix, duplicate_window=1200)  # changed: the stream follows
    assert (await js.stream_info(samples_stream(prefix))).config.duplicate_window == 1200
    host, gina = unique("host"), unique("gina")
    body = batch_json(host, "e1", 1, [counter(gina, "log.bytes", 64)])
    first = await publish(nc, prefix, host, body, msg_id=f"{host}:e1:1")
    again = await publish(nc, prefix, host, body, msg_id=f"{host}:e1:1")
    assert not first.duplicate and again.duplicate and again.seq == first.seq

    async def counted() -> bool:
        return await total(pool, gina, "log.bytes") == 64

    await wait_until(counted, what="the one stored copy to be counted")


async def test_a_large_fetch_is_committed_in_bounded_chunks(
    nc: Client, prefix: str, pool: asyncpg.Pool, streams: None
) -> None:
    service = LedgerService(nc, pool, prefix=prefix, batch=100, fetch_timeout=0.5, max_points=25)
    await service.subscribe()
    host, hugo = unique("host"), unique("hugo")
    for seq in range(1, 11):  # 10 messages of 10 readings: commits of 2 messages (<= 25)
        counters = [counter(hugo, "log.bytes", seq * 10 + i, workload=f"w{i}") for i in range(10)]
        await publish(nc, prefix, host, batch_json(host, "e1", seq, counters))
    assert service._sub is not None
    await service.handle(await service._sub.fetch(100, timeout=5))
    batches = await pool.fetch("SELECT event_count FROM ledger_batches ORDER BY batch_id")
    assert [b["event_count"] for b in batches] == [20, 20, 20, 20, 20]
    assert await total(pool, hugo, "log.bytes") == sum(100 + i for i in range(10))
