"""Quotas that change with time and configuration alone: windows roll, history is reloaded."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
from nats.aio.client import Client

from contracts.spawn import SpawnRequest
from services.policy.windows import floor_hour
from tests.conftest import unique, wait_until
from tests.integration.conftest import total
from tests.integration.test_policy_support import GIB_HOUR, Fleet, Inbox, spawn

pytest_plugins = ["tests.integration.test_policy_support"]
MEM = "mem.alloc.byte_seconds"
MONTH = """
quotas:
  - name: memory-30d
    metric: mem.alloc.byte_seconds
    limit: 60 GiB*h
    window: {rolling: 30d}
    enforce: [spawn]
"""
QUARTER = """
  - name: memory-90d
    metric: mem.alloc.byte_seconds
    limit: 100 GiB*h
    window: {rolling: 90d}
    enforce: [spawn]
"""


async def _true(value: object) -> bool:
    return bool(value)


async def test_a_blocked_user_is_unblocked_when_old_usage_leaves_the_rolling_window(
    nc: Client, prefix: str, pool: asyncpg.Pool, ledger, policy_for, inbox: Inbox
) -> None:
    alice = unique("alice")
    skew = [timedelta(0)]
    policy = await policy_for(MONTH, clock=lambda: datetime.now(UTC) + skew[0], sweep_every=0.2)
    almost_30_days_ago = datetime.now(UTC) - timedelta(days=30) + timedelta(minutes=90)
    await Fleet(nc, prefix, unique("n")).sample(
        almost_30_days_ago, (alice, "w", MEM, 65 * GIB_HOUR)
    )
    await wait_until(lambda: _true(inbox.of("block")), what="the block")
    (block,) = inbox.of("block")
    returns = floor_hour(almost_30_days_ago) + timedelta(hours=1, days=30)
    assert block["until"].startswith(returns.strftime("%Y-%m-%dT%H:%M"))
    assert not (await spawn(nc, prefix, SpawnRequest(subject=alice))).allowed

    skew[0] = returns - datetime.now(UTC) + timedelta(minutes=1)  # time passes
    await wait_until(lambda: _true(inbox.of("unblock")), what="the unblock")
    (unblock,) = inbox.of("unblock")
    assert (unblock["subject"], unblock["quota"]) == (alice, "memory-30d")
    decision = await spawn(nc, prefix, SpawnRequest(subject=alice))
    assert decision.allowed and decision.quotas[0].used == 0
    assert policy.service.live.marks.get(alice, {}) == {}


async def test_a_config_with_a_longer_window_reloads_the_history_it_needs(
    nc: Client, prefix: str, pool: asyncpg.Pool, ledger, policy_for
) -> None:
    alice = unique("alice")
    await Fleet(nc, prefix, unique("n")).sample(
        datetime.now(UTC) - timedelta(days=50), (alice, "w", MEM, 120 * GIB_HOUR)
    )
    await wait_until(lambda: _is(total(pool, alice, MEM), 120 * GIB_HOUR), what="old usage")
    # Loaded with 35 days of hour buckets kept apart: the 50-day-old usage is in a total.
    policy = await policy_for(MONTH)
    assert (await spawn(nc, prefix, SpawnRequest(subject=alice))).allowed

    tmp = policy.config_path.with_suffix(".tmp")
    tmp.write_text(MONTH + QUARTER)
    os.replace(tmp, policy.config_path)

    async def denied_by_the_quarter() -> bool:
        decision = await spawn(nc, prefix, SpawnRequest(subject=alice))
        return [q.used for q in decision.quotas if q.name == "memory-90d"] == [Decimal(120)]

    await wait_until(denied_by_the_quarter, what="the 90-day quota to see 50-day-old usage")


async def _is(value, expected) -> bool:
    return await value == expected
