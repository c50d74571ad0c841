"""Auditing: `tollgate replay` prints, verifies and rebuilds what the ledger committed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg

from services.ledger.domain import Reading, SeriesKey
from services.ledger.replay import rebuild_rollups
from services.ledger.store import apply_readings
from tests.conftest import unique


async def seed(pool: asyncpg.Pool, n: int = 30) -> str:
    """Usage over several hours, hosts and workloads, committed in several batches."""
    subject = unique("alice")
    start = datetime.now(UTC) - timedelta(hours=5)
    async with pool.acquire() as conn:
        for seq in range(1, n + 1):
            readings = [
                Reading(
                    SeriesKey(f"h{i % 2}", "e1", subject, f"w{i}", metric),
                    seq,
                    Decimal(seq * (i + 1)) / 4,
                    start + timedelta(minutes=10 * seq),
                )
                for i in range(3)
                for metric in ("cpu.used.seconds", "log.bytes")
                if not (metric == "log.bytes" and seq % 4)  # bytes stay whole numbers
            ]
            await apply_readings(conn, "seed", readings, seq)
    return subject


def tollgate(database_url: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "tollgate.cli", "replay", *args],
        env={
            **os.environ,
            "TOLLGATE_DATABASE_URL": database_url,
            "TOLLGATE_DATA_DIR": "/nonexistent",
        },
        capture_output=True,
        text=True,
        timeout=60,
    )


async def test_rebuilding_the_rollups_from_the_events_gives_identical_rows(
    pool: asyncpg.Pool,
) -> None:
    await seed(pool)
    before = await pool.fetch("SELECT * FROM usage_hourly ORDER BY 1, 2, 3, 4, 5")
    async with pool.acquire() as conn:
        result = await rebuild_rollups(conn)
    assert result.identical and result.rows == len(before) > 5
    assert await pool.fetch("SELECT * FROM usage_hourly ORDER BY 1, 2, 3, 4, 5") == before


async def test_a_damaged_projection_is_found_and_rebuilt(pool: asyncpg.Pool) -> None:
    await seed(pool)
    before = await pool.fetch("SELECT * FROM usage_hourly ORDER BY 1, 2, 3, 4, 5")
    await pool.execute("UPDATE usage_hourly SET total = total + 1 WHERE ctid IN "
                       "(SELECT ctid FROM usage_hourly LIMIT 2)")  # fmt: skip
    await pool.execute(
        "INSERT INTO usage_hourly VALUES ('ghost', 'log.bytes', now(), 'w', 'h', 5, 1)"
    )
    async with pool.acquire() as conn:
        check = await rebuild_rollups(conn, apply=False)
        assert (check.missing, check.extra) == (2, 3)
        await rebuild_rollups(conn)
        assert (await rebuild_rollups(conn, apply=False)).identical
    assert await pool.fetch("SELECT * FROM usage_hourly ORDER BY 1, 2, 3, 4, 5") == before


async def test_replay_prints_every_event_in_order_and_verifies_the_chain(
    pool: asyncpg.Pool, database_url: str
) -> None:
    await seed(pool, n=12)
    total = await pool.fetchval("SELECT count(*) FROM usage_events")
    dump = tollgate(database_url, "--after", "3")
    assert dump.returncode == 0, dump.stderr
    events = [json.loads(line) for line in dump.stdout.splitlines()]
    assert [e["seq"] for e in events] == list(range(4, total + 1))
    assert all(len(e["batch_hash"]) == 64 for e in events)
    verified = tollgate(database_url, "--verify")
    assert verified.returncode == 0, verified.stderr
    assert f"{total} events" in verified.stderr


async def test_replay_verify_names_the_first_tampered_batch(
    pool: asyncpg.Pool, database_url: str
) -> None:
    await seed(pool, n=12)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute("UPDATE usage_events SET delta = delta + 1 WHERE batch_id = 7")
    verified = tollgate(database_url, "--verify")
    assert verified.returncode == 1
    assert "batch 7 is the first that does not hold" in " ".join(verified.stderr.split())


async def test_a_deleted_event_is_a_gap_the_chain_reports(
    pool: asyncpg.Pool, database_url: str
) -> None:
    await seed(pool, n=6)
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute(
            "DELETE FROM usage_events WHERE seq = (SELECT first_seq FROM ledger_batches "
            "WHERE batch_id = 4)"
        )
    verified = tollgate(database_url, "--verify")
    assert verified.returncode == 1
    assert "batch 4" in verified.stderr


async def test_rebuild_check_finds_a_tampered_projection_row_and_changes_nothing(
    pool: asyncpg.Pool, database_url: str
) -> None:
    await seed(pool)
    before = await pool.fetch("SELECT * FROM usage_hourly ORDER BY 1, 2, 3, 4, 5")
    clean = tollgate(database_url, "--rebuild", "--check")
    assert clean.returncode == 0, clean.stderr
    assert f"{len(before)} rollup rows match" in " ".join(clean.stderr.split())
    # One millionth off: the smallest difference numeric(38, 6) can hold.
    await pool.execute(
        "UPDATE usage_hourly SET total = total + 0.000001 WHERE ctid = "
        "(SELECT ctid FROM usage_hourly ORDER BY hour DESC LIMIT 1)"
    )
    tampered = await pool.fetch("SELECT * FROM usage_hourly ORDER BY 1, 2, 3, 4, 5")
    check = tollgate(database_url, "--rebuild", "--check")
    assert check.returncode == 1
    said = " ".join(check.stderr.split())
    assert "would change" in said and "1 rows were missing or different and 1 rows" in said
    assert await pool.fetch("SELECT * FROM usage_hourly ORDER BY 1, 2, 3, 4, 5") == tampered
    rebuilt = tollgate(database_url, "--rebuild")
    assert rebuilt.returncode == 0, rebuilt.stderr
    assert await pool.fetch("SELECT * FROM usage_hourly ORDER BY 1, 2, 3, 4, 5") == before
    assert tollgate(database_url, "--rebuild", "--check").returncode == 0


async def test_every_kind_of_projection_damage_is_told_apart(pool: asyncpg.Pool) -> None:
    """A wrong count with the right total, a lost row, an empty row no event stands behind."""
    subject = await seed(pool)
    rows = await pool.fetch(
        "SELECT ctid FROM usage_hourly WHERE subject = $1 ORDER BY hour LIMIT 2", subject
    )
    await pool.execute("UPDATE usage_hourly SET events = events + 1 WHERE ctid = $1", rows[0][0])
    await pool.execute("DELETE FROM usage_hourly WHERE ctid = $1", rows[1][0])
    await pool.execute(
        "INSERT INTO usage_hourly VALUES ($1, 'log.bytes', now(), 'w0', 'h0', 0, 0)", subject
    )
    async with pool.acquire() as conn:
        check = await rebuild_rollups(conn, apply=False)
        # Missing: the miscounted row and the lost one; extra: the miscounted row and the
        # empty one (zero usage is still a row the events do not imply).
        assert (check.missing, check.extra) == (2, 2)
        await rebuild_rollups(conn)
        assert (await rebuild_rollups(conn, apply=False)).identical


async def test_the_comparison_split_over_several_connections_sees_every_key_once(
    pool: asyncpg.Pool,
) -> None:
    await seed(pool)
    await pool.execute(
        "UPDATE usage_hourly SET total = total + 1 WHERE ctid IN "
        "(SELECT ctid FROM usage_hourly ORDER BY workload, hour LIMIT 3)"
    )
    async with pool.acquire() as conn, pool.acquire() as a, pool.acquire() as b:
        alone = await rebuild_rollups(conn, apply=False)
        split = await rebuild_rollups(conn, apply=False, helpers=[a, b])
        assert split == alone and (alone.missing, alone.extra) == (3, 3)
        await rebuild_rollups(conn, helpers=[a])
        assert (await rebuild_rollups(conn, apply=False, helpers=[a, b])).identical
