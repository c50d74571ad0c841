"""Who may call what: every endpoint for every kind of caller, and no one else's data in any body.

The callers are alice (the owner of the data asked for), bob (another user), the admin,
an auditor, an integrator, and alice without a token, with an expired one and with a
tampered one. Each answer is the status the API promises; the body of every answer to a
user holds nothing of the other user's (names, workloads, totals).
"""

from __future__ import annotations

import base64
import json
import re
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import httpx
import nats
import pytest
from nats.aio.client import Client

from contracts._base import format_decimal
from infra.settings import Settings
from services.api.app import create_app
from services.api.deps import ApiDeps
from services.api.options import ApiOptions
from services.api.routes.web import COOKIE
from services.api.tokens import Role, issue_token
from services.policy.config import parse_config
from services.policy.source import ConfigSource
from tests.conftest import unique
from tests.integration.test_api_support import (
    ADMIN,
    BOB_EGRESS_BYTES,
    BOB_MEMORY_GIB_H,
    GIB_H,
    MEM,
    NET,
    QUOTAS,
    SECRET,
    Scene,
    seeded_world,
)
from tests.servers import TestServers

H = timedelta(hours=1)
CALLERS = ["owner", "other", "admin", "auditor", "integrator", "none", "expired", "tampered"]
READERS = {"owner": 200, "other": 404, "admin": 200, "auditor": 200, "integrator": 200}
UNAUTHENTICATED = {"none": 401, "expired": 401, "tampered": 401}
# What each endpoint answers each caller (SPEC §4; auditors read subjects too, see README).
EXPECTED: dict[str, dict[str, int]] = {
    "quotas": {**READERS, **UNAUTHENTICATED},
    "usage": {**READERS, **UNAUTHENTICATED},
    "workload": {**READERS, **UNAUTHENTICATED},
    "spawn-check": {"owner": 403, "other": 403, "admin": 200, "auditor": 403,
                    "integrator": 200, **UNAUTHENTICATED},
    "report": {"owner": 403, "other": 403, "admin": 200, "auditor": 403, "integrator": 403,
               **UNAUTHENTICATED},
    "events": {"owner": 403, "other": 403, "admin": 200, "auditor": 200, "integrator": 403,
               **UNAUTHENTICATED},
    "verify": {"owner": 403, "other": 403, "admin": 200, "auditor": 200, "integrator": 403,
               **UNAUTHENTICATED},
    # The page answers a missing cookie with its sign-in form, a bad one with 401.
    "page": {**READERS, "none": 200, "expired": 401, "tampered": 401},
    "healthz": dict.fromkeys(CALLERS, 200),
    "metrics": dict.fromkeys(CALLERS, 200),
    "openapi": dict.fromkeys(CALLERS, 200),
}  # fmt: skip


def _tampered(token: str) -> str:
    """Alice's token with its claims rewritten to bob's, keeping alice's signature."""
    version, claims, signature = token.split(".")
    data = json.loads(base64.urlsafe_b64decode(claims + "=" * (-len(claims) % 4)))
    data["sub"] = "bob"
    forged = base64.urlsafe_b64encode(json.dumps(data).encode()).rstrip(b"=").decode()
    return f"{version}.{forged}.{signature}"


def tokens() -> dict[str, str | None]:
    now = datetime.now(UTC)
    alice = issue_token(SECRET, "alice", Role.USER, H, now=now)
    return {
        "owner": alice,
        "other": issue_token(SECRET, "bob", Role.USER, H, now=now),
        "admin": ADMIN,
        "auditor": issue_token(SECRET, "audit-svc", Role.AUDITOR, H, now=now),
        "integrator": issue_token(SECRET, "hub", Role.INTEGRATOR, H, now=now),
        "none": None,
        "expired": issue_token(SECRET, "alice", Role.USER, H, now=now - 3 * H),
        "tampered": _tampered(alice),
    }


@pytest.fixture(scope="module")
async def world(servers: TestServers) -> AsyncIterator[tuple[Scene, asyncpg.Pool, Client]]:
    """One seeded database and a NATS connection on a prefix no policy listens on."""
    async with seeded_world(servers) as w:
        nc = await nats.connect(servers.nats_url)
        try:
            yield w.scene, w.pool, nc
        finally:
            await nc.close()


@pytest.fixture(scope="module")
async def client(
    world: tuple[Scene, asyncpg.Pool, Client], tmp_path_factory: pytest.TempPathFactory
) -> AsyncIterator[httpx.AsyncClient]:
    _, pool, nc = world
    settings = Settings(
        data_dir=tmp_path_factory.mktemp("matrix"), admin_token=ADMIN, token_secret=SECRET
    )
    deps = ApiDeps(pool, nc, ConfigSource.fixed(parse_config(QUOTAS)), prefix=unique("t"))
    app = create_app(settings, deps=deps, options=ApiOptions(api_rate_per_second=0))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c


async def call(client: httpx.AsyncClient, endpoint: str, token: str | None) -> httpx.Response:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    if endpoint == "page":
        client.cookies.clear()
        if token:
            client.cookies.set(COOKIE, token)
        return await client.get("/", params={"subject": "alice"})
    if endpoint == "spawn-check":
        body = {"subject": "alice", "workload": "nb-1", "resources": {"mem_bytes": 2**30}}
        return await client.post("/v1/spawn-checks", json=body, headers=headers)
    path = {
        "quotas": "/v1/subjects/alice/quotas",
        "usage": "/v1/subjects/alice/usage",
        "workload": "/v1/workloads/train-42",
        "report": "/v1/reports/usage",
        "events": "/v1/events",
        "verify": "/v1/audit/verify",
        "healthz": "/healthz",
        "metrics": "/metrics",
        "openapi": "/openapi.json",
    }[endpoint]
    return await client.get(path, headers=headers)


def secrets_of(scene: Scene, user: str) -> list[str]:
    """Strings that only a reader of `user`'s data could have put in a body."""
    if user == "bob":
        return [
            "bob",
            scene.bob_workload,
            str(BOB_EGRESS_BYTES),
            format_decimal(BOB_MEMORY_GIB_H * GIB_H),
        ]
    return [
        "alice", scene.workload, "jupyter-alice",
        format_decimal(scene.total("alice", NET)), format_decimal(scene.total("alice", MEM)),
    ]  # fmt: skip


@pytest.mark.parametrize("caller", CALLERS)
@pytest.mark.parametrize("endpoint", list(EXPECTED))
async def test_each_caller_gets_what_the_api_promises_and_nothing_of_others(
    client: httpx.AsyncClient,
    world: tuple[Scene, asyncpg.Pool, Client],
    endpoint: str,
    caller: str,
) -> None:
    scene = world[0]
    r = await call(client, endpoint, tokens()[caller])

    assert r.status_code == EXPECTED[endpoint][caller], r.text[:500]
    body = r.text
    if caller in ("owner", "other"):
        stranger = "bob" if caller == "owner" else "alice"
        for secret in secrets_of(scene, stranger):
            assert not _holds(body, secret), f"{secret!r} leaked to {caller} by {endpoint}"
    if caller in UNAUTHENTICATED:
        for secret in secrets_of(scene, "bob") + secrets_of(scene, "alice")[1:]:
            assert not _holds(body, secret), f"{secret!r} leaked to {caller} by {endpoint}"
    if endpoint in ("healthz", "metrics", "openapi"):
        assert "alice" not in body and "bob" not in body
    if r.status_code == 200 and caller in READERS:
        _check_content(endpoint, r, scene)


def _holds(body: str, secret: str) -> bool:
    """`secret` in `body` as a whole word or number: a total of 5800000000 is not leaked by
    a CPU time of 16.580000000000002 in /metrics (seen once)."""
    return re.search(rf"(?<![\w.]){re.escape(secret)}(?![\w])", body) is not None


def _check_content(endpoint: str, r: httpx.Response, scene: Scene) -> None:
    """A 200 carries the data asked for, not an empty shell."""
    if endpoint == "quotas":
        states = {q["name"]: q["state"] for q in r.json()["quotas"]}
        assert states == {"memory-30d": "warning", "egress-7d": "exceeded", "cpu-month": "ok"}
    elif endpoint == "usage":
        totals = {row["metric"]: row["total"] for row in r.json()["rows"]}
        assert totals[NET] == format_decimal(scene.total("alice", NET))
    elif endpoint == "workload":
        body: dict[str, Any] = r.json()
        assert (body["subject"], body["state"], body["host"]) == ("alice", "terminated", "node-3")
        assert body["termination_reason"] == "data_transfer_quota_exceeded"
        assert body["termination"]["decision_id"] == "term-train-42"
        assert [u["metric"] for u in body["usage"]] == [NET]
    elif endpoint == "spawn-check":
        decision = r.json()
        assert (decision["allowed"], decision["fail_open"]) == (True, True)
        assert decision["reason"] == "policy_unavailable"
    elif endpoint == "report":
        subjects = {row["subject"] for row in r.json()["rows"]}
        assert subjects == {"alice", "bob"}
    elif endpoint == "events":
        assert len(r.text.splitlines()) == r.text.count('"seq"') > 0
    elif endpoint == "verify":
        assert r.json()["ok"] is True
    elif endpoint == "page":
        assert "<h1>alice</h1>" in r.text and 'data-quota="egress-7d"' in r.text


@pytest.mark.parametrize("endpoint", ["usage", "quotas", "workload", "page"])
async def test_another_users_data_looks_exactly_like_data_that_does_not_exist(
    client: httpx.AsyncClient, endpoint: str
) -> None:
    as_bob = tokens()["other"]
    assert as_bob is not None
    paths = {
        "usage": ("/v1/subjects/alice/usage", "/v1/subjects/nobody/usage"),
        "quotas": ("/v1/subjects/alice/quotas", "/v1/subjects/nobody/quotas"),
        "workload": ("/v1/workloads/train-42", "/v1/workloads/no-such-workload"),
    }
    if endpoint == "page":
        client.cookies.set(COOKIE, as_bob)
        existing = await client.get("/", params={"subject": "alice"})
        missing = await client.get("/", params={"subject": "nobody"})
        client.cookies.clear()
    else:
        headers = {"Authorization": f"Bearer {as_bob}"}
        existing = await client.get(paths[endpoint][0], headers=headers)
        missing = await client.get(paths[endpoint][1], headers=headers)

    assert existing.status_code == missing.status_code == 404
    assert existing.content == missing.content
