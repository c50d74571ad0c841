"""P5 and P6 over a big ledger: seeded through the ledger's own write path, in its own database."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import httpx
from rich.progress import Progress

from services.ledger.domain import Reading, SeriesKey
from services.ledger.store import apply_readings

from .stack import ADMIN, ROOT, Service, Stack, free_port, service_env, start_service, wait_http

METRICS = ("mem.alloc.byte_seconds", "cpu.used.seconds", "net.tx.wan.bytes", "log.bytes",
           "gpu.alloc.seconds")  # fmt: skip
SUBJECTS = 200
QUOTAS = """
groups:
  regular: [{members}]
quotas:
  - {{name: memory-30d, metric: mem.alloc.byte_seconds, limit: 60 GiB*h,
     window: {{rolling: 30d}}, applies_to: {{groups: [regular]}}, warn_at: [0.8]}}
  - {{name: cpu-month, metric: cpu.used.seconds, limit: 100 core*h,
     window: {{calendar: month, tz: UTC}}}}
  - {{name: egress-7d, metric: net.tx.wan.bytes, limit: 50 GB, window: {{rolling: 7d}}}}
  - {{name: logs-per-workload, metric: log.bytes, limit: 500 MB, window: {{lifetime: true}},
     per: workload, enforce: [terminate]}}
  - {{name: gpu-30d, metric: gpu.alloc.seconds, limit: 160 GPU*h, window: {{rolling: 30d}}}}
"""
PER_TRANSACTION = 50_000


async def seed(conn: asyncpg.Connection, events: int, progress: Progress) -> int:
    """`events` usage events over 30 days through `apply_readings` (fold, hash chain, rollups).

    2 000 series (200 subjects x 2 workloads x 5 metrics), each sampled evenly over the
    last 30 days; every sample grows its counter, so every reading is one usage event.
    """
    series = [
        SeriesKey(f"node{s % 50}", "bench", f"user{s}", f"user{s}-w{w}", m)
        for s in range(SUBJECTS) for w in range(2) for m in METRICS
    ]  # fmt: skip
    per_series = max(1, events // len(series))
    start = datetime.now(UTC) - timedelta(days=30)
    step = timedelta(days=30) / per_series
    per_tx = max(1, PER_TRANSACTION // len(series))
    task = progress.add_task(f"P5 seeding {len(series) * per_series:,} events", total=per_series)
    stream_seq = 0
    for s0 in range(0, per_series, per_tx):
        items = []
        for seq in range(s0 + 1, min(s0 + per_tx, per_series) + 1):
            at = start + step * seq
            byte_value = Decimal(seq * 1000)
            other = Decimal(seq * 60) + Decimal("0.25")
            for key in series:
                stream_seq += 1
                value = byte_value if key.metric.endswith(".bytes") else other
                items.append(Reading(key, seq, value, at, stream_seq=stream_seq))
        await apply_readings(conn, "bench-seed", items, stream_seq)
        progress.update(task, completed=min(s0 + per_tx, per_series))
    return int(await conn.fetchval("SELECT last_seq FROM ledger_head"))


async def p5_quota_queries(
    stack: Stack, database: str, requests: int, logs: Path
) -> tuple[list[float], Service]:
    """GET /v1/subjects/{s}/quotas, one at a time, against an api process on the big ledger."""
    config = stack.work / "p5-quotas.yaml"
    config.write_text(QUOTAS.format(members=", ".join(f"user{s}" for s in range(SUBJECTS))))
    port = free_port()
    api = await start_service("api", service_env(stack, database, config, port), logs / "p5")
    url = f"http://127.0.0.1:{port}"
    await wait_http(f"{url}/readyz", api)
    rng = random.Random(7)
    times: list[float] = []
    async with httpx.AsyncClient(base_url=url, headers={"Authorization": f"Bearer {ADMIN}"}) as h:
        for i in range(200 + requests):  # the first 200 warm the pool, planner and caches
            subject = f"user{rng.randrange(SUBJECTS)}"
            t0 = time.perf_counter()
            r = await h.get(f"/v1/subjects/{subject}/quotas")
            if i >= 200:
                times.append(time.perf_counter() - t0)
            if r.status_code != 200 or len(r.json()["quotas"]) != 5:
                raise RuntimeError(f"quota query answered {r.status_code}: {r.text[:300]}")
    return times, api


GROUP_BY = """SELECT count(*) FROM (
    SELECT subject, metric, date_trunc('hour', window_end, 'UTC'), workload, host,
           sum(delta), count(*)
    FROM usage_events GROUP BY 1, 2, 3, 4, 5) g"""


async def p6_rebuild(stack: Stack, conn: asyncpg.Connection, database: str) -> tuple[float, float]:
    """`tollgate replay --rebuild` (the command, as a user runs it) and a bare GROUP BY."""
    await conn.fetchval(GROUP_BY)  # warm the cache for both
    t0 = time.perf_counter()
    await conn.fetchval(GROUP_BY)
    group_by = time.perf_counter() - t0
    env = service_env(stack, database, stack.work / "p5-quotas.yaml", 0)
    t0 = time.perf_counter()
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tollgate.cli", "replay", "--rebuild", env=env, cwd=ROOT,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    rebuild = time.perf_counter() - t0
    if proc.returncode != 0 or b"identical" not in out:
        raise RuntimeError(f"tollgate replay --rebuild: {out.decode()[-500:]}")
    return rebuild, group_by
