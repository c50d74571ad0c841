"""Ledger ingest rate: series points per second from a prefilled stream to committed + acked.

Runs on embedded servers with the production durability settings (JetStream
sync_interval: always, Postgres synchronous_commit=on). Usage:

    .venv/bin/python bench/ledger_ingest.py [--hosts 50] [--series 100] [--rounds 40] [--batch 1000]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

from contracts.samples import samples_stream, samples_subject
from services.ledger.app import LedgerService
from tollgate.bus import connect, ensure_streams
from tollgate.db import connect_and_migrate
from tollgate.embedded import EmbeddedNats, EmbeddedPostgres


def batch(host: str, seq: int, series: int, at: datetime) -> bytes:
    return json.dumps({
        "schema": "tollgate.counter_batch.v1", "host": host, "epoch": "b", "seq": seq,
        "sampled_at": at.isoformat(),
        "counters": [
            {"subject": f"user{i % 20}", "workload": f"{host}-w{i // 4}",
             "metric": ("cpu.used.seconds", "net.tx.wan.bytes", "log.bytes",
                        "mem.used.byte_seconds")[i % 4],
             "value": seq * (i + 1) if i % 4 in (1, 2) else f"{seq * (i + 1)}.25"}
            for i in range(series)
        ],
    }).encode()  # fmt: skip


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="tollgate-bench-"))
    nats_server = EmbeddedNats(work / "nats").start()
    pg = EmbeddedPostgres(work / "pg").start()
    try:
        nc = await connect(nats_server.url, "bench")
        js = nc.jetstream()
        await ensure_streams(js, "tollgate", 1200)
        start = datetime.now(UTC) - timedelta(hours=2)
        t0 = time.perf_counter()
        pending = []
        for r in range(1, args.rounds + 1):
            for h in range(args.hosts):
                host = f"node{h}"
                body = batch(host, r, args.series, start + timedelta(seconds=10 * r))
                pending.append(js.publish(samples_subject(host), body,
                                          headers={"Nats-Msg-Id": f"{host}:b:{r}"}))  # fmt: skip
                if len(pending) >= 256:
                    await asyncio.gather(*pending)
                    pending.clear()
        await asyncio.gather(*pending)
        messages = args.rounds * args.hosts
        points = messages * args.series
        print(f"prefilled {messages} messages ({points} points) in {time.perf_counter() - t0:.1f}s")
        pool = await connect_and_migrate(pg.url(), max_size=4)
        ledger = LedgerService(nc, pool, prefix="tollgate", batch=args.batch, fetch_timeout=0.5)
        await ledger.subscribe()
        stop = asyncio.Event()
        t0 = time.perf_counter()
        task = asyncio.create_task(ledger.run(stop))
        while True:
            info = await js.consumer_info(samples_stream(), "ledger")
            if info.num_pending == 0 and info.num_ack_pending == 0:
                break
            await asyncio.sleep(0.05)
        elapsed = time.perf_counter() - t0
        stop.set()
        await task
        events = await pool.fetchval("SELECT count(*) FROM usage_events")
        print(f"ledger: {points} points ({events} events) in {elapsed:.2f}s = "
              f"{points / elapsed:,.0f} points/s, {messages / elapsed:,.0f} messages/s "
              f"(fetch batch {args.batch}, {args.series} series per message)")  # fmt: skip
        await pool.close()
        await nc.close()
    finally:
        nats_server.stop()
        pg.stop()


if __name__ == "__main__":
    p = argparse.ArgumentParser()
    p.add_argument("--hosts", type=int, default=50)
    p.add_argument("--series", type=int, default=100)
    p.add_argument("--rounds", type=int, default=40)
    p.add_argument("--batch", type=int, default=1000)
    asyncio.run(main(p.parse_args()))
