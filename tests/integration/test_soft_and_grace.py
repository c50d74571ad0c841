"""Soft limits and grace against a hard limit, with the same usage, through the real policy."""

from __future__ import annotations

import io
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
from nats.aio.client import Client
from rich.console import Console

from contracts.spawn import SpawnRequest
from services.policy.config import parse_config
from services.policy.quotas import subject_quotas
from tests.conftest import unique, wait_until
from tests.integration.test_grants import AS_ADMIN, api
from tests.integration.test_policy_support import GIB_HOUR, Fleet, Inbox, spawn
from tollgate.commands.quota import render

pytest_plugins = ["tests.integration.test_policy_support"]
MEM = "mem.alloc.byte_seconds"
CONFIG = """
quotas:
  - name: mem-hard
    metric: mem.alloc.byte_seconds
    limit: 2 GiB*h
    window: {{rolling: 30d}}
    applies_to: {{users: [{hard}]}}
    enforce: [spawn, terminate]
  - name: mem-grace
    metric: mem.alloc.byte_seconds
    limit: 2 GiB*h
    window: {{rolling: 30d}}
    applies_to: {{users: [{grace}]}}
    enforce: [spawn, terminate]
    grace: 20%
  - name: mem-soft
    metric: mem.alloc.byte_seconds
    limit: 2 GiB*h
    window: {{rolling: 30d}}
    applies_to: {{users: [{soft}]}}
    enforce: [spawn, terminate]
    mode: soft
"""


async def _kinds(pool: asyncpg.Pool, subject: str) -> list[str]:
    rows = await pool.fetch(
        "SELECT kind FROM policy_decisions WHERE subject = $1 AND kind <> 'spawn'", subject
    )
    return sorted(r["kind"] for r in rows)


def _exceeded(inbox: Inbox, subject: str) -> Any:
    async def check() -> bool:
        return any(
            e["schema"] == "tollgate.quota_exceeded.v1" and e["subject"] == subject
            for e in inbox.events
        )

    return check


async def test_soft_and_grace_report_what_a_hard_limit_enforces_on_the_same_usage(
    nc: Client, prefix: str, pool: asyncpg.Pool, ledger: None, policy_for: Any, inbox: Inbox,
    tmp_path: Path,
) -> None:  # fmt: skip
    hard, grace, soft = unique("hard"), unique("grace"), unique("soft")
    text = CONFIG.format(hard=hard, grace=grace, soft=soft)
    await policy_for(text)
    node = Fleet(nc, prefix, unique("node"))
    now = datetime.now(UTC)
    jobs = {s: unique(f"job-{s[:4]}-") for s in (hard, grace, soft)}
    for s, job in jobs.items():
        await node.started(s, job, now - timedelta(hours=2))
    # 2.3 GiB·h each, against 2 GiB·h: over the limit, inside a 20% grace (2.4 GiB·h).
    used = GIB_HOUR * Decimal("2.3")
    await node.sample(now, *[(s, jobs[s], MEM, used) for s in (soft, grace, hard)])

    await wait_until(lambda: _has(inbox, "terminate", jobs[hard]), what="the hard termination")
    for s in (grace, soft):
        await wait_until(_exceeded(inbox, s), what=f"{s}'s quota_exceeded event")
    # Exceeded is reported for all three; only the hard quota blocks and terminates (a plan's
    # events and commands are stored together, so the events above mean the decision is done).
    assert await _kinds(pool, hard) == ["block", "exceeded", "terminate"]
    assert await _kinds(pool, grace) == ["exceeded"]
    assert await _kinds(pool, soft) == ["exceeded"]

    def ask(subject: str) -> SpawnRequest:
        return SpawnRequest(subject=subject, workload=unique("w-"), expected_seconds=0)

    denied = await spawn(nc, prefix, ask(hard))
    assert not denied.allowed and "2.3 of 2 GiB·h" in denied.message
    within = await spawn(nc, prefix, ask(grace))
    assert within.allowed, within.message
    assert "over by 0.3 GiB·h, within grace" in within.message
    (g,) = within.quotas
    assert (g.state, g.enforced, g.grace, g.enforced_limit, g.grace_remaining) == (
        "exceeded", False, Decimal("0.2"), Decimal("2.4"), Decimal("0.1"),
    )  # fmt: skip
    soft_ok = await spawn(nc, prefix, ask(soft))
    assert soft_ok.allowed
    (s_status,) = soft_ok.quotas
    assert (s_status.mode, s_status.state, s_status.enforced, s_status.enforced_limit) == (
        "soft", "exceeded", False, None,
    )  # fmt: skip
    assert "soft limit" in (s_status.note or "")

    # The API says the same in its status.
    async with api(tmp_path, pool, nc, prefix, text) as client:
        body = (await client.get(f"/v1/subjects/{grace}/quotas", headers=AS_ADMIN)).json()
    (q,) = body["quotas"]
    assert (q["state"], q["enforced"], q["grace_remaining"]) == ("exceeded", False, "0.1")
    assert q["note"].startswith("over by 0.3 GiB·h, within grace")

    # And `tollgate quota` prints the note.
    found = await subject_quotas(pool, parse_config(text), grace)
    out = Console(file=io.StringIO(), width=300)
    out.print(render(grace, found, "test", []))
    assert "mem-grace: over by 0.3 GiB·h, within grace" in out.file.getvalue()  # type: ignore[attr-defined]

    # Past the grace (2.5 > 2.4) the grace quota enforces; the soft one never does.
    await node.sample(
        now + timedelta(seconds=1),
        (soft, jobs[soft], MEM, GIB_HOUR * 5),
        (grace, jobs[grace], MEM, GIB_HOUR * Decimal("2.5")),
    )
    await wait_until(lambda: _has(inbox, "terminate", jobs[grace]), what="the grace termination")
    assert await _kinds(pool, grace) == ["block", "exceeded", "terminate"]
    assert await _kinds(pool, soft) == ["exceeded"]
    past = await spawn(nc, prefix, ask(grace))
    assert not past.allowed and "past its 20% grace" in past.message
    assert (await spawn(nc, prefix, ask(soft))).allowed
    assert not inbox.terminations(jobs[soft]) and not [
        c for c in inbox.of("block") if c["subject"] == soft
    ]


async def _has(inbox: Inbox, kind: str, workload: str) -> bool:
    return any(c.get("workload") == workload for c in inbox.of(kind))
