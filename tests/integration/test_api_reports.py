"""GET /v1/reports/usage and `tollgate report`: JSON and CSV agree with the ledger's events."""

from __future__ import annotations

import asyncio
import csv
import io
import json
from collections import defaultdict
from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest
from nats.aio.client import Client
from typer.testing import CliRunner

from infra.settings import Settings
from services.api.app import create_app
from services.api.deps import ApiDeps
from services.api.models import ReportGroupBy
from services.api.options import ApiOptions
from services.api.store import usage_report
from services.api.tokens import Role, issue_token
from services.policy.config import parse_config
from services.policy.source import ConfigSource
from tests.integration.test_api_support import (
    ADMIN,
    QUOTAS,
    SECRET,
    Scene,
    World,
    api_settings,
    live_api,
    seeded_world,
)
from tests.servers import TestServers
from tollgate.cli import app as cli

AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}


@pytest.fixture(scope="module")
async def world(servers: TestServers) -> AsyncIterator[World]:
    async with seeded_world(servers) as w:
        yield w


def client_for(tmp_path: Path, pool: asyncpg.Pool, nc: Client) -> httpx.AsyncClient:
    settings = Settings(data_dir=tmp_path, admin_token=ADMIN, token_secret=SECRET)
    deps = ApiDeps(pool, nc, ConfigSource.fixed(parse_config(QUOTAS)))
    app = create_app(settings, deps=deps, options=ApiOptions())
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


async def ledger_totals(pool: asyncpg.Pool) -> dict[tuple[str, str], Decimal]:
    """Straight from the append-only events, not from the rollups the API reads."""
    rows = await pool.fetch(
        "SELECT subject, metric, sum(delta) AS total FROM usage_events GROUP BY subject, metric"
    )
    return {(r["subject"], r["metric"]): r["total"] for r in rows}


def whole_range(scene: Scene) -> dict[str, str]:
    start = scene.now - timedelta(days=40)
    end = scene.now + timedelta(hours=1)
    return {"from": start.isoformat(), "to": end.isoformat()}


async def test_json_and_csv_reports_agree_with_the_ledger(
    world: World, nc: Client, tmp_path: Path
) -> None:
    scene, pool = world.scene, world.pool
    ledger = await ledger_totals(pool)
    async with client_for(tmp_path, pool, nc) as c:
        as_json = await c.get("/v1/reports/usage", params=whole_range(scene), headers=AS_ADMIN)
        as_csv = await c.get(
            "/v1/reports/usage", params={**whole_range(scene), "format": "csv"}, headers=AS_ADMIN
        )

    assert as_json.status_code == 200, as_json.text
    body = as_json.json()
    from_json = {(r["subject"], r["metric"]): Decimal(r["total"]) for r in body["rows"]}
    assert from_json == ledger == scene.totals()
    assert body["subjects"] == 2
    assert {t["metric"]: Decimal(t["total"]) for t in body["totals"]} == {
        m: sum(v for (_, mm), v in ledger.items() if mm == m) for _, m in ledger
    }
    assert body["as_of_seq"] == await pool.fetchval("SELECT last_seq FROM ledger_head")

    assert as_csv.status_code == 200
    assert as_csv.headers["content-type"].startswith("text/csv")
    assert "attachment" in as_csv.headers["content-disposition"]
    rows = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert list(rows[0]) == ["subject", "metric", "unit", "total", "events"]
    from_csv = {(r["subject"], r["metric"]): Decimal(r["total"]) for r in rows}
    assert from_csv == ledger
    assert [r["events"] for r in rows] == [str(r["events"]) for r in body["rows"]]


@pytest.mark.parametrize("group_by", ["workload", "host", "day"])
async def test_grouped_reports_split_the_same_totals(
    world: World, nc: Client, tmp_path: Path, group_by: str
) -> None:
    scene, pool = world.scene, world.pool
    params = {**whole_range(scene), "group_by": group_by}
    async with client_for(tmp_path, pool, nc) as c:
        as_json = await c.get("/v1/reports/usage", params=params, headers=AS_ADMIN)
        as_csv = await c.get(
            "/v1/reports/usage", params={**params, "format": "csv"}, headers=AS_ADMIN
        )

    rows: list[dict[str, Any]] = as_json.json()["rows"]
    assert all(group_by in r for r in rows)
    sums: dict[tuple[str, str], Decimal] = defaultdict(Decimal)
    for r in rows:
        sums[(r["subject"], r["metric"])] += Decimal(r["total"])
    assert dict(sums) == scene.totals()
    parsed = list(csv.DictReader(io.StringIO(as_csv.text)))
    assert [(r["subject"], r[group_by], r["total"]) for r in parsed] == [
        (r["subject"], str(r[group_by]), r["total"]) for r in rows
    ]


async def test_a_range_counts_only_its_hours_and_a_metric_filter_only_its_metric(
    world: World, nc: Client, tmp_path: Path
) -> None:
    scene, pool = world.scene, world.pool
    since = scene.now - timedelta(days=7)
    params = {"from": since.isoformat(), "to": scene.now.isoformat(), "metric": "log.bytes"}
    async with client_for(tmp_path, pool, nc) as c:
        r = await c.get("/v1/reports/usage", params=params, headers=AS_ADMIN)

    body = r.json()
    assert [(row["subject"], row["metric"]) for row in body["rows"]] == [("alice", "log.bytes")]
    start = since.replace(minute=0, second=0, microsecond=0)
    assert body["from"] == start.strftime("%Y-%m-%dT%H:%M:%SZ")
    assert Decimal(body["rows"][0]["total"]) == scene.total("alice", "log.bytes", since=start)


async def test_a_report_too_large_to_serve_says_how_to_narrow_it(world: World) -> None:
    scene, pool = world.scene, world.pool
    start, end = scene.now - timedelta(days=40), scene.now + timedelta(hours=1)

    small = await usage_report(pool, start, end, None, ReportGroupBy.SUBJECT, max_rows=2)
    whole = await usage_report(pool, start, end, None, ReportGroupBy.SUBJECT, max_rows=100)

    assert small.truncated and len(small.rows) == 2
    assert not whole.truncated and len(whole.rows) == len(scene.totals())


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("format=xml", "format: Input should be 'json' or 'csv'"),
        ("group_by=week", "group_by: Input should be 'subject', 'workload', 'host' or 'day'"),
        ("from=last-week", "from: 'last-week' is not an ISO-8601 time"),
        ("from=2031-05-02T00:00:00Z&to=2031-05-01T00:00:00Z", "must be before to"),
        ("from=2020-01-01T00:00:00Z&to=2031-05-01T00:00:00Z", "at most 400 days"),
        ("metric=CPU", "metric: 'CPU' is not a metric name"),
        ("to=99999-01-01T00:00:00Z", "is not an ISO-8601 time"),
    ],
)
async def test_bad_report_queries_get_422_with_a_clear_message(
    world: World, nc: Client, tmp_path: Path, query: str, says: str
) -> None:
    async with client_for(tmp_path, world.pool, nc) as c:
        r = await c.get(f"/v1/reports/usage?{query}", headers=AS_ADMIN)

    assert r.status_code == 422, r.text
    assert says in r.json()["detail"]


def run_cli(args: list[str], env: dict[str, str]) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, ["report", *args], env=env)
    return result.exit_code, result.stdout, result.stderr


async def test_tollgate_report_prints_the_apis_report_as_csv_json_and_a_table(
    servers: TestServers, world: World, tmp_path: Path
) -> None:
    scene, pool = world.scene, world.pool
    settings = api_settings(tmp_path, database_url=world.url, nats_url=servers.nats_url)
    window = whole_range(scene)
    async with live_api(settings) as url:
        (tmp_path / "endpoints.json").write_text(json.dumps({"api_url": url}))
        env = {"TOLLGATE_DATA_DIR": str(tmp_path), "TOLLGATE_ADMIN_TOKEN": ADMIN, "COLUMNS": "160"}
        span = ["--from", window["from"], "--to", window["to"]]
        code_csv, out_csv, _ = await asyncio.to_thread(run_cli, [*span, "-f", "csv"], env)
        code_json, out_json, _ = await asyncio.to_thread(run_cli, [*span, "-f", "json"], env)
        code_table, out_table, _ = await asyncio.to_thread(run_cli, span, env)
        bad, _, says = await asyncio.to_thread(run_cli, ["--from", "soon"], env)
        async with httpx.AsyncClient() as http:
            api_csv = await http.get(
                f"{url}/v1/reports/usage", params={**window, "format": "csv"}, headers=AS_ADMIN
            )

    assert (code_csv, code_json, code_table) == (0, 0, 0)
    assert out_csv == api_csv.text.replace("\r\n", "\n")  # the runner normalises newlines
    ledger = await ledger_totals(pool)
    rows = json.loads(out_json)["rows"]
    assert {(r["subject"], r["metric"]): Decimal(r["total"]) for r in rows} == ledger
    assert "alice" in out_table and "bob" in out_table
    assert "5.8 GB" in out_table and "50 GiB·h" in out_table
    assert bad == 1 and "from: 'soon' is not an ISO-8601 time" in says


async def test_tollgate_report_says_what_to_do_when_it_cannot_ask(tmp_path: Path) -> None:
    (tmp_path / "endpoints.json").write_text(json.dumps({"api_url": "http://127.0.0.1:9"}))
    env = {"TOLLGATE_DATA_DIR": str(tmp_path), "TOLLGATE_ADMIN_TOKEN": ""}

    no_token = await asyncio.to_thread(run_cli, [], env)
    no_api = await asyncio.to_thread(run_cli, [], {**env, "TOLLGATE_ADMIN_TOKEN": "t"})

    assert no_token[0] == 2 and "no admin token: set TOLLGATE_ADMIN_TOKEN" in no_token[2]
    assert no_api[0] == 2 and "cannot reach the API at http://127.0.0.1:9" in no_api[2]
    assert "tollgate up" in no_api[2]


async def test_a_report_asked_with_a_user_token_says_which_token_it_needs(
    world: World, nc: Client, tmp_path: Path
) -> None:
    token = issue_token(SECRET, "alice", Role.USER, timedelta(hours=1))
    async with client_for(tmp_path, world.pool, nc) as c:
        r = await c.get("/v1/reports/usage", headers={"Authorization": f"Bearer {token}"})

    assert r.status_code == 403
    assert r.json()["detail"].startswith(
        "A usage report needs an admin token; yours is a user token. Use the admin token"
    )
