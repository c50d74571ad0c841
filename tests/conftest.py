"""Shared fixtures: real servers per session, a fresh database and subject prefix per test."""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import nats
import nats.errors
import pytest

from infra.db import connect_and_migrate
from tests.servers import TestServers, test_servers


@pytest.fixture(scope="session")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[TestServers]:
    with test_servers(tmp_path_factory.mktemp("servers")) as s:
        yield s


def unique(kind: str) -> str:
    """A name no other test uses: every test makes its own subjects, hosts and prefixes."""
    return f"{kind}{uuid.uuid4().hex[:10]}"


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit(parts._replace(path=f"/{name}"))


@contextlib.asynccontextmanager
async def fresh_database(servers: TestServers, kind: str = "tg_") -> AsyncIterator[str]:
    """A new, empty database on the session's server, dropped afterwards; yields its URL."""
    name = unique(kind)
    admin = await asyncpg.connect(servers.database_url)
    try:
        await admin.execute(f'CREATE DATABASE "{name}"')
    finally:
        await admin.close()
    try:
        yield _with_database(servers.database_url, name)
    finally:
        admin = await asyncpg.connect(servers.database_url)
        try:
            await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        finally:
            await admin.close()


@pytest.fixture
async def database_url(servers: TestServers) -> AsyncIterator[str]:
    """A new database for this test alone (migrated by the `pool` fixture)."""
    async with fresh_database(servers) as url:
        yield url


@pytest.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await connect_and_migrate(database_url)
    try:
        yield p
    finally:
        await p.close()


@pytest.fixture
def prefix() -> str:
    """A subject prefix (and so stream names) of this test's own."""
    return unique("t")


@pytest.fixture
async def nc(servers: TestServers, prefix: str) -> AsyncIterator[nats.aio.client.Client]:
    client = await nats.connect(servers.nats_url, max_reconnect_attempts=-1)
    try:
        yield client
    finally:
        js = client.jetstream()
        with contextlib.suppress(nats.errors.Error, OSError):
            for info in await js.streams_info():
                if info.config.name.startswith(prefix.upper() + "_"):
                    await js.delete_stream(info.config.name)
        await client.close()


async def wait_until(
    check: Callable[[], Awaitable[bool]], timeout: float = 30.0, what: str = "condition"
) -> None:
    """Poll an observable condition until it holds; fail with `what` after `timeout`."""
    deadline = time.monotonic() + timeout
    while True:
        if await check():
            return
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        await asyncio.sleep(0.05)
