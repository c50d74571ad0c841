"""GET /metrics: Prometheus text with the API's requests and what Postgres and JetStream say."""

from __future__ import annotations

from pathlib import Path

import asyncpg
import httpx
from nats.aio.client import Client
from prometheus_client.parser import text_string_to_metric_families

from contracts.samples import samples_subject
from infra.settings import Settings
from services.api.app import create_app
from services.api.deps import ApiDeps
from services.api.options import ApiOptions
from services.ledger.app import LedgerService
from services.policy.config import parse_config
from services.policy.source import ConfigSource
from tests.conftest import unique, wait_until
from tests.integration.conftest import batch_json
from tests.integration.test_api_support import ADMIN, QUOTAS, SECRET, seed_scene

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def parse(text: str) -> Samples:
    return {
        (s.name, frozenset(s.labels.items())): s.value
        for family in text_string_to_metric_families(text)
        for s in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def test_metrics_report_requests_ledger_lag_backlog_decisions_and_dead_letters(
    nc: Client, pool: asyncpg.Pool, prefix: str, ledger: LedgerService, tmp_path: Path
) -> None:
    await seed_scene(pool)
    host = unique("h")
    js = nc.jetstream()
    counters = [{"subject": "carol", "workload": "w", "metric": "log.bytes", "value": 5}]
    await js.publish(samples_subject(host, prefix), batch_json(host, "e", 1, counters))
    await js.publish(samples_subject(host, prefix), b"{not json")

    async def folded() -> bool:
        return bool(await pool.fetchval("SELECT count(*) FROM usage_events WHERE subject='carol'"))

    await wait_until(folded, 30, "the ledger to fold carol's sample")
    settings = Settings(data_dir=tmp_path, admin_token=ADMIN, token_secret=SECRET)
    deps = ApiDeps(pool, nc, ConfigSource.fixed(parse_config(QUOTAS)), prefix=prefix)
    app = create_app(settings, deps=deps, options=ApiOptions())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        await c.get("/v1/subjects/alice/usage", headers={"Authorization": f"Bearer {ADMIN}"})
        await c.get("/v1/subjects/alice/usage")
        await c.get("/no/such/page")

        async def dead_letter_counted() -> bool:
            got = parse((await c.get("/metrics")).text)
            return value(got, "tollgate_dead_letters_stored", reason="invalid_json") == 1

        await wait_until(dead_letter_counted, 30, "the dead letter to show in /metrics")
        r = await c.get("/metrics")

    assert r.status_code == 200
    assert r.headers["content-type"].startswith("text/plain")
    got = parse(r.text)
    route = "/v1/subjects/{subject:path}/usage"
    assert value(got, "tollgate_api_requests_total", method="GET", route=route, status="200")
    assert value(got, "tollgate_api_requests_total", method="GET", route=route, status="401")
    assert value(got, "tollgate_api_requests_total", method="GET", route="unmatched", status="404")
    assert value(got, "tollgate_api_request_seconds_count", route=route)
    head = await pool.fetchval("SELECT last_seq FROM ledger_head")
    assert value(got, "tollgate_ledger_committed_events_total") == head
    lag = value(got, "tollgate_ledger_lag_seconds")
    assert lag is not None and 0 <= lag < 60
    assert value(got, "tollgate_ledger_backlog_messages", consumer="ledger") == 0
    # The good sample is folded at stream seq 1; the dead letter is not a position.
    assert value(got, "tollgate_ledger_consumer_position", consumer="ledger") == 1
    # Seeded policy records: one denial and one allowed spawn, two terminations, a warning.
    assert value(got, "tollgate_spawn_decisions_recorded_total", outcome="denied") == 1
    assert value(got, "tollgate_spawn_decisions_recorded_total", outcome="allowed") == 1
    assert value(got, "tollgate_spawn_decisions_recorded_total", outcome="fail_open") == 0
    assert value(
        got, "tollgate_terminations_recorded_total", reason="data_transfer_quota_exceeded"
    ) == 1  # fmt: skip
    assert value(got, "tollgate_policy_decisions_recorded_total", kind="warning") == 1
    # The services' own counters are in the same text (one process under `tollgate up`).
    assert value(got, "tollgate_ledger_dead_letters_total", reason="invalid_json")
    assert (value(got, "tollgate_ledger_points_total") or 0) >= 1
    assert value(got, "tollgate_api_scrape_error", source="postgres") == 0
    assert value(got, "tollgate_api_scrape_error", source="nats") == 0
    assert "alice" not in r.text and "carol" not in r.text


async def test_metrics_still_answer_when_postgres_and_nats_are_gone(
    database_url: str, tmp_path: Path
) -> None:
    from infra.db import create_pool

    gone = await create_pool(database_url)
    await gone.close()
    settings = Settings(data_dir=tmp_path, admin_token=ADMIN, token_secret=SECRET)
    deps = ApiDeps(gone, None, ConfigSource.fixed(parse_config(QUOTAS)))
    app = create_app(settings, deps=deps, options=ApiOptions())
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t") as c:
        r = await c.get("/metrics")

    assert r.status_code == 200
    got = parse(r.text)
    assert value(got, "tollgate_api_scrape_error", source="postgres") == 1
    assert value(got, "tollgate_api_scrape_error", source="nats") == 1
