"""Restarts and crashes never add a second termination for one crossing."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import sys
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import nats.errors
import pytest
from nats.aio.client import Client

from contracts.spawn import SpawnRequest
from services.policy.service import PolicyService
from services.policy.source import ConfigSource
from tests.conftest import unique, wait_until
from tests.integration.conftest import total
from tests.integration.test_policy_support import GIB_HOUR, Fleet, Inbox, spawn

pytest_plugins = ["tests.integration.test_policy_support"]
MEM = "mem.alloc.byte_seconds"
CONFIG = """
quotas:
  - name: memory-week
    metric: mem.alloc.byte_seconds
    limit: 10 GiB*h
    window: {rolling: 7d}
    enforce: [spawn, terminate]
    termination: {grace_seconds: 10}
"""


async def _true(value: object) -> bool:
    return bool(value)


@pytest.fixture
async def policy_process(
    servers, database_url: str, prefix: str, tmp_path: Path
) -> AsyncIterator[Callable[[], asyncio.Future]]:
    """Start `tollgate policy` as its own process (the caller kills it with SIGKILL)."""
    config = tmp_path / "quotas.yaml"
    config.write_text(CONFIG)
    env = {
        **os.environ, "TOLLGATE_NATS_URL": servers.nats_url,
        "TOLLGATE_DATABASE_URL": database_url, "TOLLGATE_PREFIX": prefix,
        "TOLLGATE_CONFIG": str(config), "TOLLGATE_DATA_DIR": str(tmp_path / "data"),
    }  # fmt: skip
    procs: list[asyncio.subprocess.Process] = []

    async def start() -> asyncio.subprocess.Process:
        log = (tmp_path / f"policy-{len(procs)}.log").open("wb")
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "tollgate.cli", "policy", env=env, stdout=log, stderr=log
        )
        procs.append(proc)
        return proc

    yield start
    for p in procs:
        with contextlib.suppress(ProcessLookupError):
            p.kill()
        await p.wait()


async def _answering(nc: Client, prefix: str) -> None:
    async def ready() -> bool:
        try:
            decision = await spawn(nc, prefix, SpawnRequest(subject="probe"))
        except (nats.errors.NoRespondersError, nats.errors.TimeoutError):
            return False
        return not decision.fail_open

    await wait_until(ready, 30, "the policy process to answer from loaded usage")


async def test_a_policy_killed_mid_crossing_sends_one_termination_per_crossing(
    nc: Client, prefix: str, pool: asyncpg.Pool, ledger, inbox: Inbox, policy_process
) -> None:
    alice, node = unique("alice"), Fleet(nc, prefix, unique("node"))
    first, second = unique("nb-"), unique("nb-")
    now = datetime.now(UTC)
    proc = await policy_process()
    await _answering(nc, prefix)
    await node.started(alice, first, now - timedelta(hours=2))
    await node.sample(now - timedelta(hours=1), (alice, first, MEM, 8 * GIB_HOUR))
    await wait_until(lambda: _is(total(pool, alice, MEM), 8 * GIB_HOUR), what="usage below")
    # The crossing arrives and the policy is killed at once: it may or may not have acted.
    await node.sample(now, (alice, first, MEM, 12 * GIB_HOUR))
    proc.send_signal(signal.SIGKILL)
    await proc.wait()
    await wait_until(lambda: _is(total(pool, alice, MEM), 12 * GIB_HOUR), what="the crossing")

    proc = await policy_process()
    await wait_until(lambda: _true(inbox.terminations(first)), what="the first termination")
    # Killed again right after it sent the command (it may not have noted that it did).
    proc.send_signal(signal.SIGKILL)
    await proc.wait()

    await policy_process()
    await _answering(nc, prefix)
    # Still over: a second notebook started now is stopped too, in the same evaluation
    # that re-decides the first one.
    await node.started(alice, second, now)
    await node.sample(now, (alice, first, MEM, 13 * GIB_HOUR))
    await wait_until(lambda: _true(inbox.terminations(second)), what="the second termination")
    assert len(inbox.terminations(first)) == 1
    assert len(inbox.terminations(second)) == 1
    rows = await pool.fetch(
        "SELECT msg_id, published_at FROM policy_outbox WHERE msg_id LIKE 'term-%'"
    )
    assert len(rows) == 2 and all(r["published_at"] is not None for r in rows)


async def test_a_crash_between_deciding_and_sending_sends_once_after_restart(
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

    # A policy that decides (commits the command to its outbox) and dies before sending.
    crashed = PolicyService(nc, pool, ConfigSource.load(config), prefix)
    await crashed.load()  # takes in the workload_started waiting in the stream
    await crashed.enforcer.step()
    (pending,) = await pool.fetch(
        "SELECT * FROM policy_outbox WHERE published_at IS NULL AND msg_id LIKE 'term-%'"
    )
    # ...or it did send, but died before noting so: the same id goes out again on restart.
    await nc.jetstream().publish(
        pending["nats_subject"], bytes(pending["payload"]),
        headers={"Nats-Msg-Id": pending["msg_id"]},
    )  # fmt: skip

    await policy_for(CONFIG, path=config)
    await wait_until(lambda: _published(pool, pending["msg_id"]), what="the pending command sent")
    await wait_until(lambda: _true(inbox.terminations(workload)), what="the termination")
    # The restarted policy decided the same crossing again: same id, nothing new.
    assert [c["command_id"] for c in inbox.terminations(workload)] == [pending["msg_id"]]
    count = await pool.fetchval("SELECT count(*) FROM policy_outbox WHERE msg_id LIKE 'term-%'")
    assert count == 1


async def _published(pool: asyncpg.Pool, msg_id: str) -> bool:
    at = await pool.fetchval("SELECT published_at FROM policy_outbox WHERE msg_id = $1", msg_id)
    return at is not None


async def _is(value, expected) -> bool:
    return await value == expected
