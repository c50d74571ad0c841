"""Fixtures that run real services against the session's servers."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal
from typing import Any

import asyncpg
import pytest
from nats.aio.client import Client

from infra.bus import ensure_streams
from services.ledger.app import LedgerService
from services.ledger.feed import UsageFeed

# Small, so an oversize message stays under any NATS server's own max_payload (1 MB default).
MAX_PAYLOAD = 64 * 1024
# Most tests build history by dating samples in the past, so their ledger trusts host clocks
# that far; the clock-skew tests (test_clock_skew.py) run ledgers with the real tolerance.
TRUSTED_CLOCKS = timedelta(days=3650)


@pytest.fixture
async def streams(nc: Client, prefix: str) -> None:
    await ensure_streams(nc.jetstream(), prefix, duplicate_window=120)


@pytest.fixture
async def ledger(
    nc: Client, pool: asyncpg.Pool, prefix: str, streams: None
) -> AsyncIterator[LedgerService]:
    """A ledger consuming this test's samples in the background."""
    service = LedgerService(
        nc, pool, prefix=prefix, batch=500, fetch_timeout=0.2, max_payload=MAX_PAYLOAD,
        max_clock_skew=TRUSTED_CLOCKS,
    )  # fmt: skip
    feed = UsageFeed(nc.jetstream(), pool, prefix)
    service.on_commit = feed.on_commit
    await service.subscribe()
    stop = asyncio.Event()
    tasks = [
        asyncio.create_task(service.run(stop)),
        asyncio.create_task(feed.run(stop)),
    ]
    try:
        yield service
    finally:
        stop.set()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.wait_for(task, 10)


def batch_json(
    host: str,
    epoch: str,
    seq: int,
    counters: list[dict[str, Any]],
    *,
    final: bool = False,
    sampled_at: str | None = None,
) -> bytes:
    """A counter batch written by hand, the way an integrator would: raw JSON."""
    return json.dumps(
        {
            "schema": "tollgate.counter_batch.v1",
            "host": host,
            "epoch": epoch,
            "seq": seq,
            "sampled_at": sampled_at or f"2026-11-22T10:{seq // 60 % 60:02d}:{seq % 60:02d}Z",
            "counters": counters,
            "final": final,
        }
    ).encode()


async def total(pool: asyncpg.Pool, subject: str, metric: str) -> Decimal:
    value = await pool.fetchval(
        "SELECT coalesce(sum(delta), 0) FROM usage_events WHERE subject = $1 AND metric = $2",
        subject,
        metric,
    )
    return Decimal(value)
