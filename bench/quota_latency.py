"""Latency of `GET /v1/subjects/{s}/quotas` with a million usage events in the ledger.

Seeds the ledger through its own write path (`apply_readings`, the fold, hash chain and
rollups) in big batches on embedded servers, then serves the real API over HTTP on a
loopback port and asks for random subjects' quotas one request at a time. Usage:

    .venv/bin/python bench/quota_latency.py [--events 1000000] [--subjects 200] [--requests 2000]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import httpx
from rich.console import Console
from rich.progress import Progress

from services.ledger.domain import Reading, SeriesKey
from services.ledger.store import apply_readings
from tollgate.db import connect_and_migrate
from tollgate.embedded import EmbeddedNats, EmbeddedPostgres
from tollgate.settings import Settings

ADMIN = "bench-admin-token"
METRICS = ("mem.alloc.byte_seconds", "cpu.used.seconds", "net.tx.wan.bytes", "log.bytes",
           "gpu.alloc.seconds")  # fmt: skip
QUOTAS = """
groups:
  regular: [{members}]
quotas:
  - name: memory-30d
    metric: mem.alloc.byte_seconds
    limit: 60 GiB*h
    window: {{rolling: 30d}}
    applies_to: {{groups: [regular]}}
    warn_at: [0.8]
  - name: cpu-month
    metric: cpu.used.seconds
    limit: 100 core*h
    window: {{calendar: month, tz: UTC}}
  - name: egress-7d
    metric: net.tx.wan.bytes
    limit: 50 GB
    window: {{rolling: 7d}}
  - name: logs-per-workload
    metric: log.bytes
    limit: 500 MB
    window: {{lifetime: true}}
    per: workload
    enforce: [terminate]
  - name: gpu-30d
    metric: gpu.alloc.seconds
    limit: 160 GPU*h
    window: {{rolling: 30d}}
"""
BATCH = 50_000
CHUNK = 500  # series per transaction, so each transaction folds BATCH readings


async def seed(url: str, events: int, subjects: int, console: Console) -> None:
    """`events` usage events: every series gets the same number of samples over 30 days."""
    pool = await connect_and_migrate(url, max_size=2)
    series = [
        SeriesKey(f"node{s % 50}", "bench", f"user{s}", f"user{s}-w{w}", m)
        for s in range(subjects) for w in range(2) for m in METRICS
    ]  # fmt: skip
    per_series = events // len(series)
    start = datetime.now(UTC) - timedelta(days=30)
    step = timedelta(days=30) / per_series
    samples_per_tx = max(1, BATCH // CHUNK)
    done, stream_seq = 0, 0
    with Progress(console=console, transient=True) as progress:
        task = progress.add_task("seeding the ledger", total=len(series) * per_series)
        async with pool.acquire() as conn:
            for first in range(0, len(series), CHUNK):
                chunk = series[first : first + CHUNK]
                for s0 in range(0, per_series, samples_per_tx):
                    items = []
                    for seq in range(s0 + 1, min(s0 + samples_per_tx, per_series) + 1):
                        at = start + step * seq
                        for key in chunk:
                            stream_seq += 1
                            value = Decimal(seq * 1000) if key.metric.endswith(".bytes") else (
                                Decimal(seq * 60) + Decimal("0.25"))  # fmt: skip
                            items.append(Reading(key, seq, value, at, stream_seq=stream_seq))
                    await apply_readings(conn, "bench", items, stream_seq)
                    done += len(items)
                    progress.update(task, completed=done)
        counts = await conn_counts(pool)
    await pool.close()
    console.print(f"ledger: {counts[0]:,} usage events, {counts[1]:,} rollup rows, "
                  f"{len(series):,} series of {subjects} subjects")  # fmt: skip


async def conn_counts(pool) -> tuple[int, int]:  # type: ignore[no-untyped-def]
    events = await pool.fetchval("SELECT last_seq FROM ledger_head")
    rollups = await pool.fetchval("SELECT count(*) FROM usage_hourly")
    return int(events), int(rollups)


async def measure(settings: Settings, subjects: int, requests: int, console: Console) -> None:
    from services.api.bootstrap import serve

    stop = asyncio.Event()
    listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    server = asyncio.create_task(serve(settings, stop, on_listening=listening.set_result))
    url = await asyncio.wait_for(listening, 60)
    rng = random.Random(7)
    headers = {"Authorization": f"Bearer {ADMIN}"}
    try:
        async with httpx.AsyncClient(base_url=url, headers=headers) as http:
            for _ in range(200):  # warm the pool, the planner and the caches
                r = await http.get(f"/v1/subjects/user{rng.randrange(subjects)}/quotas")
                r.raise_for_status()
            times = []
            with Progress(console=console, transient=True) as progress:
                task = progress.add_task("GET /v1/subjects/{s}/quotas", total=requests)
                for _ in range(requests):
                    subject = f"user{rng.randrange(subjects)}"
                    t0 = time.perf_counter()
                    r = await http.get(f"/v1/subjects/{subject}/quotas")
                    times.append(time.perf_counter() - t0)
                    assert r.status_code == 200 and len(r.json()["quotas"]) == 5, r.text
                    progress.advance(task)
    finally:
        stop.set()
        await server
    times.sort()
    ms = [t * 1000 for t in times]
    console.print(
        f"GET /v1/subjects/{{s}}/quotas over HTTP, {requests} sequential requests, 5 quotas each: "
        f"p50 {statistics.median(ms):.2f} ms, p90 {ms[int(0.90 * len(ms))]:.2f} ms, "
        f"p99 {ms[int(0.99 * len(ms))]:.2f} ms, max {ms[-1]:.2f} ms"
    )


async def main(args: argparse.Namespace) -> None:
    console = Console()
    work = Path(tempfile.mkdtemp(prefix="tollgate-bench-"))
    nats_server = EmbeddedNats(work / "nats").start()
    pg = EmbeddedPostgres(work / "pg").start()
    try:
        t0 = time.perf_counter()
        await seed(pg.url(), args.events, args.subjects, console)
        console.print(f"seeded in {time.perf_counter() - t0:.0f} s")
        config = work / "quotas.yaml"
        members = ", ".join(f"user{s}" for s in range(args.subjects))
        config.write_text(QUOTAS.format(members=members))
        os.environ["TOLLGATE_API_RATE_PER_SECOND"] = "0"  # measure the query, not the limiter
        settings = Settings(
            data_dir=work, nats_url=nats_server.url, database_url=pg.url(), api_port=0,
            admin_token=ADMIN, token_secret="bench", config=config,
        )  # fmt: skip
        await measure(settings, args.subjects, args.requests, console)
    finally:
        nats_server.stop()
        pg.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--subjects", type=int, default=200)
    parser.add_argument("--requests", type=int, default=2000)
    asyncio.run(main(parser.parse_args()))
