"""The JupyterHub story (2i2c): a regular user crosses the memory quota while a server runs."""

from __future__ import annotations

import os
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
from nats.aio.client import Client

from contracts.spawn import SpawnRequest
from contracts.workloads import Resources
from services.policy.windows import floor_hour
from tests.conftest import unique, wait_until
from tests.integration.conftest import total
from tests.integration.test_policy_support import (
    GIB,
    GIB_HOUR,
    Fleet,
    Inbox,
    decision_row,
    spawn,
)
from tollgate.commands.explain import explain_text

pytest_plugins = ["tests.integration.test_policy_support"]
MEM = "mem.alloc.byte_seconds"
CONFIG = """
groups:
  regular: [{regular}]
  power: [{power}]
quotas:
  - name: memory-30d
    metric: mem.alloc.byte_seconds
    limit: 60 GiB*h
    window: {{rolling: 30d}}
    applies_to: {{groups: [regular]}}
    enforce: [spawn, terminate]
    warn_at: [0.8, 0.95]
    termination: {{reason: compute_quota_exceeded, grace_seconds: 30}}
  - name: memory-30d-power
    metric: mem.alloc.byte_seconds
    limit: 240 GiB*h
    window: {{rolling: 30d}}
    applies_to: {{groups: [power]}}
    enforce: [spawn, terminate]
failure_mode: closed
help: Ask your admin to join the power group.
"""


def server_request(subject: str, workload: str) -> SpawnRequest:
    return SpawnRequest(
        subject=subject, workload=workload, resources=Resources(mem_bytes=4 * GIB),
        expected_seconds=3600,
    )  # fmt: skip


async def test_a_regular_user_over_quota_is_stopped_denied_and_let_back_in_by_the_admin(
    nc: Client, prefix: str, pool: asyncpg.Pool, ledger, policy_for, inbox: Inbox
) -> None:
    alice, node = unique("alice"), Fleet(nc, prefix, unique("node"))
    now = datetime.now(UTC)
    three_days_ago = now - timedelta(days=3)
    # 50 of her 60 GiB·h went on a server three days ago.
    await node.sample(three_days_ago, (alice, unique("old"), MEM, 50 * GIB_HOUR))
    await wait_until(lambda: _is(total(pool, alice, MEM), 50 * GIB_HOUR), what="old usage")
    policy = await policy_for(CONFIG.format(regular=alice, power=""))

    # She starts a 4 GiB server for an hour: 54 of 60 fits, so it is allowed and held.
    server = unique("jupyter-")
    decision = await spawn(nc, prefix, server_request(alice, server))
    assert decision.allowed, decision.message
    assert decision.message == (
        f"Allowed for {alice}: 50 of 60 GiB·h used (memory-30d) in the last 30 days, "
        "4 GiB·h held for this spawn."
    )
    (memory,) = decision.quotas
    assert (memory.name, memory.used, memory.limit, memory.unit, memory.state) == (
        "memory-30d", 50, 60, "GiB·h", "warning",
    )  # fmt: skip
    assert policy.service.live.holds.reserved([alice], MEM, now) == 4 * GIB_HOUR

    # It runs, and crosses 60 GiB·h while running.
    await node.started(alice, server, now - timedelta(hours=3), mem_bytes=4 * GIB)
    await node.sample(now - timedelta(hours=2), (alice, server, MEM, 4 * GIB_HOUR))
    await node.sample(now, (alice, server, MEM, 11 * GIB_HOUR))
    await wait_until(lambda: _true(inbox.terminations(server)), what="a termination")
    (command,) = inbox.terminations(server)
    assert command["reason"] == "compute_quota_exceeded"
    assert Decimal(command["grace_seconds"]) == 30
    assert (command["quota"], command["subject"]) == ("memory-30d", alice)
    assert int(command["used"]) == 61 * GIB_HOUR and int(command["limit"]) == 60 * GIB_HOUR
    # Real usage replaced the hold.
    assert policy.service.live.holds.reserved([alice], MEM, now) == 0

    # Her next spawn is denied, saying how much, of what, and when quota returns.
    decision = await spawn(nc, prefix, server_request(alice, unique("jupyter-")))
    assert not decision.allowed
    returns = floor_hour(three_days_ago) + timedelta(hours=1) + timedelta(days=30)
    assert decision.retry_at == returns
    assert decision.message == (
        "You have used 61 of 60 GiB·h (memory-30d) in the last 30 days; quota returns from "
        f"{returns:%Y-%m-%d %H:%M} UTC. Ask your admin to join the power group."
    )
    await wait_until(lambda: _true(inbox.of("block")), what="a spawn block")
    (block,) = inbox.of("block")
    assert (block["subject"], block["quota"]) == (alice, "memory-30d")
    assert block["until"].startswith(returns.strftime("%Y-%m-%dT%H:%M"))
    kinds = [(e["schema"], e.get("threshold")) for e in inbox.events if e["subject"] == alice]
    assert ("tollgate.quota_warning.v1", "0.8") in kinds
    assert ("tollgate.quota_exceeded.v1", None) in kinds

    # The denial is stored with its inputs, and explained.
    row = await _stored(pool, decision.decision_id)
    assert row["policy_version"] == policy.service.live.config.version
    assert row["groups"] == ["regular"] and row["as_of_seq"] >= 3
    text = await explain_text(pool, decision.decision_id)
    assert "denied" in text and "memory-30d" in text and "61 of 60 GiB·h" in text

    # The admin moves her to `power`: the file is reloaded, she is unblocked and may spawn.
    _replace(policy.config_path, CONFIG.format(regular="", power=alice))
    await wait_until(lambda: _true(inbox.of("unblock")), what="an unblock")
    decision = await spawn(nc, prefix, server_request(alice, unique("jupyter-")))
    assert decision.allowed, decision.message
    assert [q.name for q in decision.quotas] == ["memory-30d-power"]
    assert len(inbox.terminations(server)) == 1


def _replace(path, text: str) -> None:
    """Write the way editors do: a new file renamed over the old one."""
    tmp = path.with_suffix(".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


async def _stored(pool: asyncpg.Pool, decision_id: str) -> asyncpg.Record:
    async def found() -> bool:
        return await decision_row(pool, decision_id) is not None

    await wait_until(found, what=f"decision {decision_id} stored")
    row = await decision_row(pool, decision_id)
    assert row is not None
    return row


async def _is(value, expected) -> bool:
    return await value == expected


async def _true(value: object) -> bool:
    return bool(value)
