"""`tollgate quota SUBJECT` and `tollgate explain DECISION_ID`, as a person types them."""

from __future__ import annotations

import asyncio
import os
import sys
from datetime import UTC, datetime, timedelta

import asyncpg
from nats.aio.client import Client

from contracts.spawn import SpawnRequest
from contracts.workloads import Resources
from tests.conftest import unique, wait_until
from tests.integration.test_policy_support import GIB, GIB_HOUR, Fleet, Inbox, spawn

pytest_plugins = ["tests.integration.test_policy_support"]
CONFIG = """
groups:
  regular: [{alice}]
quotas:
  - name: memory-30d
    metric: mem.alloc.byte_seconds
    limit: 60 GiB*h
    window: {{rolling: 30d}}
    applies_to: {{groups: [regular]}}
    enforce: [spawn, terminate]
  - name: egress-month
    metric: net.tx.wan.bytes
    limit: 10 GB
    window: {{calendar: month, tz: UTC}}
help: Ask your admin to join the power group.
"""


async def tollgate(database_url: str, *args: str) -> tuple[int, str]:
    env = {**os.environ, "TOLLGATE_DATABASE_URL": database_url,
           "TOLLGATE_NATS_URL": "nats://127.0.0.1:9", "COLUMNS": "160"}  # fmt: skip
    env.pop("TOLLGATE_CONFIG", None)
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tollgate.cli", *args, env=env,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await proc.communicate()
    return proc.returncode or 0, out.decode()


async def _true(value: object) -> bool:
    return bool(value)


async def test_quota_and_explain_tell_a_user_where_they_stand_and_why(
    nc: Client, prefix: str, pool: asyncpg.Pool, database_url: str, ledger, policy_for,
    inbox: Inbox,
) -> None:  # fmt: skip
    alice, node = unique("alice"), Fleet(nc, prefix, unique("node"))
    await policy_for(CONFIG.format(alice=alice))
    workload = unique("jupyter-")
    await node.started(alice, workload, datetime.now(UTC) - timedelta(hours=1))
    await node.sample(datetime.now(UTC), (alice, workload, "mem.alloc.byte_seconds", 61 * GIB_HOUR))
    await wait_until(lambda: _true(inbox.terminations(workload)), what="the termination")
    request = SpawnRequest(subject=alice, resources=Resources(mem_bytes=4 * GIB))
    denied = await spawn(nc, prefix, request)
    assert not denied.allowed

    code, out = await tollgate(database_url, "quota", alice)
    assert code == 0, out
    line = next(row for row in out.splitlines() if "memory-30d" in row)
    for cell in ("61 GiB·h", "60 GiB·h", "0 GiB·h", "exceeded", "in the last 30 days"):
        assert cell in line, line
    assert "egress-month" in out and "groups: regular" in out
    assert "spawns blocked by memory-30d until" in out

    async def stored() -> bool:
        return await pool.fetchval(
            "SELECT count(*) FROM policy_decisions WHERE decision_id = $1", denied.decision_id
        ) == 1  # fmt: skip

    await wait_until(stored, what="the denial stored")
    code, out = await tollgate(database_url, "explain", denied.decision_id[:12])
    assert code == 0, out
    assert f"Decision {denied.decision_id}: spawn denied (quota_exceeded)" in out
    assert "You have used 61 of 60 GiB·h (memory-30d)" in out
    assert "groups resolved  regular" in out and "usage as of      ledger seq" in out

    (command,) = inbox.terminations(workload)
    code, out = await tollgate(database_url, "explain", command["command_id"])
    assert code == 0, out
    assert "workload terminated (compute_quota_exceeded)" in out
    assert f"sent on {prefix}.v1.commands.terminate.{node.host}" in out

    code, out = await tollgate(database_url, "explain", "no-such-decision")
    assert code == 1 and "no decision 'no-such-decision'" in out
