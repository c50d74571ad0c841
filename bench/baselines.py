"""Raw baselines, measured first in every run on the same servers: B1 to B4."""

from __future__ import annotations

import asyncio
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
from nats.aio.client import Client
from nats.js.api import AckPolicy, ConsumerConfig, StorageType, StreamConfig

from .http import KeepAlivePool
from .load import Fleet, Window, paced, timed
from .report import Line, latency_lines
from .stack import ROOT, Stack, free_port, wait_http

COPY_BATCH = 5000
COLUMNS = (
    "seq", "batch_id", "recorded_at", "host", "epoch", "subject", "workload", "metric",
    "delta", "window_start", "window_end", "sample_seq", "stream_seq", "reset", "labels",
)  # fmt: skip


@dataclass
class Baselines:
    copy_rows_per_s: float = 0.0
    publish_msgs_per_s: float = 0.0
    fetch_msgs_per_s: float = 0.0
    http_p99_ms: float = 0.0


async def b1_copy(conn: asyncpg.Connection, seconds: float) -> float:
    """Binary COPY of the ledger's row shape, COPY_BATCH rows a transaction, one connection."""
    await conn.execute(
        "CREATE TABLE bench_copy (LIKE usage_events INCLUDING DEFAULTS INCLUDING CONSTRAINTS "
        "INCLUDING INDEXES)"
    )
    now = datetime.now(UTC)
    start = now - timedelta(hours=1)
    shape = [
        (1, now, f"node{i % 50}", "bench", f"user{i % 20}", f"node{i % 50}-w{i % 25}",
         ("cpu.used.seconds", "net.tx.wan.bytes")[i % 2], Decimal(f"{i}.25"), start, now,
         7, 7, False, "{}")
        for i in range(COPY_BATCH)
    ]  # fmt: skip
    rows, seq = 0, 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        records = [(seq + i, *r) for i, r in enumerate(shape)]
        seq += COPY_BATCH
        await conn.copy_records_to_table("bench_copy", columns=COLUMNS, records=records)
        rows += COPY_BATCH
    elapsed = time.perf_counter() - t0
    await conn.execute("DROP TABLE bench_copy")
    return rows / elapsed


async def b2_publish(nc: Client, seconds: float, window: int = 256) -> float:
    """JetStream publish of 200-byte messages, `window` acks outstanding."""
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(name="BENCH_RAW", subjects=["bench.raw.>"], storage=StorageType.FILE)
    )
    body = b"x" * 200
    pub = Window(js, window)
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        await pub.publish(f"bench.raw.{n % 50}", body)
        n += 1
    await pub.drain()
    return n / (time.perf_counter() - t0)


async def b3_fetch(nc: Client, fleet: Fleet, messages: int, batch: int = 1000) -> float:
    """Pull fetch + ack of a prefilled stream of P1-shaped messages, no processing."""
    js = nc.jetstream()
    await js.add_stream(
        StreamConfig(name="BENCH_FETCH", subjects=["bench.fetch.>"], storage=StorageType.FILE)
    )
    pub = Window(js, 256)
    bodies = [fleet.body(h, 1) for h in range(fleet.hosts)]
    for i in range(messages):
        await pub.publish(f"bench.fetch.node{i % fleet.hosts}", bodies[i % fleet.hosts])
    await pub.drain()
    sub = await js.pull_subscribe(
        "bench.fetch.>", durable="b3", stream="BENCH_FETCH",
        config=ConsumerConfig(ack_policy=AckPolicy.EXPLICIT, max_ack_pending=50_000),
    )  # fmt: skip
    got = 0
    t0 = time.perf_counter()
    while got < messages:
        for msg in await sub.fetch(batch, timeout=5):
            await msg.ack()
            got += 1
    await nc.flush()
    elapsed = time.perf_counter() - t0
    await js.delete_stream("BENCH_FETCH")
    await js.delete_stream("BENCH_RAW")
    return got / elapsed


async def b4_http(stack: Stack, rate: float, seconds: float) -> list[float]:
    """A constant FastAPI endpoint, same uvicorn settings as the api, at `rate` requests/s."""
    port = free_port()
    log = (stack.work / "b4.log").open("wb")
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.constant_api", str(port), stdout=log, stderr=log, cwd=ROOT
    )
    try:
        await wait_http(f"http://127.0.0.1:{port}/readyz")
        latencies: list[float] = []
        body = b'{"schema": "tollgate.spawn_request.v1", "subject": "user1"}'
        pool = await KeepAlivePool("127.0.0.1", port, 32, {}).open()  # as in P3
        try:

            async def one() -> None:
                status, _ = await pool.post("/v1/spawn-checks", body)
                if status != 200:
                    raise RuntimeError(f"B4's constant endpoint answered {status}")

            for _ in range(100):  # warm up
                await one()

            async def measured() -> None:
                await timed(one, latencies)

            await paced(rate, seconds, measured)
        finally:
            await pool.close()
        return latencies
    finally:
        proc.terminate()
        await proc.wait()
        log.close()


async def measure(
    stack: Stack, conn: asyncpg.Connection, nc: Client, fleet: Fleet, *, seconds: float,
    fetch_messages: int, http_rate: float,
) -> tuple[Baselines, list[Line]]:  # fmt: skip
    b = Baselines()
    b.copy_rows_per_s = await b1_copy(conn, seconds)
    b.publish_msgs_per_s = await b2_publish(nc, seconds)
    b.fetch_msgs_per_s = await b3_fetch(nc, fleet, fetch_messages)
    http = await b4_http(stack, http_rate, seconds)
    p50, p99 = latency_lines("B4", "constant FastAPI endpoint over HTTP", http,
                             note=f"{http_rate:g} requests/s")  # fmt: skip
    b.http_p99_ms = p99.value
    size = len(fleet.body(0, 1))
    lines = [
        Line("B1", "asyncpg binary COPY, ledger row shape", b.copy_rows_per_s, "rows/s",
             note=f"{COPY_BATCH} rows per transaction, one connection"),
        Line("B2", "JetStream publish, 200-byte messages", b.publish_msgs_per_s, "msgs/s",
             note="256 acks outstanding"),
        Line("B3", "JetStream pull fetch + ack, no processing", b.fetch_msgs_per_s, "msgs/s",
             note=f"{fetch_messages:,} prefilled P1-shaped messages of {size:,} bytes, "
                  "fetch batch 1000"),
        p50, p99,
    ]  # fmt: skip
    return b, lines
