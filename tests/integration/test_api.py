"""The HTTP API against real Postgres and NATS: usage, quotas, who may see what, bad input."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from pathlib import Path
from typing import TYPE_CHECKING, Any

import asyncpg
import httpx
import pytest
from nats.aio.client import Client

from infra.db import connect_and_migrate, create_pool
from infra.settings import Settings
from services.api.app import create_app
from services.api.bootstrap import serve
from services.api.deps import ApiDeps
from services.api.errors import ApiStartupError
from services.api.tokens import Role, issue_token
from services.ledger.domain import Reading, SeriesKey
from services.ledger.store import apply_readings
from services.policy.config import parse_config
from services.policy.source import ConfigSource
from tests.conftest import fresh_database, unique

if TYPE_CHECKING:  # imported for annotations only: pytest would try to collect the class
    from tests.servers import TestServers

SECRET = "integration-test-secret"
# A fixed "now" for the API: windows, defaults, retry_at and lag are exact to assert.
NOW = datetime(2031, 5, 15, 12, 30, tzinfo=UTC)
H = timedelta(hours=1)
MB = 10**6
QUOTAS = """
quotas:
  - name: logs-2d
    metric: log.bytes
    limit: 100 MB
    window: {rolling: 2d}
    warn_at: [0.8]
    enforce: [spawn]
  - name: cpu-month
    metric: cpu.used.seconds
    limit: 10 core*h
    window: {calendar: month, tz: UTC}
"""


@pytest.fixture
def admin_token() -> str:
    return unique("admin-")


@pytest.fixture
def settings(tmp_path: Path, admin_token: str) -> Settings:
    return Settings(data_dir=tmp_path, admin_token=admin_token, token_secret=SECRET)


def user_token(
    subject: str, role: Role = Role.USER, now: datetime = NOW, ttl: timedelta = H
) -> str:
    return issue_token(SECRET, subject, role, ttl, now=now)


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


@pytest.fixture(scope="module")
async def shared_pool(servers: TestServers) -> AsyncIterator[asyncpg.Pool]:
    """One migrated database for tests that never look at the ledger head as a whole.

    They use subject names of their own, so sharing is safe, and it saves creating a
    database for each of their many cases.
    """
    async with fresh_database(servers, "tg_api_") as url:
        p = await connect_and_migrate(url)
        try:
            yield p
        finally:
            await p.close()


def app_client(settings: Settings, deps: ApiDeps) -> httpx.AsyncClient:
    app = create_app(settings, deps=deps)
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://t")


@pytest.fixture
async def shared_client(
    settings: Settings, shared_pool: asyncpg.Pool, nc: Client
) -> AsyncIterator[httpx.AsyncClient]:
    deps = ApiDeps(shared_pool, nc, ConfigSource.fixed(parse_config(QUOTAS)), clock=lambda: NOW)
    async with app_client(settings, deps) as c:
        yield c


@pytest.fixture
async def client(
    settings: Settings, pool: asyncpg.Pool, nc: Client
) -> AsyncIterator[httpx.AsyncClient]:
    """The API over the test's pool and NATS connection, with the quotas above and NOW."""
    deps = ApiDeps(pool, nc, ConfigSource.fixed(parse_config(QUOTAS)), clock=lambda: NOW)
    async with app_client(settings, deps) as c:
        yield c


class Ledger:
    """Writes usage through the ledger's own write path, as cumulative counter readings."""

    def __init__(self, pool: asyncpg.Pool) -> None:
        self.pool = pool
        self.seq: dict[SeriesKey, int] = {}
        self.stream_seq = 0

    async def read(
        self, host: str, subject: str, workload: str, metric: str, value: str | int, at: datetime
    ) -> None:
        key = SeriesKey(host, "e1", subject, workload, metric)
        self.seq[key] = self.seq.get(key, 0) + 1
        self.stream_seq += 1
        reading = Reading(key, self.seq[key], Decimal(value), at, stream_seq=self.stream_seq)
        async with self.pool.acquire() as conn:
            await apply_readings(conn, "test-api", [reading], self.stream_seq)


async def seed_usage(pool: asyncpg.Pool, alice: str, bob: str) -> tuple[str, str]:
    """Alice on two hosts and three workloads, plus usage outside 30 days and bob's usage."""
    h1, h2 = unique("h1-"), unique("h2-")
    ledger = Ledger(pool)
    await ledger.read(h1, alice, "w1", "net.tx.wan.bytes", 1000, NOW - 3 * H)  # 09:30
    await ledger.read(h1, alice, "w1", "net.tx.wan.bytes", 3500, NOW - 2 * H)  # +2500
    await ledger.read(h2, alice, "w2", "net.tx.wan.bytes", 400, NOW - 2 * H)
    await ledger.read(h1, alice, "w1", "cpu.used.seconds", "10.5", NOW - 3 * H)
    await ledger.read(h1, alice, "w1", "cpu.used.seconds", "100.250001", NOW - 1 * H)
    await ledger.read(h1, alice, "w3", "net.tx.wan.bytes", 7, NOW - timedelta(days=40))
    await ledger.read(h1, bob, "wb", "net.tx.wan.bytes", 999_999, NOW - 2 * H)
    return h1, h2


def hour(t: datetime) -> str:
    return t.replace(minute=0, second=0, microsecond=0).strftime("%Y-%m-%dT%H:%M:%SZ")


# ---- usage -----------------------------------------------------------------------------


async def test_usage_totals_are_exact_per_metric_over_the_last_30_days(
    client: httpx.AsyncClient, pool: asyncpg.Pool
) -> None:
    alice, bob = unique("alice."), unique("bob@")
    await seed_usage(pool, alice, bob)

    r = await client.get(f"/v1/subjects/{alice}/usage", headers=bearer(user_token(alice)))

    assert r.status_code == 200, r.text
    body = r.json()
    assert body["rows"] == [
        {"metric": "cpu.used.seconds", "unit": "s", "total": "100.250001", "events": 2},
        {"metric": "net.tx.wan.bytes", "unit": "B", "total": "3900", "events": 3},
    ]
    assert body["from"] == hour(NOW - timedelta(days=30))
    assert body["to"] == hour(NOW + H)
    assert (body["subject"], body["group_by"], body["metric"]) == (alice, "metric", None)
    head = await pool.fetchrow(
        "SELECT h.last_seq, b.committed_at FROM ledger_head h "
        "JOIN ledger_batches b ON b.batch_id = h.last_batch"
    )
    assert body["as_of_seq"] == head["last_seq"] == 7
    assert datetime.fromisoformat(body["as_of"]) == head["committed_at"]
    assert bob not in r.text and "999999" not in r.text


async def test_usage_splits_by_workload_host_hour_and_day(
    client: httpx.AsyncClient, pool: asyncpg.Pool, admin_token: str
) -> None:
    alice, bob = unique("alice"), unique("bob")
    h1, h2 = await seed_usage(pool, alice, bob)
    url, auth = f"/v1/subjects/{alice}/usage", bearer(admin_token)

    async def rows(**params: str) -> list[dict[str, Any]]:
        r = await client.get(url, params=params, headers=auth)
        assert r.status_code == 200, r.text
        return r.json()["rows"]  # type: ignore[no-any-return]

    assert await rows(group_by="workload") == [
        {"metric": "cpu.used.seconds", "unit": "s", "total": "100.250001", "events": 2,
         "workload": "w1"},
        {"metric": "net.tx.wan.bytes", "unit": "B", "total": "3500", "events": 2,
         "workload": "w1"},
        {"metric": "net.tx.wan.bytes", "unit": "B", "total": "400", "events": 1,
         "workload": "w2"},
    ]  # fmt: skip
    by_host = {(r["metric"], r["host"]): r["total"] for r in await rows(group_by="host")}
    assert by_host == {
        ("cpu.used.seconds", h1): "100.250001",
        ("net.tx.wan.bytes", h1): "3500",
        ("net.tx.wan.bytes", h2): "400",
    }
    by_hour = await rows(group_by="hour", metric="net.tx.wan.bytes")
    assert [(r["hour"], r["total"]) for r in by_hour] == [
        (hour(NOW - 3 * H), "1000"),
        (hour(NOW - 2 * H), "2900"),
    ]
    # An explicit range reaches the usage 40 days back; days are whole UTC days.
    by_day = await rows(
        group_by="day",
        metric="net.tx.wan.bytes",
        **{"from": "2031-04-01T00:00:00Z", "to": "2031-05-16T00:00:00Z"},
    )
    assert [(r["day"], r["total"]) for r in by_day] == [
        ("2031-04-05", "7"),
        ("2031-05-15", "3900"),
    ]


async def test_usage_ranges_widen_to_whole_hours_and_days_follow_the_given_zone(
    client: httpx.AsyncClient, pool: asyncpg.Pool, admin_token: str
) -> None:
    alice, bob = unique("alice"), unique("bob")
    await seed_usage(pool, alice, bob)

    # 10:15 to 10:20 widens to the 10:00 bucket alone: it holds the 10:30 readings
    # (2500 + 400); the 09:00 and 11:00 buckets on either side stay out.
    r = await client.get(
        f"/v1/subjects/{alice}/usage",
        params={"from": "2031-05-15T12:15:00+02:00", "to": "2031-05-15T10:20:00Z"},
        headers=bearer(admin_token),
    )
    assert r.status_code == 200, r.text
    assert (r.json()["from"], r.json()["to"]) == ("2031-05-15T10:00:00Z", "2031-05-15T11:00:00Z")
    assert [(row["metric"], row["total"]) for row in r.json()["rows"]] == [
        ("net.tx.wan.bytes", "2900")
    ]

    # On Kiritimati (UTC+14) the 09:00 UTC bucket is 23:00 on the 15th, 10:00 UTC the 16th.
    r = await client.get(
        f"/v1/subjects/{alice}/usage",
        params={"group_by": "day", "tz": "Pacific/Kiritimati", "metric": "net.tx.wan.bytes"},
        headers=bearer(admin_token),
    )
    assert r.status_code == 200, r.text
    assert r.json()["tz"] == "Pacific/Kiritimati"
    assert [(row["day"], row["total"]) for row in r.json()["rows"]] == [
        ("2031-05-15", "1000"),
        ("2031-05-16", "2900"),
    ]


# ---- quotas ----------------------------------------------------------------------------


async def test_quotas_show_ok_warning_and_exceeded_with_retry_at(
    client: httpx.AsyncClient, pool: asyncpg.Pool, admin_token: str
) -> None:
    fine, close, over = unique("fine"), unique("close"), unique("over")
    host = unique("h")
    auth = bearer(admin_token)
    empty = (await client.get(f"/v1/subjects/{over}/quotas", headers=auth)).json()
    assert (empty["as_of_seq"], empty["as_of"], empty["lag_seconds"]) == (0, None, None)
    assert [q["used"] for q in empty["quotas"]] == ["0", "0"]

    ledger = Ledger(pool)
    await ledger.read(host, fine, "w", "log.bytes", 10 * MB, NOW - H)
    await ledger.read(host, close, "w", "log.bytes", 85 * MB, NOW - H)
    await ledger.read(host, over, "w", "log.bytes", 60 * MB, NOW - 47 * H)
    await ledger.read(host, over, "w", "log.bytes", 110 * MB, NOW - H)
    await ledger.read(host, over, "w", "cpu.used.seconds", 9000, NOW - H)

    states = {}
    for subject in (fine, close, over):
        r = await client.get(f"/v1/subjects/{subject}/quotas", headers=auth)
        assert r.status_code == 200, r.text
        states[subject] = {q["name"]: q for q in r.json()["quotas"]}
    assert states[fine]["logs-2d"]["state"] == "ok"
    assert states[close]["logs-2d"]["state"] == "warning"
    assert states[close]["logs-2d"]["retry_at"] is None
    assert states[over]["logs-2d"] == {
        "name": "logs-2d",
        "metric": "log.bytes",
        "unit": "MB",
        "used": "110",
        "limit": "100",
        "remaining": "0",
        "window": "rolling:172800s",
        "window_text": "in the last 2 days",
        "state": "exceeded",
        # Back under the limit once the 60 MB hour (NOW - 47 h) leaves the 2-day window.
        "retry_at": hour(NOW - 47 * H + H + timedelta(days=2)),
        "enforce": ["spawn"],
        "warn_at": ["0.8"],
        "projected_exhaustion_at": None,  # already used up
        # SPEC additions: a hard limit without grace or grants enforces at the limit.
        "mode": "hard",
        "grace": "0",
        "enforced_limit": "100",
        "enforced": True,
        "grace_remaining": None,
        "note": None,
        "base_limit": "100",
        "granted": "0",
        "grants": [],
    }
    assert {k: states[over]["cpu-month"][k] for k in ("unit", "used", "limit", "remaining")} == {
        "unit": "core·h",
        "used": "2.5",
        "limit": "10",
        "remaining": "7.5",
    }
    assert states[over]["cpu-month"]["state"] == "ok"

    body = (await client.get(f"/v1/subjects/{over}/quotas", headers=auth)).json()
    as_of = datetime.fromisoformat(body["as_of"])
    assert body["as_of_seq"] == 5
    assert body["lag_seconds"] == pytest.approx((NOW - as_of).total_seconds(), abs=1e-3)
    assert body["policy_version"] == parse_config(QUOTAS).version


async def test_quota_file_edits_apply_without_restart_and_typos_keep_the_old_one(
    tmp_path: Path,
) -> None:
    path = tmp_path / "quotas.yaml"
    path.write_text(QUOTAS)
    source = ConfigSource.load(path)
    assert [q.name for q in source.current().quotas] == ["logs-2d", "cpu-month"]

    path.write_text(QUOTAS.replace("logs-2d", "logs-two-days"))
    assert [q.name for q in source.current().quotas] == ["logs-two-days", "cpu-month"]

    path.write_text(QUOTAS.replace("100 MB", "100 parsecs"))
    assert [q.name for q in source.current().quotas] == ["logs-two-days", "cpu-month"]


# ---- who may see what --------------------------------------------------------------------


@pytest.mark.parametrize("resource", ["usage", "quotas"])
@pytest.mark.parametrize(
    ("who", "sees"),
    [
        ("owner", 200),
        ("other-user", 404),
        ("admin", 200),
        ("auditor", 200),
        ("integrator", 200),
    ],
)
async def test_who_may_read_a_subject(
    shared_client: httpx.AsyncClient,
    shared_pool: asyncpg.Pool,
    admin_token: str,
    resource: str,
    who: str,
    sees: int,
) -> None:
    alice, bob = unique("alice"), unique("bob")
    await seed_usage(shared_pool, alice, bob)
    token = {
        "owner": user_token(alice),
        "other-user": user_token(bob),
        "admin": admin_token,
        "auditor": user_token("audit-svc", Role.AUDITOR),
        "integrator": user_token("hub", Role.INTEGRATOR),
    }[who]

    r = await shared_client.get(f"/v1/subjects/{alice}/{resource}", headers=bearer(token))

    assert r.status_code == sees, r.text
    if sees == 200:
        assert r.json()["subject"] == alice


async def test_another_users_subject_looks_exactly_like_one_that_does_not_exist(
    shared_client: httpx.AsyncClient, shared_pool: asyncpg.Pool
) -> None:
    alice, bob = unique("alice"), unique("bob")
    await seed_usage(shared_pool, alice, bob)
    as_bob = bearer(user_token(bob))

    for resource in ("usage", "quotas"):
        existing = await shared_client.get(f"/v1/subjects/{alice}/{resource}", headers=as_bob)
        missing = await shared_client.get(
            f"/v1/subjects/{unique('nobody')}/{resource}", headers=as_bob
        )
        assert existing.status_code == missing.status_code == 404
        assert existing.content == missing.content
        assert alice not in existing.text and "3900" not in existing.text
        assert "total" not in existing.text and "quotas" not in existing.json()


@pytest.mark.parametrize(
    ("headers", "says"),
    [
        ({}, "No bearer token"),
        ({"Authorization": "Basic YWxpY2U6cHc="}, "must be 'Bearer <token>'"),
        ({"Authorization": "Bearer "}, "must be 'Bearer <token>'"),
        (bearer("wrong-admin-token"), "Token not recognised"),
        (bearer(user_token("alice", now=NOW - 2 * H)), "Token expired"),
        (bearer(issue_token("other-secret", "alice", Role.USER, H, now=NOW)), "does not match"),
        (bearer(user_token("alice")[:-3] + "AAA"), "does not match"),
        (bearer("tg1.garbage"), "not a Tollgate token"),
    ],
    ids=["none", "basic", "empty", "unknown", "expired", "other-secret", "tampered", "malformed"],
)
async def test_requests_without_a_valid_token_get_401_saying_how_to_get_one(
    shared_client: httpx.AsyncClient, headers: dict[str, str], says: str
) -> None:
    for resource in ("usage", "quotas"):
        r = await shared_client.get(f"/v1/subjects/alice/{resource}", headers=headers)

        assert r.status_code == 401, r.text
        assert r.headers["WWW-Authenticate"].startswith('Bearer realm="tollgate"')
        detail = r.json()["detail"]
        assert says in detail
        assert "tollgate token issue" in detail
        assert set(r.json()) == {"detail"}


# ---- bad input ------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("query", "says"),
    [
        ("from=yesterday", "from: 'yesterday' is not an ISO-8601 time"),
        ("from=2031-05-01T00:00:00", "has no time zone"),
        ("from=2031-05-01T00:00:00+02:00", "%2B"),
        ("from=2031-05-02T00:00:00Z&to=2031-05-01T00:00:00Z", "must be before to"),
        ("from=2031-05-01T00:00:00Z&to=2031-05-01T00:00:00Z", "must be before to"),
        ("from=2030-01-01T00:00:00Z&to=2031-05-01T00:00:00Z", "at most 400 days"),
        ("from=0001-01-01T00:00:00Z", "outside the years"),
        ("to=0001-01-02T00:00:00Z", "outside the years"),
        ("group_by=week", "group_by: Input should be 'metric', 'workload'"),
        ("metric=Not-A-Metric", "metric: 'Not-A-Metric' is not a metric name"),
        ("metric=" + "a." * 60 + "b", "is not a metric name"),
        ("tz=Mars/Olympus_Mons", "tz: 'Mars/Olympus_Mons' is not a time zone"),
        ("tz=../../etc/passwd", "is not a time zone"),
    ],
)
async def test_bad_usage_queries_get_422_with_a_clear_message(
    shared_client: httpx.AsyncClient, admin_token: str, query: str, says: str
) -> None:
    r = await shared_client.get(f"/v1/subjects/alice/usage?{query}", headers=bearer(admin_token))

    assert r.status_code == 422, r.text
    assert says in r.json()["detail"]


async def test_subject_names_with_dots_at_signs_and_slashes_are_path_parameters(
    shared_client: httpx.AsyncClient, shared_pool: asyncpg.Pool, admin_token: str
) -> None:
    odd = f"{unique('jane.doe+x')}@example.org/team"
    await Ledger(shared_pool).read(unique("h"), odd, "w", "log.bytes", 42, NOW - H)
    token = user_token(odd)

    r = await shared_client.get(
        f"/v1/subjects/{odd.replace('/', '%2F')}/usage", headers=bearer(token)
    )

    assert r.status_code == 200, r.text
    assert r.json()["subject"] == odd
    assert r.json()["rows"][0]["total"] == "42"
    too_long = await shared_client.get(
        "/v1/subjects/" + "x" * 201 + "/quotas", headers=bearer(admin_token)
    )
    assert too_long.status_code == 422
    assert "1 to 200 characters" in too_long.json()["detail"]


# ---- health ------------------------------------------------------------------------------


async def test_readyz_is_200_when_nats_postgres_and_schema_are_ready(
    client: httpx.AsyncClient,
) -> None:
    r = await client.get("/readyz")

    assert r.status_code == 200, r.text
    assert r.json()["status"] == "ready"
    assert {k: v["ok"] for k, v in r.json()["checks"].items()} == {
        "nats": True, "postgres": True, "migrations": True,
    }  # fmt: skip
    assert (await client.get("/healthz")).json() == {"status": "alive"}


async def test_readyz_is_503_naming_nats_when_its_connection_is_closed(
    settings: Settings, pool: asyncpg.Pool, servers: TestServers
) -> None:
    import nats

    closed: Client = await nats.connect(servers.nats_url)
    await closed.close()
    deps = ApiDeps(pool=pool, nc=closed, config=ConfigSource.fixed(parse_config("{}")))
    async with app_client(settings, deps) as c:
        r = await c.get("/readyz")
        alive = await c.get("/healthz")

    assert r.status_code == 503
    checks = r.json()["checks"]
    assert checks["nats"]["ok"] is False and "closed" in checks["nats"]["detail"]
    assert "restart" in checks["nats"]["fix"]
    assert checks["postgres"]["ok"] and checks["migrations"]["ok"]
    assert alive.status_code == 200


async def test_readyz_is_503_while_nats_has_not_been_reached_yet(
    settings: Settings, pool: asyncpg.Pool
) -> None:
    config = ConfigSource.fixed(parse_config("{}"))
    deps = ApiDeps(pool=pool, nc=None, config=config, nats_address="nats.internal:4222")
    async with app_client(settings, deps) as c:
        r = await c.get("/readyz")

    assert r.status_code == 503
    nats_check = r.json()["checks"]["nats"]
    assert nats_check == {
        "ok": False,
        "detail": "connecting to NATS at nats.internal:4222",
        "fix": "check that the NATS server (TOLLGATE_NATS_URL) is running and reachable",
    }


async def test_readyz_is_503_naming_the_missing_migrations(
    settings: Settings, database_url: str, nc: Client
) -> None:
    bare = await create_pool(database_url)  # connected but never migrated
    try:
        deps = ApiDeps(pool=bare, nc=nc, config=ConfigSource.fixed(parse_config("{}")))
        async with app_client(settings, deps) as c:
            r = await c.get("/readyz")
    finally:
        await bare.close()

    assert r.status_code == 503
    migrations = r.json()["checks"]["migrations"]
    assert not migrations["ok"] and "0001_ledger.sql" in migrations["detail"]
    assert r.json()["checks"]["nats"]["ok"] and r.json()["checks"]["postgres"]["ok"]


async def test_readyz_is_503_naming_postgres_when_it_does_not_answer(
    settings: Settings, database_url: str, nc: Client
) -> None:
    gone = await create_pool(database_url)
    await gone.close()
    deps = ApiDeps(pool=gone, nc=nc, config=ConfigSource.fixed(parse_config("{}")))
    async with app_client(settings, deps) as c:
        r = await c.get("/readyz")
        usage = await c.get("/v1/subjects/a/usage", headers=bearer(settings.admin_token or ""))

    assert r.status_code == 503
    assert not r.json()["checks"]["postgres"]["ok"]
    assert "TOLLGATE_DATABASE_URL" in r.json()["checks"]["postgres"]["fix"]
    assert usage.status_code == 503 and "retry" in usage.json()["detail"]


# ---- serving ---------------------------------------------------------------------------


async def test_serve_answers_over_http_until_stop_is_set(
    tmp_path: Path, servers: TestServers, database_url: str, admin_token: str
) -> None:
    settings = Settings(
        data_dir=tmp_path,
        nats_url=servers.nats_url,
        database_url=database_url,
        api_port=0,
        admin_token=admin_token,
        token_secret=SECRET,
    )
    stop = asyncio.Event()
    listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(settings, stop, on_listening=listening.set_result))
    try:
        url = await asyncio.wait_for(asyncio.shield(listening), 15)
        async with httpx.AsyncClient(base_url=url) as http:
            ready = await http.get("/readyz")
            usage = await http.get("/v1/subjects/alice/usage", headers=bearer(admin_token))
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)

    assert ready.status_code == 200, ready.text
    assert usage.status_code == 200 and usage.json()["rows"] == []
    with pytest.raises(httpx.ConnectError):
        async with httpx.AsyncClient(base_url=url) as http:
            await http.get("/healthz")


def dead_port() -> int:
    """A local port nothing listens on."""
    with socket.create_server(("127.0.0.1", 0)) as closed:
        port: int = closed.getsockname()[1]
    return port


async def test_serve_comes_up_without_nats_and_readyz_names_it(
    tmp_path: Path, database_url: str, admin_token: str
) -> None:
    nats_port = dead_port()
    settings = Settings(
        data_dir=tmp_path,
        nats_url=f"nats://127.0.0.1:{nats_port}",
        database_url=database_url,
        api_port=0,
        admin_token=admin_token,
        token_secret=SECRET,
    )
    stop = asyncio.Event()
    listening: asyncio.Future[str] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(settings, stop, on_listening=listening.set_result))
    try:
        url = await asyncio.wait_for(asyncio.shield(listening), 15)
        async with httpx.AsyncClient(base_url=url) as http:
            ready = await http.get("/readyz")
            quotas = await http.get("/v1/subjects/alice/quotas", headers=bearer(admin_token))
    finally:
        stop.set()
        await asyncio.wait_for(task, 15)

    assert ready.status_code == 503
    assert (
        ready.json()["checks"]["nats"]["detail"] == f"connecting to NATS at 127.0.0.1:{nats_port}"
    )
    assert ready.json()["checks"]["postgres"]["ok"]
    assert quotas.status_code == 200  # Postgres-backed reads do not wait for NATS


async def test_serve_returns_when_stopped_before_it_started(
    tmp_path: Path, servers: TestServers, database_url: str
) -> None:
    settings = Settings(
        data_dir=tmp_path,
        nats_url=servers.nats_url,
        database_url=database_url,
        api_port=0,
        token_secret=SECRET,
    )
    stop = asyncio.Event()
    stop.set()
    heard: list[str] = []

    await asyncio.wait_for(serve(settings, stop, on_listening=heard.append), 15)

    assert heard == []


async def test_serve_says_when_the_port_is_taken(tmp_path: Path) -> None:
    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        settings = Settings(data_dir=tmp_path, api_port=port, token_secret=SECRET)
        with pytest.raises(ApiStartupError, match=f"cannot listen on 127.0.0.1:{port}.*API_PORT"):
            await serve(settings, asyncio.Event())


async def test_serve_says_when_postgres_cannot_be_reached(
    tmp_path: Path, servers: TestServers
) -> None:
    pg_port = dead_port()
    settings = Settings(
        data_dir=tmp_path,
        nats_url=servers.nats_url,
        database_url=f"postgresql://tollgate:secret-pw@127.0.0.1:{pg_port}/tollgate",
        api_port=0,
        token_secret=SECRET,
    )

    with pytest.raises(ApiStartupError) as caught:
        await asyncio.wait_for(serve(settings, asyncio.Event()), 15)

    message = str(caught.value)
    assert f"cannot open Postgres at 127.0.0.1:{pg_port}" in message
    assert "TOLLGATE_DATABASE_URL" in message and "secret-pw" not in message
