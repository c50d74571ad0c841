"""Nothing lost, nothing counted twice: the ledger killed, NATS killed, Postgres crashed."""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from decimal import Decimal
from pathlib import Path

import asyncpg
import nats
import nats.errors
import pytest
from nats.aio.client import Client

from contracts.samples import samples_stream, samples_subject
from infra.bus import connect, ensure_streams
from infra.db import connect_and_migrate
from services.ledger.app import FAILPOINT_EXIT_AFTER_COMMIT, LedgerService
from tests.conftest import unique, wait_until
from tests.integration.conftest import batch_json
from tests.servers import TestServers
from tollgate.embedded import EmbeddedNats, EmbeddedPostgres, free_port

METRICS = ("net.tx.wan.bytes", "cpu.used.seconds")


@dataclass
class Publisher:
    """One host publishing cumulative counters, with ~10% duplicates of both kinds."""

    host: str
    subjects: list[str]
    rng: random.Random
    seq: int = 0
    values: dict[tuple[str, str], Decimal] = field(default_factory=dict)
    duplicates: int = 0

    def next_batch(self) -> tuple[bytes, str]:
        self.seq += 1
        counters = []
        for s in self.subjects:
            for m in METRICS:
                step = Decimal(self.rng.randint(1, 5000))
                if m.startswith("cpu"):
                    step /= 1000
                self.values[(s, m)] = self.values.get((s, m), Decimal(0)) + step
                counters.append({"subject": s, "workload": "job", "metric": m,
                                 "value": str(self.values[(s, m)])})  # fmt: skip
        return batch_json(self.host, "e1", self.seq, counters), f"{self.host}:e1:{self.seq}"

    async def run(self, nc: Client, prefix: str, count: int, until: asyncio.Event | None = None):
        """Publish `count` batches, or keep going until `until` is set."""
        js = nc.jetstream()
        while (self.seq < count) if until is None else not until.is_set():
            body, msg_id = self.next_batch()
            await _publish_until_acked(js, samples_subject(self.host, prefix), body, msg_id)
            if self.rng.random() < 0.10:
                # Half with the same Msg-Id (JetStream drops it), half without (the ledger must).
                again = msg_id if self.rng.random() < 0.5 else None
                await _publish_until_acked(js, samples_subject(self.host, prefix), body, again)
                self.duplicates += 1
            await asyncio.sleep(self.rng.uniform(0, 0.02))


async def _publish_until_acked(js, subject: str, body: bytes, msg_id: str | None) -> None:
    headers = {"Nats-Msg-Id": msg_id} if msg_id else None
    while True:
        try:
            await js.publish(subject, body, headers=headers, timeout=2)
            return
        except (nats.errors.Error, OSError):
            await asyncio.sleep(0.1)  # NATS is down: an acked sample is what counts


async def ledger_totals(pool: asyncpg.Pool, subjects: list[str]) -> dict[tuple[str, str], Decimal]:
    rows = await pool.fetch(
        "SELECT subject, metric, sum(delta) AS t FROM usage_events "
        "WHERE subject = ANY($1) GROUP BY 1, 2",
        subjects,
    )
    return {(r["subject"], r["metric"]): r["t"] for r in rows}


def expected(publishers: list[Publisher]) -> dict[tuple[str, str], Decimal]:
    return {k: v for p in publishers for k, v in p.values.items()}


async def consumer_drained(nc: Client, prefix: str) -> bool:
    info = await nc.jetstream().consumer_info(samples_stream(prefix), "ledger")
    return info.num_pending == 0 and info.num_ack_pending == 0


def start_ledger(env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    out = open(log, "ab")  # noqa: SIM115 - the child writes to it
    return subprocess.Popen(
        [sys.executable, "-m", "tollgate.cli", "ledger"],
        env={**os.environ, **env}, stdout=out, stderr=subprocess.STDOUT,
    )  # fmt: skip


async def consuming(proc: subprocess.Popen[bytes], log: Path, lives: int) -> None:
    """Wait until the `lives`-th ledger has said it consumes (or has already exited)."""

    async def said() -> bool:
        text = log.read_bytes() if log.exists() else b""
        return text.count(b"ledger consuming") >= lives or proc.poll() is not None

    await wait_until(said, timeout=60, what="the ledger to start consuming")


async def test_ledger_killed_again_and_again_mid_ingest_counts_every_acked_sample_once(
    servers: TestServers, nc: Client, prefix: str, database_url: str, pool: asyncpg.Pool,
    streams: None, tmp_path: Path,
) -> None:  # fmt: skip
    rng = random.Random(os.environ.get("TOLLGATE_TEST_SEED", "crash"))
    publishers = [Publisher(unique("h"), [unique("u"), unique("u")], rng) for _ in range(3)]
    env = {
        "TOLLGATE_NATS_URL": servers.nats_url, "TOLLGATE_DATABASE_URL": database_url,
        "TOLLGATE_PREFIX": prefix, "TOLLGATE_LEDGER_BATCH": "50",
        "TOLLGATE_LEDGER_ACK_WAIT": "3", "TOLLGATE_DATA_DIR": str(tmp_path),
    }  # fmt: skip
    log = tmp_path / "ledger.log"
    done_killing = asyncio.Event()
    publishing = asyncio.gather(*(p.run(nc, prefix, 0, done_killing) for p in publishers))
    kills = between_commit_and_ack = 0
    while kills < 12:  # every life has work: the publishers run until the last kill
        failpoint = kills % 3 == 0  # every third life ends between a commit and its acks
        extra = {FAILPOINT_EXIT_AFTER_COMMIT: str(rng.randint(1, 4))} if failpoint else {}
        proc = start_ledger({**env, **extra}, log)
        # A life is counted from when the ledger consumes, not from exec: on a loaded
        # machine the interpreter's start alone can take longer than a whole life.
        await consuming(proc, log, lives=kills + 1)
        # Let it live a while (the publishers keep going), unless the failpoint ends it.
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(proc.wait, rng.uniform(1.0, 2.0))
        if proc.poll() is None:
            proc.send_signal(signal.SIGKILL)
        proc.wait()
        between_commit_and_ack += proc.returncode == 137
        kills += 1
    done_killing.set()
    await publishing
    assert between_commit_and_ack >= 1, "no life ended between a commit and its acks"
    assert sum(p.duplicates for p in publishers) > 10
    final = start_ledger(env, log)
    try:
        assert (await pool.fetchval("SELECT count(*) FROM usage_events")) > 0
        await wait_until(lambda: consumer_drained(nc, prefix), timeout=60, what="ledger to drain")
        subjects = [s for p in publishers for s in p.subjects]
        assert await ledger_totals(pool, subjects) == expected(publishers)
    finally:
        final.send_signal(signal.SIGINT)
        final.wait(30)


@pytest.fixture
async def own_servers(tmp_path: Path) -> AsyncIterator[tuple[EmbeddedNats, EmbeddedPostgres]]:
    """Servers of this test's own, on fixed ports, so they can be killed and restarted."""
    n = EmbeddedNats(tmp_path / "nats", port=free_port()).start()
    pg = EmbeddedPostgres(tmp_path / "pg", port=free_port()).start()
    try:
        yield n, pg
    finally:
        n.stop()
        pg.stop()


async def test_nats_killed_and_postgres_crashed_during_ingest_lose_nothing(
    own_servers: tuple[EmbeddedNats, EmbeddedPostgres],
) -> None:
    nats_server, postgres = own_servers
    prefix = "tollgate"
    nc = await connect(nats_server.url, "crash-test")
    await ensure_streams(nc.jetstream(), prefix, 120)
    pool = await connect_and_migrate(postgres.url(), max_size=4)
    service = LedgerService(await connect(nats_server.url, "ledger"), pool, prefix=prefix,
                            batch=50, fetch_timeout=0.2, ack_wait=3)  # fmt: skip
    stop = asyncio.Event()
    ledger = asyncio.create_task(service.run(stop))
    rng = random.Random(7)
    publishers = [Publisher(unique("h"), [unique("u")], rng) for _ in range(2)]
    publishing = asyncio.gather(*(p.run(nc, prefix, 200) for p in publishers))
    try:
        await wait_until(lambda: _some_events(pool), what="first events")
        nats_server.kill()  # kill -9: JetStream synced every acked message to disk
        await asyncio.sleep(0.5)  # an outage, not an observation: nothing to wait on
        nats_server.start()
        await wait_until(lambda: _some_events(pool, more_than=50), what="ingest after NATS")
        postgres.proc.send_signal(signal.SIGQUIT)  # pg_ctl stop -m immediate
        postgres.proc.wait(10)
        await asyncio.sleep(0.5)
        postgres.start()
        await publishing
        subjects = [s for p in publishers for s in p.subjects]

        async def exact() -> bool:
            try:
                return await ledger_totals(pool, subjects) == expected(publishers)
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
                return False

        await wait_until(exact, timeout=60, what="exact totals after both outages")
        await wait_until(lambda: consumer_drained(nc, prefix), what="nothing left pending")
    finally:
        stop.set()
        await asyncio.wait_for(ledger, 15)
        await service.nc.close()
        await nc.close()
        await pool.close()


async def _some_events(pool: asyncpg.Pool, more_than: int = 0) -> bool:
    try:
        return (await pool.fetchval("SELECT count(*) FROM usage_events")) > more_than
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError):
        return False
