"""Grants end to end: the API records them, the policy lifts and restores blocks at once."""

from __future__ import annotations

import asyncio
import json
import os
import sys
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from nats.aio.client import Client

from contracts.spawn import SpawnRequest
from infra.settings import Settings
from services.api.app import create_app
from services.api.deps import ApiDeps
from services.api.options import ApiOptions
from services.api.tokens import Role, issue_token
from services.policy.config import parse_config
from services.policy.source import ConfigSource
from tests.conftest import unique, wait_until
from tests.integration.test_api_support import ADMIN, SECRET, api_settings, live_api
from tests.integration.test_policy_support import GIB_HOUR, Fleet, Inbox, spawn
from tests.integration.test_replay import tollgate as replay
from tollgate.commands.explain import explain_text

pytest_plugins = ["tests.integration.test_policy_support"]
MEM = "mem.alloc.byte_seconds"
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
CONFIG = """
groups:
  lab: [{member}]
quotas:
  - name: memory-30d
    metric: mem.alloc.byte_seconds
    limit: 2 GiB*h
    window: {{rolling: 30d}}
    applies_to: {{users: [{alice}]}}
    enforce: [spawn, terminate]
  - name: lab-pool
    metric: cpu.alloc.seconds
    limit: 10 core*h
    window: {{rolling: 30d}}
    applies_to: {{groups: [lab]}}
    per: group
"""


def api(tmp_path: Path, pool: asyncpg.Pool, nc: Client | None, prefix: str, text: str) -> Any:
    settings = Settings(data_dir=tmp_path, admin_token=ADMIN, token_secret=SECRET)
    deps = ApiDeps(pool, nc, ConfigSource.fixed(parse_config(text)), prefix=prefix)
    app = create_app(settings, deps=deps, options=ApiOptions(spawn_check_timeout=1))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


def as_user(subject: str, role: Role = Role.USER) -> dict[str, str]:
    token = issue_token(SECRET, subject, role, timedelta(hours=1))
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture
async def scene(
    tmp_path: Path, pool: asyncpg.Pool, nc: Client, prefix: str
) -> AsyncIterator[tuple[httpx.AsyncClient, str, str]]:
    alice, member = unique("alice"), unique("member")
    text = CONFIG.format(alice=alice, member=member)
    async with api(tmp_path, pool, nc, prefix, text) as client:
        yield client, alice, text


def _ask(subject: str) -> SpawnRequest:
    return SpawnRequest(subject=subject, workload=unique("nb-"), expected_seconds=0)


async def _decision(pool: asyncpg.Pool, kind: str, subject: str, after: int = 0) -> asyncpg.Record:
    rows = await pool.fetch(
        "SELECT * FROM policy_decisions WHERE kind = $1 AND subject = $2 ORDER BY decided_at",
        kind,
        subject,
    )
    return rows[after] if len(rows) > after else None


async def test_a_grant_lifts_a_block_at_once_and_its_revocation_restores_it(
    nc: Client, prefix: str, pool: asyncpg.Pool, ledger: None, policy_for: Any, inbox: Inbox,
    scene: tuple[httpx.AsyncClient, str, str],
) -> None:  # fmt: skip
    client, alice, text = scene
    node = Fleet(nc, prefix, unique("node"))
    # A sweep far away: only the grant's cue can make the policy act within the test.
    policy = await policy_for(text, sweep_every=3600)
    hour_ago = datetime.now(UTC) - timedelta(hours=1)
    await node.sample(hour_ago, (alice, "w1", MEM, GIB_HOUR * 23 / 10))
    await wait_until(lambda: _has(inbox, "block", alice, 1), what="the first block")
    denied = await spawn(nc, prefix, _ask(alice))
    assert not denied.allowed and "2.3 of 2 GiB·h" in denied.message

    r = await client.post(
        f"/v1/subjects/{alice}/grants", headers=AS_ADMIN,
        json={"quota": "memory-30d", "amount": "10 GiB*h", "expires_in": "7d",
              "reason": "deadline on Friday"},
    )  # fmt: skip
    assert r.status_code == 201, r.text
    grant = r.json()
    gid = grant["grant_id"]
    assert gid.startswith("g-") and grant["granted_by"] == "admin"
    assert (grant["amount"], grant["unit"], grant["state"]) == ("10", "GiB·h", "active")
    assert grant["remaining"] == "9.7"  # 0.3 GiB·h of it is already spent
    expires = datetime.fromisoformat(grant["expires_at"])
    assert timedelta(days=6, hours=23) < expires - datetime.now(UTC) <= timedelta(days=7)

    # The block lifts at once: an unblock command, and spawn checks are allowed.
    await wait_until(lambda: _has(inbox, "unblock", alice, 1), what="the unblock command")
    allowed = await spawn(nc, prefix, _ask(alice))
    assert allowed.allowed, allowed.message
    assert f"2.3 of 12 GiB·h (2 GiB·h + 10 GiB·h grant {gid} until" in allowed.message
    (status,) = [q for q in allowed.quotas if q.name == "memory-30d"]
    assert (status.limit, status.base_limit, status.granted, status.state) == (12, 2, 10, "ok")
    assert [g.grant_id for g in status.grants] == [gid]
    unblock = await _decision(pool, "unblock", alice)
    assert "a grant raised the limit" in unblock["message"] and gid in unblock["message"]
    assert [g["grant_id"] for g in json.loads(unblock["inputs"])["grants"]] == [gid]
    await wait_until(lambda: _row(pool, allowed.decision_id), what="the allowed spawn's record")
    stored = await _row(pool, allowed.decision_id)
    quota_inputs = json.loads(stored["inputs"])["quotas"][0]
    assert quota_inputs["grants"][0]["grant_id"] == gid
    assert int(quota_inputs["base_limit"]) == 2 * GIB_HOUR
    assert gid in await explain_text(pool, unblock["decision_id"])
    explained = " ".join((await explain_text(pool, allowed.decision_id)).split())
    assert f"limit 2 GiB·h + grant {gid} of 10 GiB·h until" in explained

    # The API and the page's numbers agree.
    quotas = (await client.get(f"/v1/subjects/{alice}/quotas", headers=AS_ADMIN)).json()
    (memory,) = [q for q in quotas["quotas"] if q["name"] == "memory-30d"]
    assert (memory["limit"], memory["granted"]) == ("12", "10")
    assert memory["grants"][0]["grant_id"] == gid
    listed = (await client.get(f"/v1/subjects/{alice}/grants", headers=as_user(alice))).json()
    assert [g["grant_id"] for g in listed["grants"]] == [gid]

    # Revoked, the block is back: a new block command and denied spawns.
    r = await client.post(f"/v1/grants/{gid}/revoke", headers=AS_ADMIN,
                          json={"reason": "deadline moved"})  # fmt: skip
    assert r.status_code == 200, r.text
    assert r.json()["state"] == "revoked" and r.json()["revoked_by"] == "admin"
    await wait_until(lambda: _has(inbox, "block", alice, 2), what="the block to return")
    denied = await spawn(nc, prefix, _ask(alice))
    assert not denied.allowed and "2.3 of 2 GiB·h" in denied.message
    again = await _decision(pool, "block", alice, after=1)
    assert f"grant {gid} (10 GiB·h) revoked" in again["message"]
    assert "deadline moved" in again["message"]
    explained = await explain_text(pool, again["decision_id"])
    assert f"grant {gid} no longer counts (revoked" in explained
    assert policy.service.live.grants.grants[gid].revoked_at is not None

    # Revoking twice is refused, and the chain of three records verifies.
    r = await client.post(f"/v1/grants/{gid}/revoke", headers=AS_ADMIN, json={"reason": "again"})
    assert r.status_code == 409 and "already revoked" in r.json()["detail"]
    v = (await client.get("/v1/audit/grants/verify", headers=AS_ADMIN)).json()
    assert v["ok"] and v["records"] == 2


async def _has(inbox: Inbox, kind: str, subject: str, count: int) -> bool:
    return len([c for c in inbox.of(kind) if c["subject"] == subject]) >= count


async def _row(pool: asyncpg.Pool, decision_id: str) -> Any:
    return await pool.fetchrow("SELECT * FROM policy_decisions WHERE decision_id = $1", decision_id)


BAD = [
    ({"amount": "-5 GiB*h"}, "amount", "negative"),
    ({"amount": "0 GiB*h"}, "amount", "zero"),
    ({"amount": "10 GB"}, "amount", "does not fit mem.alloc.byte_seconds"),
    ({"amount": "ten"}, "amount", "is not an amount"),
    ({"quota": "nope"}, "quota", "no quota is named 'nope'"),
    ({"quota": "lab-pool"}, "quota", "grant to the group"),
    ({"expires_in": None, "expires_at": "2020-01-01T00:00:00Z"}, "expires_at", "in the past"),
    ({"expires_at": "2030-01-01T00:00:00Z"}, "expires_in", "not both"),
    ({"expires_in": None}, "expires_in", "needs an end"),
    ({"expires_in": "soon"}, "expires_in", "not a duration"),
    ({"expires_in": "99999999999999d"}, "expires_in", "more than 400 days"),
    ({"amount": "1" * 40 + " GiB*h"}, "amount", "too large"),
    ({"expires_in": None, "expires_at": "2030-01-01T00:00:00"}, "expires_at", "time zone"),
    ({"reason": ""}, "reason", ""),
    ({"colour": "blue"}, "colour", "Extra inputs"),
]


@pytest.mark.parametrize(("change", "field", "words"), BAD)
async def test_a_bad_grant_is_refused_with_a_4xx_naming_the_field(
    scene: tuple[httpx.AsyncClient, str, str], pool: asyncpg.Pool,
    change: dict[str, Any], field: str, words: str,
) -> None:  # fmt: skip
    client, alice, _ = scene
    body = {"quota": "memory-30d", "amount": "1 GiB*h", "expires_in": "1d", "reason": "test"}
    body.update(change)
    body = {k: v for k, v in body.items() if v is not None}
    r = await client.post(f"/v1/subjects/{alice}/grants", headers=AS_ADMIN, json=body)
    assert r.status_code == 422, r.text
    assert r.json()["detail"].startswith(f"{field}: ") and words in r.json()["detail"], r.text
    assert await pool.fetchval("SELECT count(*) FROM quota_grants") == 0


async def test_nobody_grants_themselves_and_only_admins_grant(
    scene: tuple[httpx.AsyncClient, str, str],
) -> None:
    client, alice, _ = scene
    body = {"quota": "memory-30d", "amount": "1 GiB*h", "expires_in": "1d", "reason": "please"}
    r = await client.post(f"/v1/subjects/{alice}/grants", headers=as_user(alice), json=body)
    assert r.status_code == 403 and "cannot grant allowance to yourself" in r.json()["detail"]
    for role in (Role.USER, Role.INTEGRATOR, Role.AUDITOR):
        headers = as_user(unique("other"), role)
        r = await client.post(f"/v1/subjects/{alice}/grants", headers=headers, json=body)
        assert r.status_code == 403 and "needs an admin token" in r.json()["detail"], role
        r = await client.post("/v1/grants/g-x/revoke", headers=headers, json={"reason": "x"})
        assert r.status_code == 403
    # A user reads their own grants, not another's (404, as for any other subject).
    r = await client.get(f"/v1/subjects/{alice}/grants", headers=as_user(unique("bob")))
    assert r.status_code == 404
    r = await client.get(f"/v1/subjects/{alice}/grants", headers=as_user(alice))
    assert r.status_code == 200 and r.json()["grants"] == []
    r = await client.post("/v1/grants/g-nothing/revoke", headers=AS_ADMIN, json={"reason": "x"})
    assert r.status_code == 404 and "not found" in r.json()["detail"]
    r = await client.post("/v1/subjects/%00x/grants", headers=AS_ADMIN, json=body)
    assert r.status_code == 422 and r.json()["detail"].startswith("subject: ")


async def test_a_group_pool_grant_raises_the_pool_for_every_member(
    scene: tuple[httpx.AsyncClient, str, str], pool: asyncpg.Pool,
) -> None:  # fmt: skip
    client, _, text = scene
    member = parse_config(text).groups["lab"][0]
    body = {"quota": "lab-pool", "amount": "5 core*h", "expires_in": "2d", "reason": "course"}
    r = await client.post("/v1/groups/lab/grants", headers=AS_ADMIN, json=body)
    assert r.status_code == 201, r.text
    assert (r.json()["scope"], r.json()["target"], r.json()["remaining"]) == ("group", "lab", "5")
    quotas = (await client.get(f"/v1/subjects/{member}/quotas", headers=AS_ADMIN)).json()
    (lab,) = [q for q in quotas["quotas"] if q["name"] == "lab-pool"]
    assert (lab["limit"], lab["base_limit"], lab["grants"][0]["scope"]) == ("15", "10", "group")
    listed = (await client.get(f"/v1/subjects/{member}/grants", headers=as_user(member))).json()
    assert [g["target"] for g in listed["grants"]] == ["lab"]
    r = await client.post("/v1/groups/lab/grants", headers=AS_ADMIN,
                          json={**body, "quota": "memory-30d"})  # fmt: skip
    assert r.status_code == 422 and r.json()["detail"].startswith("quota: ")
    r = await client.post("/v1/groups/lab/grants", headers=as_user(member), json=body)
    assert r.status_code == 403


async def test_the_grants_record_is_append_only_and_its_chain_shows_tampering(
    scene: tuple[httpx.AsyncClient, str, str], pool: asyncpg.Pool, database_url: str,
) -> None:  # fmt: skip
    client, alice, _ = scene
    ids = []
    for n in (1, 2, 3):
        body = {"quota": "memory-30d", "amount": f"{n} GiB*h", "expires_in": "1d", "reason": "x"}
        r = await client.post(f"/v1/subjects/{alice}/grants", headers=AS_ADMIN, json=body)
        ids.append(r.json()["grant_id"])
    await client.post(f"/v1/grants/{ids[0]}/revoke", headers=AS_ADMIN, json={"reason": "y"})
    verdict = (await client.get("/v1/audit/grants/verify", headers=AS_ADMIN)).json()
    assert verdict["ok"] and verdict["records"] == 4
    verified = replay(database_url, "--verify")
    assert verified.returncode == 0 and "grants record, 4 records" in verified.stderr
    for sql in ("UPDATE quota_grants SET amount = amount * 10", "DELETE FROM quota_grants",
                "TRUNCATE quota_grants"):  # fmt: skip
        with pytest.raises(asyncpg.InsufficientPrivilegeError, match="append-only"):
            await pool.execute(sql)
    # Someone with the power to drop the trigger rewrites the second grant: the chain says so.
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("ALTER TABLE quota_grants DISABLE TRIGGER quota_grants_append_only")
        await conn.execute("UPDATE quota_grants SET amount = 200 * 3600 * 2^30 WHERE seq = 2")
        await conn.execute("ALTER TABLE quota_grants ENABLE TRIGGER quota_grants_append_only")
    verdict = (await client.get("/v1/audit/grants/verify", headers=AS_ADMIN)).json()
    assert not verdict["ok"] and verdict["first_bad_seq"] == 2 and verdict["records"] == 1
    assert "do not hash" in verdict["problem"]
    verified = replay(database_url, "--verify")
    assert verified.returncode == 1
    assert "grant record 2 does not hold" in " ".join(verified.stderr.split())


async def _cli(url: str, *args: str) -> tuple[int, str]:
    port = url.rsplit(":", 1)[1]
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "tollgate.cli", "grant", *args,
        env={**os.environ, "TOLLGATE_ADMIN_TOKEN": ADMIN, "TOLLGATE_DATA_DIR": "/nonexistent",
             "TOLLGATE_API_HOST": "127.0.0.1", "TOLLGATE_API_PORT": port, "COLUMNS": "200"},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT,
    )  # fmt: skip
    out, _ = await asyncio.wait_for(proc.communicate(), 60)
    return proc.returncode or 0, " ".join(out.decode().split())


async def test_the_cli_adds_lists_and_revokes_grants_through_the_api(
    tmp_path: Path, servers: Any, database_url: str, pool: asyncpg.Pool
) -> None:
    dana = unique("dana")
    settings = api_settings(tmp_path, database_url=database_url, nats_url=servers.nats_url)
    async with live_api(settings) as url:
        code, out = await _cli(
            url, "add", dana, "--quota", "egress-7d", "--amount", "2 GB", "--expires-in", "3d",
            "--reason", "conference upload",
        )  # fmt: skip
        assert code == 0, out
        assert "granted g-" in out and "2 GB on egress-7d for subject" in out
        gid = out.split("granted ", 1)[1].split(":", 1)[0]
        code, out = await _cli(url, "list", dana)
        assert code == 0 and gid in out and "active" in out and "conference upload" in out
        code, out = await _cli(url, "add", dana, "--quota", "egress-7d", "--amount", "-1 GB",
                               "--expires-in", "1d", "--reason", "x")  # fmt: skip
        assert code == 1 and "refused (422): amount:" in out and "negative" in out
        code, out = await _cli(url, "revoke", gid, "--reason", "upload done")
        assert code == 0 and f"revoked {gid}" in out and "revoked until" in out
        code, out = await _cli(url, "revoke", gid, "--reason", "again")
        assert code == 1 and "refused (409)" in out and "already revoked" in out
        code, out = await _cli(url, "verify")
        assert code == 0 and "OK: 2 grant records" in out


async def test_a_grant_that_runs_out_brings_the_block_back(
    nc: Client, prefix: str, pool: asyncpg.Pool, ledger: None, policy_for: Any, inbox: Inbox,
    tmp_path: Path,
) -> None:  # fmt: skip
    alice = unique("alice")
    text = CONFIG.format(alice=alice, member=unique("member"))
    offset = [timedelta(0)]

    def clock() -> datetime:
        return datetime.now(UTC) + offset[0]

    await policy_for(text, clock=clock, sweep_every=0.2)
    node = Fleet(nc, prefix, unique("node"))
    await node.sample(datetime.now(UTC) - timedelta(hours=1), (alice, "w1", MEM, 3 * GIB_HOUR))
    await wait_until(lambda: _has(inbox, "block", alice, 1), what="the first block")
    settings = Settings(data_dir=tmp_path, admin_token=ADMIN, token_secret=SECRET)
    deps = ApiDeps(pool, nc, ConfigSource.fixed(parse_config(text)), clock=clock, prefix=prefix)
    app = create_app(settings, deps=deps, options=ApiOptions(spawn_check_timeout=1))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.post(
            f"/v1/subjects/{alice}/grants", headers=AS_ADMIN,
            json={"quota": "memory-30d", "amount": "5 GiB*h", "expires_in": "2h", "reason": "x"},
        )  # fmt: skip
        assert r.status_code == 201, r.text
        gid = r.json()["grant_id"]
        await wait_until(lambda: _has(inbox, "unblock", alice, 1), what="the unblock")
        offset[0] = timedelta(hours=3)  # the grant has run out
        await wait_until(lambda: _has(inbox, "block", alice, 2), what="the block to return")
        listed = (await c.get(f"/v1/subjects/{alice}/grants", headers=AS_ADMIN)).json()
    assert listed["grants"][0]["state"] == "expired"
    again = await _decision(pool, "block", alice, after=1)
    assert f"grant {gid} (5 GiB·h) expired" in again["message"]


POOL_CONFIG = """
groups:
  {lab}: [{carol}, {dave}]
quotas:
  - name: lab-pool
    metric: cpu.alloc.seconds
    limit: 10 core*h
    window: {{rolling: 30d}}
    applies_to: {{groups: [{lab}]}}
    per: group
    enforce: [spawn]
"""


async def test_a_group_grant_lifts_the_pools_block_for_every_member(
    nc: Client, prefix: str, pool: asyncpg.Pool, ledger: None, policy_for: Any, inbox: Inbox,
    tmp_path: Path,
) -> None:  # fmt: skip
    lab, carol, dave = unique("lab"), unique("carol"), unique("dave")
    text = POOL_CONFIG.format(lab=lab, carol=carol, dave=dave)
    await policy_for(text, sweep_every=3600)
    node = Fleet(nc, prefix, unique("node"))
    # Carol alone uses up the pool: both members are blocked.
    await node.sample(datetime.now(UTC) - timedelta(hours=1), (carol, "w1", "cpu.alloc.seconds",
                                                               12 * 3600))  # fmt: skip
    for s in (carol, dave):
        await wait_until(lambda s=s: _has(inbox, "block", s, 1), what=f"{s}'s block")
    async with api(tmp_path, pool, nc, prefix, text) as client:
        r = await client.post(
            f"/v1/groups/{lab}/grants", headers=AS_ADMIN,
            json={"quota": "lab-pool", "amount": "5 core*h", "expires_in": "1d",
                  "reason": "course week"},
        )  # fmt: skip
        assert r.status_code == 201, r.text
    for s in (carol, dave):
        await wait_until(lambda s=s: _has(inbox, "unblock", s, 1), what=f"{s}'s unblock")
        decision = await spawn(nc, prefix, _ask(s))
        assert decision.allowed and "12 of 15 core·h" in decision.message, decision.message
