"""Versioned migrations: applied once, under an advisory lock, whoever starts first."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from infra.db import MigrationError, known_migrations, migrate, pending_migrations


async def test_services_starting_together_apply_each_migration_exactly_once(
    database_url: str,
) -> None:
    conns = [await asyncpg.connect(database_url) for _ in range(4)]
    try:
        assert await pending_migrations(conns[0]) == [m.name for m in known_migrations()]
        applied = await asyncio.gather(*(migrate(c) for c in conns))
        # One connection did the work; the others found it done.
        assert sorted(len(a) for a in applied) == [0, 0, 0, len(known_migrations())]
        rows = await conns[0].fetch("SELECT version FROM schema_migrations ORDER BY version")
        assert [r["version"] for r in rows] == [m.version for m in known_migrations()]
        assert await pending_migrations(conns[0]) == []
    finally:
        for c in conns:
            await c.close()


async def test_a_changed_migration_file_is_refused(database_url: str) -> None:
    conn = await asyncpg.connect(database_url)
    try:
        await migrate(conn)
        await conn.execute("UPDATE schema_migrations SET checksum = 'x' WHERE version = 1")
        with pytest.raises(MigrationError, match="changed after it was applied"):
            await migrate(conn)
    finally:
        await conn.close()
