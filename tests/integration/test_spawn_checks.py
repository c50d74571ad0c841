"""Spawn checks over real NATS request/reply, answered from real ledger rollups."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest
from faststream.nats import NatsBroker
from nats.aio.client import Client

from contracts.spawn import SpawnDecision, SpawnRequest, spawn_check_subject
from services.ledger.domain import Reading, SeriesKey
from services.ledger.store import apply_readings
from services.policy.app import build_broker, start_broker
from services.policy.handlers import SpawnChecker
from services.policy.source import ConfigSource
from tests.conftest import unique

GIB_HOUR = Decimal(2**30 * 3600)
CONFIG = """
groups:
  regular: [{alice}]
  power: []
quotas:
  - name: memory-30d
    metric: mem.alloc.byte_seconds
    limit: 60 GiB*h
    window: {{rolling: 30d}}
    applies_to: {{groups: [regular]}}
    enforce: [spawn, terminate]
    warn_at: [0.8]
  - name: memory-30d-power
    metric: mem.alloc.byte_seconds
    limit: 240 GiB*h
    window: {{rolling: 30d}}
    applies_to: {{groups: [power]}}
    enforce: [spawn, terminate]
failure_mode: {mode}
help: Ask your admin to join the power group.
"""


def checker_for(pool: asyncpg.Pool, tmp_path, alice: str, mode: str = "open") -> SpawnChecker:
    path = tmp_path / "quotas.yaml"
    path.write_text(CONFIG.format(alice=alice, mode=mode))
    return SpawnChecker(pool, ConfigSource.load(path))


@pytest.fixture
async def broker_for(servers, prefix: str) -> AsyncIterator:
    started: list[NatsBroker] = []

    async def start(checker: SpawnChecker) -> NatsBroker:
        broker = build_broker(servers.nats_url, prefix, checker)
        await start_broker(broker)
        started.append(broker)
        return broker

    yield start
    for b in started:
        await b.stop()


async def use_memory(pool: asyncpg.Pool, subject: str, gib_hours: int, when: datetime) -> None:
    key = SeriesKey(unique("h"), "e1", subject, unique("w"), "mem.alloc.byte_seconds")
    async with pool.acquire() as conn:
        await apply_readings(conn, "test", [Reading(key, 1, GIB_HOUR * gib_hours, when)], 1)


async def ask(nc: Client, prefix: str, body: bytes) -> dict:
    reply = await nc.request(spawn_check_subject(prefix), body, timeout=10)
    return json.loads(reply.data)


async def test_a_user_within_quota_may_spawn(
    nc: Client, prefix: str, pool: asyncpg.Pool, broker_for, tmp_path
) -> None:
    alice = unique("alice")
    await broker_for(checker_for(pool, tmp_path, alice))
    await use_memory(pool, alice, 50, datetime.now(UTC) - timedelta(days=2))
    decision = SpawnDecision.model_validate(
        await ask(nc, prefix, SpawnRequest(subject=alice).to_json())
    )
    assert decision.allowed
    (status,) = decision.quotas
    assert (status.name, status.state, status.used, status.limit) == (
        "memory-30d", "warning", Decimal(50), Decimal(60),
    )  # fmt: skip


async def test_over_quota_is_denied_with_used_limit_and_when_it_returns(
    nc: Client, prefix: str, pool: asyncpg.Pool, broker_for, tmp_path
) -> None:
    alice = unique("alice")
    await broker_for(checker_for(pool, tmp_path, alice))
    first = datetime.now(UTC).replace(minute=10, second=0, microsecond=0) - timedelta(days=5)
    await use_memory(pool, alice, 40, first)
    await use_memory(pool, alice, 25, first + timedelta(days=1))
    decision = SpawnDecision.model_validate(
        await ask(nc, prefix, SpawnRequest(subject=alice).to_json())
    )
    assert not decision.allowed
    assert decision.reason == "quota_exceeded"
    assert "You have used 65 of 60 GiB·h (memory-30d) in the last 30 days" in decision.message
    assert "Ask your admin to join the power group." in decision.message
    # Dropping the first 40 GiB·h brings usage to 25 < 60: that bucket leaves the window.
    returns = first.replace(minute=0) + timedelta(hours=1) + timedelta(days=30)
    assert decision.retry_at == returns
    assert returns.strftime("%Y-%m-%d %H:%M UTC") in decision.message


async def test_groups_in_the_request_raise_the_limit_by_max(
    nc: Client, prefix: str, pool: asyncpg.Pool, broker_for, tmp_path
) -> None:
    alice = unique("alice")
    await broker_for(checker_for(pool, tmp_path, alice))
    await use_memory(pool, alice, 65, datetime.now(UTC) - timedelta(days=1))
    body = SpawnRequest(subject=alice, groups=["power"]).to_json()
    decision = SpawnDecision.model_validate(await ask(nc, prefix, body))
    assert decision.allowed
    assert [q.name for q in decision.quotas] == ["memory-30d-power"]


async def test_a_malformed_request_gets_an_error_reply_not_silence(
    nc: Client, prefix: str, pool: asyncpg.Pool, broker_for, tmp_path
) -> None:
    await broker_for(checker_for(pool, tmp_path, unique("alice")))
    reply = await ask(nc, prefix, b'{"subject": ""}')
    assert reply["error"] == "invalid_request"
    assert "subject" in reply["message"]
    reply = await ask(nc, prefix, b"not json")
    assert reply["error"] == "invalid_request"


@pytest.mark.parametrize(("mode", "allowed"), [("open", True), ("closed", False)])
async def test_unavailable_usage_is_answered_by_failure_mode(
    nc: Client, prefix: str, broker_for, tmp_path, database_url: str, mode: str, allowed: bool
) -> None:
    alice = unique("alice")
    pool = await asyncpg.create_pool(database_url, min_size=0, max_size=2)
    checker = checker_for(pool, tmp_path, alice, mode)
    await pool.close()  # Postgres is "gone" for this checker.
    checker.pool = await asyncpg.create_pool(
        database_url.replace(database_url.split("@")[1].split("/")[0], "127.0.0.1:9"),
        min_size=0,
        max_size=1,
    )
    await broker_for(checker)
    decision = SpawnDecision.model_validate(
        await ask(nc, prefix, SpawnRequest(subject=alice).to_json())
    )
    assert decision.allowed is allowed
    assert decision.fail_open is allowed
    assert decision.reason == "usage_unavailable"
