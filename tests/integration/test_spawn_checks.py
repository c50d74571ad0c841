"""Spawn checks over real NATS request/reply, answered from the policy's live state."""

from __future__ import annotations

import asyncio
import json
from datetime import UTC, datetime, timedelta
from decimal import Decimal

import asyncpg
import pytest
from nats.aio.client import Client
from prometheus_client import REGISTRY

from contracts.spawn import SpawnRequest, spawn_check_subject
from contracts.workloads import Resources
from services.policy.app import SpawnCheckResponder
from services.policy.service import PolicyService
from services.policy.source import ConfigSource
from services.policy.windows import floor_hour
from tests.conftest import unique, wait_until
from tests.integration.test_policy_support import GIB, GIB_HOUR, Fleet, spawn

pytest_plugins = ["tests.integration.test_policy_support"]
MEM = "mem.alloc.byte_seconds"
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
max_staleness: 2s
help: Ask your admin to join the power group.
"""


def config(alice: str, mode: str = "open") -> str:
    return CONFIG.format(alice=alice, mode=mode)


def server(subject: str, gib: int = 4, workload: str | None = None) -> SpawnRequest:
    return SpawnRequest(
        subject=subject, workload=workload, resources=Resources(mem_bytes=gib * GIB),
        expected_seconds=3600,
    )  # fmt: skip


async def test_a_user_within_quota_may_spawn(nc: Client, prefix: str, ledger, policy_for) -> None:
    alice = unique("alice")
    await policy_for(config(alice))
    await Fleet(nc, prefix, unique("n")).sample(
        datetime.now(UTC) - timedelta(days=2), (alice, unique("w"), MEM, 50 * GIB_HOUR)
    )
    decision = await _when_used(nc, prefix, alice, Decimal(50))
    assert decision.allowed
    (status,) = decision.quotas
    assert (status.name, status.state, status.used, status.limit, status.reserved) == (
        "memory-30d", "warning", Decimal(50), Decimal(60), Decimal(0),
    )  # fmt: skip


async def test_over_quota_is_denied_with_used_limit_and_when_it_returns(
    nc: Client, prefix: str, ledger, policy_for
) -> None:
    alice, node = unique("alice"), Fleet(nc, prefix, unique("n"))
    await policy_for(config(alice))
    first = datetime.now(UTC).replace(minute=10, second=0, microsecond=0) - timedelta(days=5)
    await node.sample(first, (alice, "w1", MEM, 40 * GIB_HOUR))
    await node.sample(first + timedelta(days=1), (alice, "w1", MEM, 65 * GIB_HOUR))
    decision = await _when_used(nc, prefix, alice, Decimal(65))
    assert not decision.allowed
    assert decision.reason == "quota_exceeded"
    assert "You have used 65 of 60 GiB·h (memory-30d) in the last 30 days" in decision.message
    assert decision.message.endswith("Ask your admin to join the power group.")
    # Dropping the first 40 GiB·h brings usage to 25 < 60: that bucket leaves the window.
    returns = floor_hour(first) + timedelta(hours=1) + timedelta(days=30)
    assert decision.retry_at == returns
    assert returns.strftime("%Y-%m-%d %H:%M UTC") in decision.message


async def test_a_spawn_that_would_not_fit_is_denied_with_what_is_left(
    nc: Client, prefix: str, ledger, policy_for
) -> None:
    alice = unique("alice")
    await policy_for(config(alice))
    await Fleet(nc, prefix, unique("n")).sample(
        datetime.now(UTC) - timedelta(hours=3), (alice, "w1", MEM, 57 * GIB_HOUR)
    )
    await _when_used(nc, prefix, alice, Decimal(57))
    decision = await spawn(nc, prefix, server(alice, gib=4))
    assert (decision.allowed, decision.reason) == (False, "quota_insufficient")
    assert decision.message.startswith(
        "This spawn needs 4 GiB·h (memory-30d) but 3 GiB·h of 60 GiB·h are left in the last "
        "30 days; quota returns from"
    )
    assert (await spawn(nc, prefix, server(alice, gib=3))).allowed


async def test_groups_in_the_request_raise_the_limit_by_max(
    nc: Client, prefix: str, ledger, policy_for
) -> None:
    alice = unique("alice")
    await policy_for(config(alice))
    await Fleet(nc, prefix, unique("n")).sample(
        datetime.now(UTC) - timedelta(days=1), (alice, "w1", MEM, 65 * GIB_HOUR)
    )
    await _when_used(nc, prefix, alice, Decimal(65))
    decision = await spawn(nc, prefix, SpawnRequest(subject=alice, groups=["power"]))
    assert decision.allowed
    assert [q.name for q in decision.quotas] == ["memory-30d-power"]


async def test_fifty_concurrent_spawns_together_stay_within_the_quota(
    nc: Client, prefix: str, pool: asyncpg.Pool, policy_for
) -> None:
    alice = unique("alice")
    policy = await policy_for(config(alice))
    # 60 GiB·h left and each asks for 4 GiB for an hour: exactly 15 fit.
    decisions = await asyncio.gather(*(spawn(nc, prefix, server(alice)) for _ in range(50)))
    allowed = [d for d in decisions if d.allowed]
    assert len(allowed) == 15
    assert {d.reason for d in decisions if not d.allowed} == {"quota_insufficient"}
    assert policy.service.live.holds.reserved([alice], MEM, datetime.now(UTC)) == 60 * GIB_HOUR
    held = next(d for d in decisions if not d.allowed)
    assert "after 60 GiB·h held for spawns already allowed" in held.message

    async def all_stored() -> bool:
        n = await pool.fetchval(
            "SELECT count(*) FROM policy_decisions WHERE subject = $1 AND kind = 'spawn'", alice
        )
        return n == 50

    await wait_until(all_stored, what="50 stored spawn decisions")
    held_rows = await pool.fetchval(
        "SELECT count(*) FROM policy_decisions WHERE subject = $1 AND reservation IS NOT NULL",
        alice,
    )
    assert held_rows == 15


async def test_a_hold_shrinks_as_real_usage_arrives_and_ends_when_the_workload_stops(
    nc: Client, prefix: str, ledger, policy_for
) -> None:
    alice, node = unique("alice"), Fleet(nc, prefix, unique("n"))
    policy = await policy_for(config(alice))
    live = policy.service.live
    workload = unique("w")
    assert (await spawn(nc, prefix, server(alice, workload=workload))).allowed
    assert live.holds.reserved([alice], MEM, datetime.now(UTC)) == 4 * GIB_HOUR
    await node.started(alice, workload, datetime.now(UTC))
    await node.sample(datetime.now(UTC), (alice, workload, MEM, 1 * GIB_HOUR))

    async def held(expected: Decimal) -> bool:
        return live.holds.reserved([alice], MEM, datetime.now(UTC)) == expected

    await wait_until(lambda: held(3 * GIB_HOUR), what="the hold to shrink to 3 GiB·h")
    decision = await spawn(nc, prefix, server(alice, gib=0))
    (status,) = decision.quotas
    assert (status.used, status.reserved) == (Decimal(1), Decimal(3))
    await node.stopped(alice, workload, datetime.now(UTC))
    await wait_until(lambda: held(Decimal(0)), what="the hold to be released")


async def test_a_malformed_request_gets_an_error_reply_not_silence(
    nc: Client, prefix: str, policy_for
) -> None:
    await policy_for(config(unique("alice")))
    reply = json.loads((await nc.request(spawn_check_subject(prefix), b'{"subject": ""}')).data)
    assert reply["error"] == "invalid_request"
    assert "subject" in reply["message"]
    reply = json.loads((await nc.request(spawn_check_subject(prefix), b"not json")).data)
    assert reply["error"] == "invalid_request"


@pytest.mark.parametrize(("mode", "allowed"), [("open", True), ("closed", False)])
async def test_stale_usage_is_answered_by_failure_mode_and_counted(
    nc: Client, prefix: str, database_url: str, policy_for, mode: str, allowed: bool
) -> None:
    alice = unique("alice")
    skew = [timedelta(0)]
    policy = await policy_for(config(alice, mode), clock=lambda: datetime.now(UTC) + skew[0])
    assert (await spawn(nc, prefix, server(alice))).fail_open is False
    # The policy loses Postgres, so nothing confirms its usage is current any more.
    await policy.service.pool.close()
    skew[0] = timedelta(seconds=5)
    decision = await spawn(nc, prefix, server(alice))
    assert (decision.allowed, decision.fail_open, decision.reason) == (
        allowed, allowed, "usage_stale",
    )  # fmt: skip
    stats = policy.service.live.stats
    assert (stats.spawn_fail_open, stats.spawn_fail_closed) == (int(allowed), int(not allowed))
    mode_label = {"mode": "open" if allowed else "closed"}
    assert REGISTRY.get_sample_value("tollgate_policy_fail_open_total", mode_label) >= 1


async def _when_used(nc: Client, prefix: str, subject: str, gib_hours: Decimal):
    """Ask until the policy's numbers show the usage the test published (no sleeping)."""
    found = []

    async def check() -> bool:
        decision = await spawn(nc, prefix, SpawnRequest(subject=subject))
        found[:] = [decision]
        return bool(decision.quotas) and decision.quotas[0].used == gib_hours

    await wait_until(check, what=f"{gib_hours} GiB·h to show")
    return found[0]


async def test_a_policy_that_cannot_load_usage_answers_by_failure_mode_at_once(
    nc: Client, prefix: str, streams, tmp_path
) -> None:
    alice = unique("alice")
    path = tmp_path / "quotas.yaml"
    path.write_text(config(alice, "closed"))
    nowhere = await asyncpg.create_pool("postgresql://nobody@127.0.0.1:9/none", min_size=0)
    service = PolicyService(nc, nowhere, ConfigSource.load(path), prefix)
    responder = SpawnCheckResponder(nc, prefix, service.checker)
    await responder.start()
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))  # keeps retrying the load meanwhile
    try:
        decision = await spawn(nc, prefix, server(alice))
        assert (decision.allowed, decision.reason) == (False, "usage_unavailable")
        assert "fail-closed" in decision.message and "Try again in a minute" in decision.message
        assert service.live.stats.spawn_fail_closed == 1
    finally:
        stop.set()
        await responder.stop()
        await task
        await nowhere.close()


async def test_groups_a_workload_started_with_count_for_later_checks(
    nc: Client, prefix: str, pool: asyncpg.Pool, ledger, policy_for
) -> None:
    bob = unique("bob")  # in no configured group
    await policy_for(config(unique("alice")))
    assert (await spawn(nc, prefix, SpawnRequest(subject=bob))).quotas == []
    await Fleet(nc, prefix, unique("n")).started(bob, unique("w"), datetime.now(UTC), ["power"])

    async def in_power() -> bool:
        decision = await spawn(nc, prefix, SpawnRequest(subject=bob))
        return [q.name for q in decision.quotas] == ["memory-30d-power"]

    await wait_until(in_power, what="the hub's word that bob is in power")
    reported = await pool.fetchval(
        "SELECT groups FROM policy_subject_groups WHERE subject = $1", bob
    )
    assert reported == ["power"]
