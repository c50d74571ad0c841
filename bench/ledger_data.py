"""P5 and P6 over a big ledger: seeded through the ledger's own write path, in its own database."""

from __future__ import annotations

import asyncio
import random
import sys
import time
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import httpx
from rich.progress import Progress

from services.ledger.domain import Reading, SeriesKey
from services.ledger.replay import REBUILT, rebuild_rollups
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


async def vacuum_rollup(conn: asyncpg.Connection) -> float:
    """VACUUM (ANALYZE) the hourly rollup; the share of its pages all-visible before."""
    row = await conn.fetchrow(
        "SELECT relallvisible, relpages FROM pg_class WHERE oid = 'usage_hourly'::regclass"
    )
    await conn.execute("VACUUM (ANALYZE) usage_hourly")
    return float(row["relallvisible"]) / max(int(row["relpages"]), 1) if row else 0.0


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


# The baseline: the GROUP BY that computes the rollup (the rebuild's own, so the same key,
# gpu_model included, and the same exact sums), its sums consumed. Counting the rows of a
# GROUP BY alone is not a baseline: the planner drops aggregates nobody reads (EXPLAIN
# VERBOSE shows `NULL::numeric`), so it would only group, never sum.
GROUP_BY = f"SELECT count(total), count(events) FROM ({REBUILT}) g"
# What P6 was measured against before (issue 13): reported beside it for comparison.
GROUP_BY_UNSUMMED = """SELECT count(*) FROM (
    SELECT subject, metric, date_trunc('hour', window_end, 'UTC'), workload, host,
           sum(delta), count(*)
    FROM usage_events GROUP BY 1, 2, 3, 4, 5) g"""


@dataclass(frozen=True)
class Rebuild:
    command: float  # `tollgate replay --rebuild`, wall, interpreter start included
    in_process: float  # rebuild_rollups(apply=False) on an open connection
    group_by: float
    group_by_unsummed: float


async def _best_of(conn: asyncpg.Connection, sql: str, times: int = 2) -> float:
    best = float("inf")
    for _ in range(times):
        t0 = time.perf_counter()
        await conn.fetchrow(sql)
        best = min(best, time.perf_counter() - t0)
    return best


async def p6_rebuild(stack: Stack, conn: asyncpg.Connection, database: str) -> Rebuild:
    """`tollgate replay --rebuild` (the command, as a user runs it) and a bare GROUP BY."""
    await conn.execute("SET TimeZone = 'UTC'")  # as the rebuild's own transaction does
    await conn.fetchval(GROUP_BY)  # warm the cache for both
    group_by = await _best_of(conn, GROUP_BY)
    unsummed = await _best_of(conn, GROUP_BY_UNSUMMED)
    # As the command does: as many more connections as Postgres gives one parallel query.
    more = int(await conn.fetchval("SELECT current_setting('max_parallel_workers_per_gather')"))
    helpers = [await asyncpg.connect(stack.db_url(database)) for _ in range(more)]
    try:
        t0 = time.perf_counter()
        found = await rebuild_rollups(conn, apply=False, helpers=helpers)
        in_process = time.perf_counter() - t0
    finally:
        for h in helpers:
            await h.close()
    if not found.identical:
        raise RuntimeError(f"the seeded ledger's rollups differ from its events: {found}")
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
    return Rebuild(rebuild, in_process, group_by, unsummed)
