"""The ledger against real NATS JetStream and Postgres."""

from __future__ import annotations

from decimal import Decimal

import asyncpg
import pytest
from nats.aio.client import Client

from contracts.dlq import REASON_HEADER, STREAM_SEQ_HEADER, dlq_stream, dlq_wildcard
from contracts.samples import samples_subject
from services.ledger import replay
from services.ledger.app import LedgerService
from tests.conftest import unique, wait_until
from tests.integration.conftest import batch_json, total


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


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"{not json", "invalid_json"),
        (b'{"schema": "tollgate.counter_batch.v9"}', "unknown_schema"),
        (None, "invalid_payload"),
        (None, "host_mismatch"),
    ],
)
async def test_bad_messages_become_dead_letters_and_good_ones_keep_flowing(
    nc: Client,
    prefix: str,
    pool: asyncpg.Pool,
    ledger: LedgerService,
    body: bytes | None,
    reason: str,
) -> None:
    host, dave = unique("host"), unique("dave")
    if reason == "invalid_payload":
        body = batch_json(host, "e1", 1, [counter(dave, "cpu.used.seconds", -3)])
    if reason == "host_mismatch":
        body = batch_json("someone-else", "e1", 1, [counter(dave, "cpu.used.seconds", 3)])
    assert body is not None
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
