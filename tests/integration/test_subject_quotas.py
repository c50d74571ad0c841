"""A subject's quota standings summed by Postgres equal the hour-by-hour sums they replaced.

`subject_quotas` (the API's quota page, `tollgate quota`) asks for every quota's total in
one query and reads hourly buckets only for an exceeded rolling quota's `retry_at` and for
forecasts. The
reference below is the hour-by-hour evaluation over every rollup row.
"""

from __future__ import annotations

import random
from collections import defaultdict
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg

from services.policy.config import parse_config
from services.policy.domain import effective_quotas, status, window_start
from services.policy.forecast import lookback_start, projected_exhaustion
from services.policy.quotas import subject_quotas

NOW = datetime(2026, 11, 20, 12, 30, tzinfo=UTC)
H = timedelta(hours=1)
QUOTAS = """
groups:
  team: [ann, ben, cat]
quotas:
  - {name: mem-7d, metric: mem.alloc.byte_seconds, limit: 2 GiB*h, window: {rolling: 7d}}
  - {name: cpu-month, metric: cpu.used.seconds, limit: 3 core*h,
     window: {calendar: month, tz: UTC}}
  - {name: logs-per-workload, metric: log.bytes, limit: 3 MB, window: {rolling: 2d},
     per: workload, enforce: [terminate]}
  - {name: team-egress, metric: net.tx.wan.bytes, limit: 8 MB, window: {rolling: 3d},
     applies_to: {groups: [team]}, per: group}
  - {name: gpu-ever, metric: gpu.alloc.seconds, limit: 5 GPU*h, window: {lifetime: true}}
"""
METRICS = {
    "mem.alloc.byte_seconds": 600 * 2**30,
    "cpu.used.seconds": 2000,
    "log.bytes": 900_000,
    "net.tx.wan.bytes": 2_000_000,
    "gpu.alloc.seconds": 4000,
}


async def reference(conn: asyncpg.Connection, config_text: str, subject: str) -> list[object]:
    """Every rollup row to Python, summed hour by hour (the evaluation before the change)."""
    config = parse_config(config_text)
    groups = config.groups_of(subject, ())
    out = []
    for q in effective_quotas(config, subject, groups):
        subjects = [subject]
        if q.per == "group":
            members = {m for r in q.rules for g in r.applies_to.groups for m in config.groups[g]}
            subjects = sorted(members | {subject})
        rows = await conn.fetch(
            """SELECT workload, hour, sum(total) AS total FROM usage_hourly
               WHERE subject = ANY($1::text[]) AND metric = $2
                 AND ($3::timestamptz IS NULL OR hour >= $3) GROUP BY workload, hour""",
            subjects, q.metric, window_start(q.window, NOW),
        )  # fmt: skip
        per: dict[str, dict[datetime, Decimal]] = defaultdict(lambda: defaultdict(Decimal))
        for r in rows:
            per[r["workload"] if q.per == "workload" else ""][r["hour"]] += r["total"]
        most = max(per.values(), key=lambda b: sum(b.values(), Decimal(0))) if per else {}
        buckets = dict(most)
        used = sum(buckets.values(), Decimal(0))
        projected, start = None, lookback_start(q.window, NOW)
        if q.per != "workload" and start is not None:
            lookback = [(t, a) for t, a in buckets.items() if start <= t <= NOW and a]
            recent = sum((a for _, a in lookback), Decimal(0))
            first = min((t for t, _ in lookback), default=None)
            hours = sorted(buckets.items())
            projected = projected_exhaustion(
                q.window, q.limit, used, recent, NOW, hours.copy, first
            )
        out.append(status(q, used, sorted(buckets.items()), NOW, projected=projected))
    return out


async def test_standings_from_summed_totals_equal_the_hourly_evaluation(
    pool: asyncpg.Pool,
) -> None:
    rng = random.Random(20261122)
    rows = {}
    for subject in ("ann", "ben", "cat", "dan"):
        for w in range(rng.randint(1, 4)):
            for metric, scale in METRICS.items():
                for _ in range(rng.randint(0, 30)):
                    hour = (NOW - rng.randint(0, 24 * 45) * H).replace(minute=0)
                    key = (subject, metric, hour, f"{subject}-w{w}", f"node{rng.randint(0, 2)}")
                    rows[key] = Decimal(rng.randint(0, scale)) + Decimal("0.25")
    async with pool.acquire() as conn:
        await conn.executemany(
            "INSERT INTO usage_hourly VALUES ($1, $2, $3, $4, $5, $6, 1)",
            [(*k, v) for k, v in rows.items()],
        )
        config = parse_config(QUOTAS)
        states, projected = set(), set()
        for subject in ("ann", "ben", "cat", "dan", "nobody"):
            found = await subject_quotas(pool, config, subject, now=NOW)
            expected = await reference(conn, QUOTAS, subject)
            assert found.statuses == expected, subject
            states.update((s.state, s.retry_at is not None) for s in found.statuses)
            projected.update(s.projected_exhaustion_at is not None for s in found.statuses)
    # The data reaches every branch: fine, warned and exceeded, with and without retry_at.
    assert {("ok", False), ("exceeded", True)} <= states
    assert projected == {True, False}  # and forecasts, some inside their windows
