"""GET /v1/workloads/{workload}: owner, host, lifecycle, termination and usage per metric."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path

import asyncpg
import httpx
import pytest
from nats.aio.client import Client

from contracts._base import format_decimal
from infra.settings import Settings
from services.api.app import create_app
from services.api.deps import ApiDeps
from services.api.options import ApiOptions
from services.api.tokens import Role, issue_token
from services.policy.config import parse_config
from services.policy.source import ConfigSource
from tests.integration.test_api import Ledger
from tests.integration.test_api_support import (
    ADMIN,
    CPU,
    LOG,
    MEM,
    NET,
    QUOTAS,
    SECRET,
    World,
    seeded_world,
)
from tests.servers import TestServers

AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}


def as_user(subject: str) -> dict[str, str]:
    return {
        "Authorization": f"Bearer {issue_token(SECRET, subject, Role.USER, timedelta(hours=1))}"
    }


@pytest.fixture(scope="module")
async def world(servers: TestServers) -> AsyncIterator[World]:
    async with seeded_world(servers) as w:
        yield w


@pytest.fixture
def pool(world: World) -> asyncpg.Pool:
    return world.pool


@pytest.fixture
async def client(world: World, nc: Client, tmp_path: Path) -> httpx.AsyncClient:
    pool = world.pool
    settings = Settings(data_dir=tmp_path, admin_token=ADMIN, token_secret=SECRET)
    deps = ApiDeps(pool, nc, ConfigSource.fixed(parse_config(QUOTAS)))
    app = create_app(settings, deps=deps, options=ApiOptions())
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def test_a_terminated_workload_shows_why_and_what_it_used(
    client: httpx.AsyncClient, pool: asyncpg.Pool, world: World
) -> None:
    scene = world.scene

    r = await client.get(f"/v1/workloads/{scene.workload}", headers=as_user("alice"))

    assert r.status_code == 200, r.text
    body = r.json()
    assert (body["workload"], body["subject"], body["host"], body["hosts"]) == (
        "train-42", "alice", "node-3", ["node-3"],
    )  # fmt: skip
    assert body["state"] == "terminated"
    assert body["state_detail"].startswith("terminated at ")
    assert (body["exit_status"], body["termination_reason"]) == (
        143,
        "data_transfer_quota_exceeded",
    )
    assert body["termination"]["decision_id"] == "term-train-42"
    assert "used 5.1 of 5 GB (egress-7d)" in body["termination"]["message"]
    assert body["resources"] == {"cpus": "2", "mem_bytes": 4 * 2**30, "gpus": 0, "gpu_model": None}
    assert body["usage"] == [
        {"metric": NET, "unit": "B", "total": format_decimal(scene.total("alice", NET)),
         "events": 4},
    ]  # fmt: skip
    assert body["started_at"] < body["stopped_at"]
    assert body["usage_from"] < body["usage_to"]


async def test_a_running_workload_sums_each_metric(
    client: httpx.AsyncClient, pool: asyncpg.Pool, world: World
) -> None:
    scene = world.scene

    r = await client.get("/v1/workloads/jupyter-alice", headers=AS_ADMIN)

    body = r.json()
    assert (body["state"], body["stopped_at"], body["termination"]) == ("running", None, None)
    assert {u["metric"]: Decimal(u["total"]) for u in body["usage"]} == {
        m: scene.total("alice", m) for m in (CPU, LOG, MEM)
    }


async def test_a_workload_known_only_from_usage_is_unknown_with_its_hours(
    client: httpx.AsyncClient, pool: asyncpg.Pool, world: World
) -> None:
    scene = world.scene
    ledger = Ledger(pool)
    await ledger.read("node-5", "alice", "raw-job", LOG, 100, scene.now - timedelta(hours=3))
    await ledger.read("node-6", "alice", "raw-job", LOG, 50, scene.now - timedelta(hours=1))

    r = await client.get("/v1/workloads/raw-job", headers=as_user("alice"))

    body = r.json()
    assert (body["state"], body["host"], body["hosts"]) == ("unknown", None, ["node-5", "node-6"])
    assert "no start or stop event reached the policy" in body["state_detail"]
    assert body["usage"][0]["total"] == "150"  # one series per host
    assert body["started_at"] is None and body["resources"] is None


async def test_a_stopped_workload_without_usage_still_has_its_lifecycle(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:

    r = await client.get("/v1/workloads/etl-7", headers=as_user("alice"))

    body = r.json()
    assert (body["state"], body["exit_status"], body["usage"]) == ("stopped", 0, [])
    assert body["state_detail"].endswith("with exit status 0")


async def test_a_name_two_subjects_used_asks_an_admin_which_one(
    client: httpx.AsyncClient, pool: asyncpg.Pool, world: World
) -> None:
    scene = world.scene
    ledger = Ledger(pool)
    await ledger.read("n1", "alice", "shared-name", LOG, 10, scene.now)
    # A figure no timestamp or id in alice's answer could contain by chance.
    await ledger.read("n2", "carol", "shared-name", LOG, 9_876_543_211, scene.now)

    ambiguous = await client.get("/v1/workloads/shared-name", headers=AS_ADMIN)
    carols = await client.get("/v1/workloads/shared-name?subject=carol", headers=AS_ADMIN)
    alices = await client.get("/v1/workloads/shared-name", headers=as_user("alice"))
    asking_for_carol = await client.get(
        "/v1/workloads/shared-name?subject=carol", headers=as_user("alice")
    )

    assert ambiguous.status_code == 409
    assert "alice, carol; add ?subject=NAME" in ambiguous.json()["detail"]
    assert (carols.json()["subject"], carols.json()["usage"][0]["total"]) == (
        "carol",
        "9876543211",
    )
    assert (alices.json()["subject"], alices.json()["usage"][0]["total"]) == ("alice", "10")
    assert "9876543211" not in alices.text and "carol" not in alices.text
    assert asking_for_carol.status_code == 404


@pytest.mark.parametrize(
    ("path", "status", "says"),
    [
        ("/v1/workloads/nothing-here", 404, "workload not found"),
        ("/v1/workloads/" + "w" * 201, 422, "workload: String should have at most 200"),
        ("/v1/workloads/w?subject=" + "s" * 201, 422, "subject: String should have at most 200"),
    ],
)
async def test_missing_and_malformed_workloads_are_4xx(
    client: httpx.AsyncClient, path: str, status: int, says: str
) -> None:
    r = await client.get(path, headers=AS_ADMIN)

    assert r.status_code == status, r.text
    assert says in r.json()["detail"]
