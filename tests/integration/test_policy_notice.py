"""A scheduled notice survives a policy restart and fires on time (real NATS, Postgres)."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta

import asyncpg
from nats.aio.client import Client

from services.policy.service import PolicyService
from services.policy.source import ConfigSource
from tests.conftest import unique, wait_until
from tests.integration.conftest import total
from tests.integration.test_policy_support import GIB_HOUR, Fleet, Inbox
from tollgate.commands.explain import explain_text

pytest_plugins = ["tests.integration.test_policy_support"]
MEM = "mem.alloc.byte_seconds"
CONFIG = """
quotas:
  - name: memory-week
    metric: mem.alloc.byte_seconds
    limit: 10 GiB*h
    window: {rolling: 7d}
    enforce: [terminate]
    termination: {grace_seconds: 1, notice_seconds: 3}
"""


async def _true(value: object) -> bool:
    return bool(value)


async def _is(value, expected) -> bool:
    return (await value) == expected


async def test_a_notice_decided_before_a_restart_is_reloaded_and_fires_once_on_time(
    nc: Client, prefix: str, pool: asyncpg.Pool, ledger, inbox: Inbox, policy_for, tmp_path
) -> None:
    alice, node = unique("alice"), Fleet(nc, prefix, unique("node"))
    workload = unique("job-")
    now = datetime.now(UTC)
    await node.started(alice, workload, now - timedelta(hours=1))
    await node.sample(now, (alice, workload, MEM, 11 * GIB_HOUR))
    await wait_until(lambda: _is(total(pool, alice, MEM), 11 * GIB_HOUR), what="the crossing")
    config = tmp_path / "quotas.yaml"
    config.write_text(CONFIG)

    # A policy decides the notice, sends it, and goes away before it runs out.
    gone = PolicyService(nc, pool, ConfigSource.load(config), prefix)
    await gone.load()
    await gone.enforcer.step()
    await gone.enforcer.publish_pending()
    await wait_until(lambda: _true(inbox.of("notice")), what="the notice on the host subject")
    (notice,) = inbox.of("notice")
    assert notice["schema"] == "tollgate.termination_scheduled.v1"
    assert inbox.terminations(workload) == []

    await policy_for(CONFIG, path=config)
    await wait_until(lambda: _true(inbox.terminations(workload)), 60, "the termination")
    (command,) = inbox.terminations(workload)
    rows = await pool.fetch(
        "SELECT kind, decided_at, inputs FROM policy_decisions WHERE subject = $1 "
        "AND kind IN ('termination_scheduled', 'terminate') ORDER BY decided_at",
        alice,
    )
    assert [r["kind"] for r in rows] == ["termination_scheduled", "terminate"]
    terminate = json.loads(rows[1]["inputs"])
    assert terminate["notice_id"] == notice["notice_id"]
    assert json.loads(rows[0]["inputs"])["notice_id"] == notice["notice_id"]
    assert rows[1]["decided_at"] >= datetime.fromisoformat(notice["terminate_at"])
    assert command["command_id"] == notice["command_id"]
    assert any(e["schema"] == "tollgate.termination_scheduled.v1" for e in inbox.events)
    told = await explain_text(pool, notice["notice_id"])
    assert "termination scheduled (notice given)" in told and "memory-week exceeded" in told
    killed = await explain_text(pool, command["command_id"])
    assert notice["notice_id"] in killed and "ran out" in killed
