"""GET /v1/events and /v1/audit/verify: the ledger as auditors read it over HTTP."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest
from nats.aio.client import Client

from contracts.samples import samples_subject
from infra.settings import Settings
from services.api.app import create_app
from services.api.deps import ApiDeps
from services.api.tokens import Role, issue_token
from services.policy.config import parse_config
from services.policy.source import ConfigSource
from tests.conftest import unique, wait_until
from tests.integration.conftest import batch_json
from tests.integration.test_replay import seed

SECRET = "audit-test-secret"
ADMIN = "audit-admin"


def token(role: Role, subject: str = "someone") -> dict[str, str]:
    value = issue_token(SECRET, subject, role, timedelta(hours=1), now=datetime.now(UTC))
    return {"Authorization": f"Bearer {value}"}


@pytest.fixture
async def client(
    pool: asyncpg.Pool, nc: Client, tmp_path: Path
) -> AsyncIterator[httpx.AsyncClient]:
    settings = Settings(data_dir=tmp_path, admin_token=ADMIN, token_secret=SECRET)
    app = create_app(settings, deps=ApiDeps(pool, nc, ConfigSource.fixed(parse_config("{}"))))
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
        yield c


async def test_events_stream_in_order_after_a_sequence_as_ndjson(
    pool: asyncpg.Pool, client: httpx.AsyncClient
) -> None:
    await seed(pool, n=8)
    total = await pool.fetchval("SELECT count(*) FROM usage_events")
    r = await client.get("/v1/events", params={"after": 2, "limit": 5}, headers=token(Role.AUDITOR))
    assert r.status_code == 200
    assert r.headers["content-type"].startswith("application/x-ndjson")
    events = [json.loads(line) for line in r.text.splitlines()]
    assert [e["seq"] for e in events] == [3, 4, 5, 6, 7]
    everything = await client.get(
        "/v1/events", params={"limit": 100000}, headers={"Authorization": f"Bearer {ADMIN}"}
    )
    assert len(everything.text.splitlines()) == total


async def test_verify_reports_the_chain_and_the_first_bad_batch(
    pool: asyncpg.Pool, client: httpx.AsyncClient
) -> None:
    await seed(pool, n=6)
    ok = (await client.get("/v1/audit/verify", headers=token(Role.AUDITOR))).json()
    assert ok["ok"] and ok["batches"] == 6 and ok["first_bad_batch"] is None
    async with pool.acquire() as conn, conn.transaction():
        await conn.execute("SET LOCAL session_replication_role = replica")
        await conn.execute("UPDATE usage_events SET subject = 'mallory' WHERE batch_id = 5")
    bad = (await client.get("/v1/audit/verify", headers=token(Role.AUDITOR))).json()
    assert (bad["ok"], bad["first_bad_batch"], bad["batches"]) == (False, 5, 4)


@pytest.mark.parametrize("role", [Role.USER, Role.INTEGRATOR])
async def test_users_and_integrators_may_not_read_the_whole_ledger(
    pool: asyncpg.Pool, client: httpx.AsyncClient, role: Role
) -> None:
    subject = await seed(pool, n=2)
    for path in ("/v1/events", "/v1/audit/verify"):
        r = await client.get(path, headers=token(role, subject))
        assert r.status_code == 403
        assert subject not in r.text and "auditor" in r.json()["detail"]
    assert (await client.get("/v1/events")).status_code == 401


@pytest.mark.parametrize("params", [{"after": -1}, {"limit": 0}, {"limit": 10**9}, {"after": "x"}])
async def test_bad_event_ranges_are_422(client: httpx.AsyncClient, params: dict) -> None:
    r = await client.get("/v1/events", params=params, headers=token(Role.AUDITOR))
    assert r.status_code == 422


async def test_metrics_count_what_the_ledger_folded(
    nc, prefix: str, pool: asyncpg.Pool, ledger, client: httpx.AsyncClient
) -> None:
    def value(text: str, name: str) -> float:
        line = next(x for x in text.splitlines() if x.startswith(name + " "))
        return float(line.split()[1])

    before = (await client.get("/metrics")).text
    host, subject = unique("h"), unique("s")
    counters = [{"subject": subject, "workload": "w", "metric": "log.bytes", "value": 9}]
    await nc.jetstream().publish(samples_subject(host, prefix), batch_json(host, "e", 1, counters))
    await nc.jetstream().publish(samples_subject(host, prefix), b"not json")

    async def counted() -> bool:
        text = (await client.get("/metrics")).text
        return (
            value(text, "tollgate_ledger_events_total")
            > value(before, "tollgate_ledger_events_total")
            and 'reason="invalid_json"' in text
        )

    await wait_until(counted, what="ledger metrics on /metrics")
