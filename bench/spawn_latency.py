"""Spawn-check latency over NATS: p50/p99 of request -> decision against a running policy.

Starts embedded NATS and Postgres, fills the ledger with 30 days of hourly usage for
`--subjects` users (so every rolling window has its full 720 hour buckets to sum), runs
`tollgate policy` as its own process with a five-quota configuration, then measures from
this process: one request at a time, and `--concurrency` requests in flight. Usage:

    .venv/bin/python bench/spawn_latency.py [--subjects 200] [--requests 3000] [--concurrency 32]
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import httpx
import nats.errors
from rich.console import Console
from rich.progress import track
from rich.table import Table

from contracts.spawn import SpawnDecision, SpawnRequest, spawn_check_subject
from contracts.workloads import Resources
from services.ledger.domain import Reading, SeriesKey
from services.ledger.store import apply_readings
from tollgate.bus import connect, ensure_streams
from tollgate.db import connect_and_migrate
from tollgate.embedded import EmbeddedNats, EmbeddedPostgres, free_port

CONFIG = """
groups:
  regular: [{users}]
quotas:
  - {{name: memory-30d, metric: mem.alloc.byte_seconds, limit: 60000 GiB*h,
     window: {{rolling: 30d}}, applies_to: {{groups: [regular]}}, enforce: [spawn, terminate],
     warn_at: [0.8, 0.95]}}
  - {{name: cpu-30d, metric: cpu.alloc.seconds, limit: 100000 core*h, window: {{rolling: 30d}},
     enforce: [spawn]}}
  - {{name: gpu-week, metric: gpu.alloc.seconds, limit: 160 GPU*h, window: {{rolling: 7d}},
     enforce: [spawn]}}
  - {{name: egress-month, metric: net.tx.wan.bytes, limit: 10 TB,
     window: {{calendar: month, tz: Europe/Berlin}}, enforce: [spawn]}}
  - {{name: log-per-workload-hour, metric: log.bytes, limit: 50 MB,
     window: {{workload_hour: true}}, per: workload, enforce: [terminate]}}
"""
console = Console()


async def fill(pool: asyncpg.Pool, subjects: list[str]) -> int:
    """30 days of hourly cumulative samples per subject, on memory and egress."""
    now = datetime.now(UTC).replace(minute=0, second=0, microsecond=0)
    seq = 0
    for chunk in track(range(0, len(subjects), 10), description="filling the ledger"):
        readings = []
        for s in subjects[chunk : chunk + 10]:
            for metric, per_hour in (("mem.alloc.byte_seconds", 4 * 2**30 * 3600),
                                     ("net.tx.wan.bytes", 10**8)):  # fmt: skip
                key = SeriesKey("bench-node", "e1", s, f"{s}-server", metric)
                for h in range(720):
                    t = now - timedelta(hours=719 - h)
                    readings.append(Reading(key, h + 1, Decimal(per_hour * (h + 1)), t))
        async with pool.acquire() as conn:
            seq += 1
            await apply_readings(conn, "bench", readings, seq)
    return int(await pool.fetchval("SELECT count(*) FROM usage_hourly"))


async def server_side(port: int) -> str:
    """The policy's own histogram of spawn-check handling time, as p50/p99 bucket bounds."""
    async with httpx.AsyncClient() as client:
        text = (await client.get(f"http://127.0.0.1:{port}/metrics")).text
    buckets = []
    for line in text.splitlines():
        if line.startswith("tollgate_policy_spawn_check_seconds_bucket"):
            bound = line.split('le="', 1)[1].split('"', 1)[0]
            buckets.append((float(bound), float(line.rsplit(" ", 1)[1])))
    total = buckets[-1][1]

    def at(q: float) -> str:
        bound = next(b for b, n in buckets if n >= q * total)
        return f"<= {bound * 1000:g} ms"

    return f"p50 {at(0.5)}, p99 {at(0.99)} over {int(total):,} checks"


def percentiles(samples: list[float]) -> dict[str, float]:
    q = statistics.quantiles(samples, n=100, method="inclusive")
    return {"p50": q[49], "p90": q[89], "p99": q[98], "max": max(samples)}


async def measure(nc, prefix: str, subjects: list[str], n: int, concurrency: int) -> list[float]:
    subject = spawn_check_subject(prefix)
    rng = random.Random(7)
    latencies: list[float] = []

    async def one() -> None:
        request = SpawnRequest(
            subject=rng.choice(subjects), workload=f"w{rng.getrandbits(48)}",
            resources=Resources(cpus=Decimal(2), mem_bytes=4 * 2**30), expected_seconds=60,
        )  # fmt: skip
        body = request.to_json()
        t0 = time.perf_counter()
        reply = await nc.request(subject, body, timeout=10)
        latencies.append(time.perf_counter() - t0)
        SpawnDecision.model_validate_json(reply.data)

    async def worker(count: int) -> None:
        for _ in range(count):
            await one()

    per = n // concurrency
    await asyncio.gather(*(worker(per) for _ in range(concurrency)))
    return latencies


async def main(args: argparse.Namespace) -> None:
    work = Path(tempfile.mkdtemp(prefix="tollgate-spawn-bench-"))
    nats_server = EmbeddedNats(work / "nats").start()
    pg = EmbeddedPostgres(work / "pg").start()
    policy = None
    try:
        nc = await connect(nats_server.url, "bench")
        await ensure_streams(nc.jetstream(), "tollgate", 1200)
        pool = await connect_and_migrate(pg.url(), max_size=4)
        subjects = [f"user{i}" for i in range(args.subjects)]
        rows = await fill(pool, subjects)
        metrics_port = free_port()
        config = work / "quotas.yaml"
        config.write_text(CONFIG.format(users=", ".join(subjects)))
        env = {
            **os.environ,
            "TOLLGATE_NATS_URL": nats_server.url,
            "TOLLGATE_DATABASE_URL": pg.url(),
            "TOLLGATE_CONFIG": str(config),
            "TOLLGATE_LOG_LEVEL": "WARNING",
            "TOLLGATE_DATA_DIR": str(work / "data"),
            "TOLLGATE_METRICS_PORT": str(metrics_port),
        }
        log = (work / "policy.log").open("wb")
        policy = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tollgate.cli", "policy", env=env, stdout=log, stderr=log
        )
        t0 = time.perf_counter()
        while True:
            try:
                reply = await nc.request(
                    spawn_check_subject(), SpawnRequest(subject="probe").to_json(), timeout=2
                )
                if not SpawnDecision.model_validate_json(reply.data).fail_open:
                    break
            except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
                pass
            await asyncio.sleep(0.1)
        console.print(f"policy loaded {rows:,} hourly rollup rows; answering after "
                      f"{time.perf_counter() - t0:.1f}s")  # fmt: skip
        await measure(nc, "tollgate", subjects, 300, 1)  # warm up
        table = Table("in flight", "requests", "p50 ms", "p90 ms", "p99 ms", "max ms", "checks/s")
        for concurrency in (1, args.concurrency):
            t0 = time.perf_counter()
            lat = await measure(nc, "tollgate", subjects, args.requests, concurrency)
            rate = len(lat) / (time.perf_counter() - t0)
            p = percentiles(lat)
            table.add_row(str(concurrency), str(len(lat)),
                          *(f"{p[k] * 1000:.2f}" for k in ("p50", "p90", "p99", "max")),
                          f"{rate:,.0f}")  # fmt: skip
        console.print(table)
        console.print(
            f"inside the policy (arrival to reply sent): {await server_side(metrics_port)}"
        )
        stored = await pool.fetchval("SELECT count(*) FROM policy_decisions")
        console.print(f"decisions stored by the policy: {stored:,} (written behind the replies)")
        await nc.close()
        await pool.close()
    finally:
        if policy is not None:
            policy.terminate()
            await policy.wait()
        nats_server.stop()
        pg.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--subjects", type=int, default=200)
    parser.add_argument("--requests", type=int, default=3000)
    parser.add_argument("--concurrency", type=int, default=32)
    asyncio.run(main(parser.parse_args()))
