"""Shared helpers of the API, report and web-page tests (no tests of its own).

`seed_scene` writes a month of usage for two users through the ledger's own write path,
plus what the policy would have recorded for them (decisions, workloads), so every
endpoint and the page have something real to show and something that must not leak.
`live_api` serves the real app over HTTP on a loopback port.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg

from infra.db import connect_and_migrate
from infra.settings import Settings
from services.api.bootstrap import serve
from services.ledger.domain import Reading, SeriesKey
from services.ledger.store import apply_readings
from tests.conftest import fresh_database
from tests.servers import TestServers

SECRET = "api-test-secret"
ADMIN = "api-test-admin-token"
GIB_H = Decimal(2**30 * 3600)
CORE_H = Decimal(3600)
GB = Decimal(10**9)
DAY = timedelta(days=1)
H = timedelta(hours=1)
MEM, CPU, NET, LOG = "mem.alloc.byte_seconds", "cpu.used.seconds", "net.tx.wan.bytes", "log.bytes"
QUOTAS = """
groups:
  regular: [alice, bob]
quotas:
  - name: memory-30d
    metric: mem.alloc.byte_seconds
    limit: 60 GiB*h
    window: {rolling: 30d}
    applies_to: {groups: [regular]}
    enforce: [spawn, terminate]
    warn_at: [0.8, 0.95]
  - name: egress-7d
    metric: net.tx.wan.bytes
    limit: 5 GB
    window: {rolling: 7d}
    enforce: [spawn]
    warn_at: [0.8]
  - name: cpu-month
    metric: cpu.used.seconds
    limit: 200 core*h
    window: {calendar: month, tz: UTC}
    warn_at: [0.9]
failure_mode: open
help: Ask your admin to join the power group.
"""
# Alice's memory per day, days ago -> GiB·h (50 in all: 83% of 60, a warning).
ALICE_MEMORY = {25: 4, 22: 6, 20: 3, 17: 5, 14: 2, 12: 7, 9: 4, 7: 3, 5: 6, 3: 4, 2: 3, 1: 3}
# Alice's egress per day, days ago -> GB (5.8 of 5: exceeded).
ALICE_EGRESS = {6: Decimal("0.9"), 4: Decimal("1.6"), 3: Decimal("0.4"), 1: Decimal("2.9")}
# Bob's numbers are distinctive so a body that leaks them is easy to spot.
BOB_MEMORY_GIB_H = 987
BOB_EGRESS_BYTES = 4_242_424_242


@dataclass
class Scene:
    """What was seeded, and the numbers each reader should get back."""

    now: datetime
    alice: str = "alice"
    bob: str = "bob"
    workload: str = "train-42"
    bob_workload: str = "bob-secret-job"
    # (subject, metric) -> exact base-unit total, per UTC hour bucket
    hourly: dict[tuple[str, str], dict[datetime, Decimal]] = field(
        default_factory=lambda: defaultdict(lambda: defaultdict(Decimal))
    )

    def total(self, subject: str, metric: str, since: datetime | None = None) -> Decimal:
        buckets = self.hourly.get((subject, metric), {})
        return sum((v for h, v in buckets.items() if since is None or h >= since), Decimal(0))

    def totals(self) -> dict[tuple[str, str], Decimal]:
        return {k: self.total(*k) for k in self.hourly}


class _Readings:
    """Cumulative readings per series, applied in one ledger transaction."""

    def __init__(self, scene: Scene) -> None:
        self.scene = scene
        self.values: dict[SeriesKey, tuple[int, Decimal]] = {}
        self.items: list[Reading] = []

    def add(
        self, host: str, subject: str, workload: str, metric: str, delta: Decimal, at: datetime
    ) -> None:
        key = SeriesKey(host, "e1", subject, workload, metric)
        seq, value = self.values.get(key, (0, Decimal(0)))
        self.values[key] = (seq + 1, value + delta)
        self.items.append(Reading(key, seq + 1, value + delta, at, stream_seq=len(self.items) + 1))
        hour = at.replace(minute=0, second=0, microsecond=0)
        self.scene.hourly[(subject, metric)][hour] += delta

    async def apply(self, pool: asyncpg.Pool) -> None:
        async with pool.acquire() as conn:
            await apply_readings(conn, "test-api", self.items, len(self.items))


async def seed_scene(pool: asyncpg.Pool, now: datetime | None = None) -> Scene:
    """A month of alice's usage (warning, exceeded, ok), bob's, and the policy's records."""
    now = (now or datetime.now(UTC)).replace(second=0, microsecond=0)
    scene = Scene(now)
    r = _Readings(scene)
    day = now.replace(hour=14, minute=10) - DAY  # yesterday afternoon, then back from there
    for ago, gib_h in sorted(ALICE_MEMORY.items(), reverse=True):
        r.add("node-3", "alice", "jupyter-alice", MEM, gib_h * GIB_H, day - (ago - 1) * DAY)
    for ago, gb in sorted(ALICE_EGRESS.items(), reverse=True):
        r.add("node-3", "alice", scene.workload, NET, gb * GB, day - (ago - 1) * DAY + H)
    for ago in range(28, 0, -1):
        at = day - (ago - 1) * DAY - 3 * H
        r.add("node-3", "alice", "jupyter-alice", CPU, Decimal(ago % 5 + 1) * CORE_H / 2, at)
        r.add("node-3", "alice", "jupyter-alice", LOG, Decimal(1_500_000 + 37_000 * ago), at)
    r.add("node-9", "bob", scene.bob_workload, MEM, BOB_MEMORY_GIB_H * GIB_H, now - 2 * DAY)
    r.add("node-9", "bob", scene.bob_workload, NET, Decimal(BOB_EGRESS_BYTES), now - 2 * DAY)
    await r.apply(pool)
    await _policy_records(pool, scene)
    return scene


async def _policy_records(pool: asyncpg.Pool, scene: Scene) -> None:
    """Rows as the policy writes them: decisions with explanations, and workloads it saw."""
    now = scene.now
    decisions = [
        ("spawn-denied-1", "spawn", now - 2 * H, "alice", None, False, "quota_exceeded",
         "You have used 5.8 of 5 GB (egress-7d) in the last 7 days; quota returns from "
         f"{(now + 2 * DAY):%Y-%m-%d} 15:00 UTC. Ask your admin to join the power group.",
         "egress-7d"),
        ("term-train-42", "terminate", now - 20 * H, "alice", scene.workload, None,
         "data_transfer_quota_exceeded",
         "Terminate train-42 on node-3: alice used 5.1 of 5 GB (egress-7d) in the last 7 days; "
         "data_transfer_quota_exceeded, SIGKILL after 30 s of grace.", "egress-7d"),
        ("warning-1", "warning", now - 3 * DAY, "alice", None, None, "warning",
         "alice passed 80% of a quota: used 48 of 60 GiB·h (memory-30d) in the last 30 days.",
         "memory-30d"),
        ("spawn-allowed-1", "spawn", now - 5 * H, "alice", None, True, "within_quota",
         "Within every quota.", None),
        ("term-bob", "terminate", now - 1 * H, "bob", scene.bob_workload, None,
         "compute_quota_exceeded", "Terminate bob-secret-job on node-9: bob used 987 GiB·h.",
         "memory-30d"),
    ]  # fmt: skip
    await pool.executemany(
        """INSERT INTO policy_decisions (decision_id, kind, decided_at, subject, workload,
               allowed, reason, message, quota, policy_version, as_of_seq)
           VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, 'test', 1)""",
        decisions,
    )
    workloads = [
        ("jupyter-alice", "alice", "node-3", now - 26 * DAY, None, None, None),
        (scene.workload, "alice", "node-3", now - 6 * DAY, now - 20 * H + timedelta(seconds=30),
         143, "data_transfer_quota_exceeded"),
        ("etl-7", "alice", "node-4", now - 9 * DAY, now - 9 * DAY + 2 * H, 0, None),
        (scene.bob_workload, "bob", "node-9", now - 2 * DAY, None, None, None),
    ]  # fmt: skip
    await pool.executemany(
        """INSERT INTO policy_workloads (workload, subject, host, resources, started_at,
               stopped_at, exit_status, stop_reason)
           VALUES ($1, $2, $3, $4::jsonb, $5, $6, $7, $8)""",
        [(w, s, h, json.dumps({"cpus": "2", "mem_bytes": 4 * 2**30}), *rest)
         for w, s, h, *rest in workloads],
    )  # fmt: skip


@dataclass
class World:
    """A database seeded with the scene, shared by the tests of one module (read-only)."""

    scene: Scene
    pool: asyncpg.Pool
    url: str


@contextlib.asynccontextmanager
async def seeded_world(servers: TestServers) -> AsyncIterator[World]:
    """A new database with the scene in it; dropped afterwards."""
    async with fresh_database(servers, "tg_api_") as url:
        pool = await connect_and_migrate(url)
        try:
            yield World(await seed_scene(pool), pool, url)
        finally:
            await pool.close()


@contextlib.asynccontextmanager
async def live_api(settings: Settings) -> AsyncIterator[str]:
    """The API served over HTTP on a free loopback port; yields its base URL."""
    stop = asyncio.Event()
    listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(settings, stop, on_listening=listening.set_result))
    try:
        yield await asyncio.wait_for(asyncio.shield(listening), 20)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)


def api_settings(tmp_path: Path, **fields: object) -> Settings:
    config = tmp_path / "quotas.yaml"
    config.write_text(QUOTAS)
    return Settings(
        data_dir=tmp_path, admin_token=ADMIN, token_secret=SECRET, config=config, api_port=0,
        **fields,  # type: ignore[arg-type]
    )  # fmt: skip
