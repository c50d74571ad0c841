"""Postgres connections and versioned schema migrations, applied once under an advisory lock."""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from importlib import resources

import asyncpg

log = logging.getLogger("infra.db")

# Any service may start first; whichever takes this lock applies what is missing.
MIGRATION_LOCK = 0x70_11_6A_7E


@dataclass(frozen=True)
class Migration:
    version: int
    name: str
    sql: str

    @property
    def checksum(self) -> str:
        return hashlib.sha256(self.sql.encode()).hexdigest()


class MigrationError(RuntimeError):
    """The database's schema history does not match this release's migration files."""


def known_migrations() -> list[Migration]:
    """The SQL files shipped in infra/migrations, in version order."""
    found = []
    for entry in resources.files("infra.migrations").iterdir():
        if entry.name.endswith(".sql"):
            version = int(entry.name.split("_", 1)[0])
            found.append(Migration(version, entry.name, entry.read_text()))
    return sorted(found, key=lambda m: m.version)


async def migrate(conn: asyncpg.Connection) -> list[str]:
    """Apply missing migrations; return the names applied by this call."""
    applied_now: list[str] = []
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATION_LOCK)
    try:
        await conn.execute(
            """CREATE TABLE IF NOT EXISTS schema_migrations (
                   version integer PRIMARY KEY, name text NOT NULL,
                   checksum text NOT NULL, applied_at timestamptz NOT NULL DEFAULT now())"""
        )
        done = {
            r["version"]: r
            for r in await conn.fetch("SELECT version, name, checksum FROM schema_migrations")
        }
        for m in known_migrations():
            if m.version in done:
                if done[m.version]["checksum"] != m.checksum:
                    raise MigrationError(
                        f"migration {m.name} was changed after it was applied; "
                        "ship schema changes as a new migration file instead"
                    )
                continue
            async with conn.transaction():
                await conn.execute(m.sql)
                await conn.execute(
                    "INSERT INTO schema_migrations (version, name, checksum) VALUES ($1,$2,$3)",
                    m.version,
                    m.name,
                    m.checksum,
                )
            log.info("applied migration %s", m.name)
            applied_now.append(m.name)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATION_LOCK)
    return applied_now


async def pending_migrations(conn: asyncpg.Connection) -> list[str]:
    """Migrations this release has that the database lacks (empty when ready)."""
    exists = await conn.fetchval("SELECT to_regclass('schema_migrations') IS NOT NULL")
    done: set[int] = set()
    if exists:
        done = {r["version"] for r in await conn.fetch("SELECT version FROM schema_migrations")}
    return [m.name for m in known_migrations() if m.version not in done]


async def create_pool(url: str, *, min_size: int = 1, max_size: int = 10) -> asyncpg.Pool:
    """A pool whose connections return numerics as Decimal and speak UTC."""
    pool = await asyncpg.create_pool(
        url, min_size=min_size, max_size=max_size, server_settings={"timezone": "UTC"}
    )
    assert pool is not None
    return pool


async def close_pool(pool: asyncpg.Pool, timeout: float = 2.0) -> None:
    """Close a pool at shutdown whatever state Postgres is in; never hangs, never raises.

    A graceful close waits for the server to answer; a server that is down or frozen gets
    its connections cut instead (what a crash would do: open transactions roll back).
    """
    try:
        await asyncio.wait_for(pool.close(), timeout)
    except (
        TimeoutError, OSError, asyncpg.PostgresError, asyncpg.InterfaceError,
        asyncpg.InternalClientError,
    ) as exc:  # fmt: skip
        log.debug("closing the Postgres pool: %s", exc)
        pool.terminate()
    except asyncio.CancelledError:
        pool.terminate()
        raise


async def connect_and_migrate(url: str, *, max_size: int = 10) -> asyncpg.Pool:
    """Pool plus schema up to date: what every service does at start."""
    pool = await create_pool(url, max_size=max_size)
    async with pool.acquire() as conn:
        await migrate(conn)
    return pool
