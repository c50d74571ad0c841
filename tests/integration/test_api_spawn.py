"""POST /v1/spawn-checks: forwarded to the policy over NATS, or answered by failure_mode."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg

from contracts.spawn import SpawnRequest, spawn_check_subject
from infra.settings import Settings
from services.api.app import create_app
from services.api.deps import ApiDeps
from services.api.options import ApiOptions
from services.api.tokens import Role, issue_token
from services.policy.app import SpawnCheckResponder
from services.policy.config import parse_config
from services.policy.service import PolicyService
from services.policy.source import ConfigSource
from tests.conftest import wait_until
from tests.integration.test_api_support import ADMIN, QUOTAS, SECRET, seed_scene

AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}
GIB = 2**30


def client_for(
    tmp_path: Path, pool: asyncpg.Pool, nc: Client | None, prefix: str, quotas: str = QUOTAS
) -> httpx.AsyncClient:
    settings = Settings(data_dir=tmp_path, admin_token=ADMIN, token_secret=SECRET)
    deps = ApiDeps(pool, nc, ConfigSource.fixed(parse_config(quotas)), prefix=prefix)
    app = create_app(settings, deps=deps, options=ApiOptions(spawn_check_timeout=1))
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


@pytest.fixture
async def policy(
    nc: Client, pool: asyncpg.Pool, prefix: str, streams: None, tmp_path: Path
) -> AsyncIterator[PolicyService]:
    """The real policy answering spawn checks on this test's prefix."""
    path = tmp_path / "quotas.yaml"
    path.write_text(QUOTAS)
    service = PolicyService(nc, pool, ConfigSource.load(path), prefix)
    responder = SpawnCheckResponder(nc, prefix, service.checker)
    await responder.start()
    stop = asyncio.Event()
    task = asyncio.create_task(service.run(stop))

    async def ready() -> bool:
        return service.ready.is_set()

    await wait_until(ready, 20, "the policy to load its state")
    try:
        yield service
    finally:
        stop.set()
        await responder.stop()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)


async def test_the_policys_decision_comes_back_as_over_nats(
    nc: Client, pool: asyncpg.Pool, prefix: str, policy: PolicyService, tmp_path: Path
) -> None:
    await seed_scene(pool)
    ask = SpawnRequest(subject="alice", workload="nb-2", resources={"mem_bytes": 4 * GIB})
    await wait_until(_policy_sees(nc, prefix, ask), 20, "the policy to see alice's usage")

    async with client_for(tmp_path, pool, nc, prefix) as c:
        r = await c.post("/v1/spawn-checks", json=json.loads(ask.to_json()), headers=AS_ADMIN)

    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["schema"], body["allowed"], body["reason"]) == (
        "tollgate.spawn_decision.v1", False, "quota_exceeded",
    )  # fmt: skip
    assert "You have used 5.8 of 5 GB (egress-7d)" in body["message"]
    assert body["fail_open"] is False
    egress = next(q for q in body["quotas"] if q["name"] == "egress-7d")
    assert (egress["used"], egress["limit"], egress["state"]) == ("5.8", "5", "exceeded")

    async def stored() -> bool:
        row = await pool.fetchrow(
            "SELECT subject, allowed FROM policy_decisions WHERE decision_id = $1",
            body["decision_id"],
        )
        return row is not None and (row["subject"], row["allowed"]) == ("alice", False)

    # The policy journals its decisions itself; the API only relays this one.
    await wait_until(stored, 20, "the policy to store the decision")


def _policy_sees(nc: Client, prefix: str, ask: SpawnRequest) -> Callable[[], Awaitable[bool]]:
    async def check() -> bool:
        reply = await nc.request(spawn_check_subject(prefix), ask.to_json(), timeout=5)
        return json.loads(reply.data).get("reason") == "quota_exceeded"

    return check


@pytest.mark.parametrize(
    ("mode", "allowed", "says"),
    [("open", True, "was allowed (failure_mode: open)"),
     ("closed", False, "spawns are refused until it answers again (failure_mode: closed)")],
)  # fmt: skip
async def test_without_a_policy_the_answer_follows_failure_mode_and_is_stored(
    nc: Client, pool: asyncpg.Pool, prefix: str, tmp_path: Path, mode: str, allowed: bool, says: str
) -> None:
    quotas = QUOTAS.replace("failure_mode: open", f"failure_mode: {mode}")
    ask = {"subject": "carol", "groups": ["regular"], "workload": "nb-9"}
    async with client_for(tmp_path, pool, nc, prefix, quotas) as c:
        r = await c.post("/v1/spawn-checks", json=ask, headers=AS_ADMIN)

    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["allowed"], body["fail_open"], body["reason"]) == (
        allowed, allowed, "policy_unavailable",
    )  # fmt: skip
    assert says in body["message"]
    assert f"no policy service listens on {spawn_check_subject(prefix)}" in body["message"]
    row = await pool.fetchrow(
        "SELECT * FROM policy_decisions WHERE decision_id = $1", body["decision_id"]
    )
    assert row is not None
    assert (row["subject"], row["workload"], row["allowed"], row["fail_open"]) == (
        "carol", "nb-9", allowed, allowed,
    )  # fmt: skip
    assert list(row["groups"]) == ["regular"]
    assert json.loads(row["inputs"])["decided_by"] == "api"


async def test_without_nats_the_answer_says_so(pool: asyncpg.Pool, tmp_path: Path) -> None:
    async with client_for(tmp_path, pool, None, "tollgate") as c:
        r = await c.post("/v1/spawn-checks", json={"subject": "carol"}, headers=AS_ADMIN)

    assert r.status_code == 200
    assert "the API is not connected to NATS" in r.json()["message"]


async def test_a_policy_that_is_too_slow_or_garbled_is_reported(
    nc: Client, pool: asyncpg.Pool, prefix: str, tmp_path: Path
) -> None:
    replies: list[bytes | None] = [
        None,
        b"not json",
        b'{"schema": "tollgate.error.v1", "message": "bad"}',
    ]

    async def fake_policy(msg: Msg) -> None:
        reply = replies.pop(0)
        if reply is not None:  # None: never answer
            await msg.respond(reply)

    sub = await nc.subscribe(spawn_check_subject(prefix), cb=fake_policy)
    try:
        async with client_for(tmp_path, pool, nc, prefix) as c:
            slow = await c.post("/v1/spawn-checks", json={"subject": "x"}, headers=AS_ADMIN)
            garbled = await c.post("/v1/spawn-checks", json={"subject": "x"}, headers=AS_ADMIN)
            refused = await c.post("/v1/spawn-checks", json={"subject": "x"}, headers=AS_ADMIN)
    finally:
        await sub.unsubscribe()

    assert slow.status_code == 200 and "did not answer within 1 s" in slow.json()["message"]
    assert garbled.status_code == 502 and "not a spawn decision" in garbled.json()["detail"]
    assert refused.status_code == 422 and refused.json()["detail"] == "bad"


@pytest.mark.parametrize(
    ("body", "says"),
    [
        ({}, "subject: Field required"),
        ({"subject": ""}, "subject: must be 1 to 200 characters"),
        ({"subject": "a", "expected_seconds": -1}, "expected_seconds"),
        ({"subject": "a", "expected_seconds": 10**12}, "expected_seconds"),
        ({"subject": "a", "resources": {"mem_bytes": 2**70}}, "mem_bytes"),
        ({"subject": "a", "resources": {"cpus": "NaN"}}, "cpus"),
        ({"subject": "a", "schema": "tollgate.spawn_request.v9"}, "schema"),
        ({"subject": "a", "groups": ["g"] * 101}, "groups"),
    ],
)
async def test_bad_spawn_requests_get_422_naming_the_field(
    pool: asyncpg.Pool, tmp_path: Path, body: dict[str, object], says: str
) -> None:
    async with client_for(tmp_path, pool, None, "tollgate") as c:
        r = await c.post("/v1/spawn-checks", json=body, headers=AS_ADMIN)
        not_json = await c.post(
            "/v1/spawn-checks",
            content=b"{",
            headers={**AS_ADMIN, "Content-Type": "application/json"},
        )

    assert r.status_code == 422, r.text
    assert says in r.json()["detail"]
    assert not_json.status_code == 422 and "JSON" in not_json.json()["detail"]


async def test_a_spawn_check_with_an_auditor_token_says_which_token_it_needs(
    pool: asyncpg.Pool, tmp_path: Path
) -> None:
    token = issue_token(SECRET, "audit", Role.AUDITOR, timedelta(hours=1))
    async with client_for(tmp_path, pool, None, "tollgate") as c:
        r = await c.post(
            "/v1/spawn-checks", json={"subject": "a"}, headers={"Authorization": f"Bearer {token}"}
        )

    assert r.status_code == 403
    assert r.json()["detail"] == (
        "A spawn check needs an admin or integrator token; yours is an auditor token. "
        "Ask an admin for one: `tollgate token issue --subject NAME --role integrator`."
    )
