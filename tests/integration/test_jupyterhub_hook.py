"""The JupyterHub hooks against a running Tollgate, driven through JupyterHub's own code.

JupyterHub is the real package from PyPI: a hub database (sqlite, in memory) with its roles,
users and groups, and `jupyterhub.user.User.spawn()` / `.stop()`, which call the hooks the
way a hub does (a denied or failed start is stopped by JupyterHub, which runs
`post_stop_hook`). `SimpleLocalProcessSpawner` starts a real local process; since
jupyter_server is not installed, that process is a stand-in for jupyterhub-singleuser that
answers the hub's readiness check. No proxy and no web handlers run: the message a user
would see is read with `jupyterhub.utils.format_exception`, which the hub's pages use.

Tollgate is the ledger, the policy and the HTTP API, in-process over real NATS and Postgres.
"""

from __future__ import annotations

import asyncio
import json
import logging
import socket
import sys
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from jupyterhub import orm, roles
from jupyterhub.objects import Hub
from jupyterhub.spawner import SimpleLocalProcessSpawner
from jupyterhub.user import User
from jupyterhub.utils import format_exception
from nats.aio.client import Client
from nats.aio.msg import Msg
from traitlets.config import Config

from contracts.samples import CounterBatch, samples_subject
from contracts.spawn import SpawnRequest
from contracts.workloads import workloads_subject
from infra.settings import Settings
from services.api.tokens import Role, issue_token
from services.meter.domain import exact
from tests.conftest import unique, wait_until
from tests.integration.conftest import total
from tests.integration.test_api_support import ADMIN, SECRET, live_api
from tests.integration.test_policy_support import GIB_HOUR, Fleet, spawn
from tests.servers import TestServers
from tollgate.jupyterhub import QuotaCheckFailed, QuotaDenied, TollgateHooks

pytest_plugins = ["tests.integration.test_policy_support"]
MEM = "mem.alloc.byte_seconds"
# `regular` has no static members: the quota applies only because the hub says so.
QUOTAS = """
groups:
  regular: []
quotas:
  - name: memory-30d
    metric: mem.alloc.byte_seconds
    limit: 60 GiB*h
    window: {rolling: 30d}
    applies_to: {groups: [regular]}
    enforce: [spawn]
failure_mode: closed
help: Ask your admin to join the power group.
"""
# Answers the hub's readiness check at JUPYTERHUB_SERVICE_URL, as jupyterhub-singleuser would.
SINGLEUSER = """
import http.server, os, urllib.parse
url = urllib.parse.urlsplit(os.environ["JUPYTERHUB_SERVICE_URL"])
class Ready(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self.send_response(200)
        self.end_headers()
        self.wfile.write(b"{}")
    def log_message(self, *args):
        pass
try:
    http.server.HTTPServer((url.hostname, url.port), Ready).serve_forever()
except KeyboardInterrupt:  # the hub stops it with SIGINT
    pass
"""


class HubDatabase:
    """JupyterHub's own database, in memory, with users in groups."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.db = orm.new_session_factory("sqlite:///:memory:")()
        for role in roles.get_default_roles():
            roles.create_role(self.db, role)
        self.db.add(orm.OAuthClient(identifier="jupyterhub"))
        self.db.commit()
        self.script = tmp_path / "singleuser.py"
        self.script.write_text(SINGLEUSER)

    def user(self, name: str, groups: list[str], hooks: TollgateHooks) -> User:
        """A hub user in `groups` whose servers run the Tollgate hooks."""
        c = Config()
        c.Spawner.pre_spawn_hook = hooks.pre_spawn_hook
        c.Spawner.post_stop_hook = hooks.post_stop_hook
        c.Spawner.cmd = [sys.executable, str(self.script)]
        c.Spawner.mem_limit = "4G"
        c.Spawner.cpu_limit = 2.0
        c.Spawner.http_timeout = 30
        c.SimpleLocalProcessSpawner.home_dir_template = str(self.tmp_path / "home-{username}")
        orm_user = orm.User(name=name)
        self.db.add(orm_user)
        self.db.commit()
        roles.assign_default_roles(self.db, orm_user)
        for group_name in groups:
            group = orm.Group.find(self.db, group_name) or orm.Group(name=group_name)
            group.users.append(orm_user)
            self.db.add(group)
        self.db.commit()
        settings = {"config": c, "spawner_class": SimpleLocalProcessSpawner,
                    "hub": Hub(), "internal_ssl": False}  # fmt: skip
        return User(orm_user, settings=settings)


@pytest.fixture
def hub(tmp_path: Path) -> HubDatabase:
    # Made before the test runs: JupyterHub's database setup (alembic) reconfigures logging,
    # which would drop the handler that pytest's caplog adds for the test itself.
    return HubDatabase(tmp_path)


@pytest.fixture
async def api_url(
    servers: TestServers, database_url: str, pool: asyncpg.Pool, prefix: str, tmp_path: Path
) -> AsyncIterator[str]:
    """Tollgate's HTTP API over this test's database and prefix."""
    config = tmp_path / "quotas.yaml"
    config.write_text(QUOTAS)
    settings = Settings(
        data_dir=tmp_path, admin_token=ADMIN, token_secret=SECRET, config=config, api_port=0,
        nats_url=servers.nats_url, database_url=database_url, prefix=prefix,
    )  # fmt: skip
    async with live_api(settings) as url:
        yield url


def integrator_token() -> str:
    return issue_token(SECRET, "jupyterhub", Role.INTEGRATOR, timedelta(hours=1))


@pytest.fixture
def closed_port() -> Iterator[int]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    yield port  # nothing listens there any more


class Heard:
    """Every message published on one subject (core NATS sees JetStream publishes too)."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []

    async def on(self, msg: Msg) -> None:
        self.bodies.append(json.loads(msg.data))


async def listen(nc: Client, subject: str) -> Heard:
    heard = Heard()
    await nc.subscribe(subject, cb=heard.on)
    await nc.flush()
    return heard


async def test_an_allowed_server_is_metered_and_its_final_reading_reaches_the_ledger(
    servers: TestServers, nc: Client, pool: asyncpg.Pool, prefix: str, ledger: Any,
    policy_for: Any, api_url: str, hub: HubDatabase,
) -> None:  # fmt: skip
    await policy_for(QUOTAS)
    alice, hub_host = unique("alice"), unique("hub")
    hooks = TollgateHooks(
        api_url, integrator_token(), failure_mode="closed", host=hub_host,
        nats_url=servers.nats_url, prefix=prefix, reading_interval=0.2,
    )  # fmt: skip
    user = hub.user(alice, ["regular"], hooks)
    samples = await listen(nc, samples_subject(hub_host, prefix))
    try:
        await user.spawn()
        assert user.spawner.active and await user.spawner.poll() is None
        run = hooks.runs[(alice, "")]

        # The policy decided with the hub's groups, and knows the server runs, with its size.
        row = await _row(pool, "SELECT * FROM policy_decisions WHERE workload = $1", run.workload)
        assert (row["subject"], row["allowed"], row["groups"]) == (alice, True, ["regular"])
        assert row["quota"] is None and "0 of 60 GiB·h used (memory-30d)" in row["message"]
        started = await _row(pool, "SELECT * FROM policy_workloads WHERE workload = $1",
                             run.workload)  # fmt: skip
        assert (started["subject"], started["host"], started["groups"]) == (
            alice, hub_host, ["regular"],
        )  # fmt: skip
        assert json.loads(started["resources"])["mem_bytes"] == 4 * 2**30
        assert started["started_at"] == run.started_at

        # Readings arrive while it runs, so rolling quotas see usage before it stops.
        await wait_until(lambda: _positive(total(pool, alice, MEM)), what="usage while running")
    finally:
        await user.stop()
        await hooks.close()

    final = CounterBatch.model_validate(samples.bodies[-1])
    assert final.final and [c.metric for c in final.counters] == [
        "cpu.alloc.seconds", "mem.alloc.byte_seconds",
    ]  # fmt: skip
    mem = next(c.value for c in final.counters if c.metric == MEM)
    assert mem == exact(Decimal(4 * 2**30) * _seconds(final.sampled_at - run.started_at))
    assert [b["seq"] for b in samples.bodies] == sorted({b["seq"] for b in samples.bodies})

    async def whole_run_counted() -> bool:
        return await total(pool, alice, MEM) == mem

    await wait_until(whole_run_counted, what="the final reading in the ledger")
    stopped = await _row(pool, "SELECT * FROM policy_workloads WHERE workload = $1 "
                         "AND stopped_at IS NOT NULL", run.workload)  # fmt: skip
    assert stopped["stopped_at"] >= final.sampled_at - timedelta(seconds=1)
    assert await user.spawner.poll() is not None  # the hub stopped the process


async def test_servers_running_at_once_are_each_counted_exactly(
    servers: TestServers, nc: Client, pool: asyncpg.Pool, prefix: str, ledger: Any,
    policy_for: Any, api_url: str, hub: HubDatabase,
) -> None:  # fmt: skip
    await policy_for(QUOTAS)
    hooks = TollgateHooks(
        api_url, integrator_token(), host=unique("hub"), nats_url=servers.nats_url,
        prefix=prefix, reading_interval=0.05,
    )  # fmt: skip
    users = [hub.user(unique("alice"), ["regular"], hooks) for _ in range(2)]
    named = ["", "big", "gpu"]
    for user in users:
        for name in named[1:]:
            user._new_orm_spawner(name, name)
    samples = await listen(nc, samples_subject(hooks.host, prefix))
    try:
        # Six servers start, report every 50 ms through one NATS link, and stop together.
        await asyncio.gather(*(u.spawn(n) for u in users for n in named))
        runs = dict(hooks.runs)
        assert len(runs) == 6
        await wait_until(lambda: _reported_all(samples, runs), what="readings of every server")
    finally:
        await asyncio.gather(*(u.stop(n) for u in users for n in named))
        await hooks.close()

    finals = {
        c.workload: c.value
        for b in samples.bodies
        if b["final"]
        for c in CounterBatch.model_validate(b).counters
        if c.metric == MEM
    }
    assert set(finals) == {run.workload for run in runs.values()}

    async def each_counted() -> bool:
        rows = await pool.fetch(
            "SELECT workload, sum(delta) AS used FROM usage_events WHERE metric = $1 "
            "GROUP BY workload", MEM,
        )  # fmt: skip
        return {r["workload"]: r["used"] for r in rows} == finals

    await wait_until(each_counted, what="every final reading in the ledger")


async def test_a_denied_spawn_shows_the_decisions_message_and_reports_nothing(
    servers: TestServers, nc: Client, pool: asyncpg.Pool, prefix: str, ledger: Any,
    policy_for: Any, api_url: str, hub: HubDatabase,
) -> None:  # fmt: skip
    policy = await policy_for(QUOTAS)
    alice, hub_host = unique("alice"), unique("hub")
    # 61 of her 60 GiB·h went on a server yesterday.
    await Fleet(nc, prefix, unique("node")).sample(
        policy.service.live.clock() - timedelta(days=1), (alice, unique("old"), MEM, 61 * GIB_HOUR)
    )
    await wait_until(lambda: _equals(total(pool, alice, MEM), 61 * GIB_HOUR), what="old usage")
    hooks = TollgateHooks(
        api_url, integrator_token(), failure_mode="open", host=hub_host,
        nats_url=servers.nats_url, prefix=prefix, quota_page_url="https://quota.example/",
    )  # fmt: skip
    user = hub.user(alice, ["regular"], hooks)
    lifecycle = await listen(nc, workloads_subject(hub_host, prefix))

    async def policy_sees_it() -> bool:
        asked = SpawnRequest(subject=alice, groups=["regular"])
        return (await spawn(nc, prefix, asked)).reason == "quota_exceeded"

    await wait_until(policy_sees_it, what="the policy to see her usage")
    with pytest.raises(QuotaDenied) as denied:
        await user.spawn()
    denial = denied.value

    message, html = format_exception(denial)
    assert message == denial.decision.message
    assert message.startswith("You have used 61 of 60 GiB·h (memory-30d) in the last 30 days; "
                              "quota returns from ")  # fmt: skip
    assert message.endswith(" UTC. Ask your admin to join the power group.")
    assert html.endswith('<a href="https://quota.example/">See your quotas</a>.')
    assert denial.status_code == 403 and denial.reason == "quota_exceeded"
    assert denial.retry_at is not None and int(denial.headers["Retry-After"]) > 0
    # JupyterHub stopped the server that never started; nothing was reported for it.
    assert not user.spawner.active and hooks.runs == {}
    await nc.flush()
    assert lifecycle.bodies == []
    row = await _row(pool, "SELECT * FROM policy_decisions WHERE decision_id = $1",
                     denial.decision.decision_id)  # fmt: skip
    assert (row["subject"], row["allowed"], row["groups"]) == (alice, False, ["regular"])
    await hooks.close()


async def test_a_bad_token_is_a_configuration_error_told_to_the_log_and_the_user(
    api_url: str, hub: HubDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    hooks = TollgateHooks(api_url, "not-a-token", failure_mode="open", host=unique("hub"))
    user = hub.user(unique("alice"), [], hooks)
    caplog.set_level(logging.ERROR, "tollgate.jupyterhub")
    with pytest.raises(QuotaCheckFailed) as failed:
        await user.spawn()
    assert failed.value.status_code == 500
    assert format_exception(failed.value)[0] == (
        "Your server was not started: the hub's quota check is misconfigured (Tollgate "
        "answered HTTP 401). Please tell your hub's admin."
    )
    (logged,) = [r.getMessage() for r in caplog.records if r.name == "tollgate.jupyterhub"]
    assert "HTTP 401: Token not recognised" in logged and "TOLLGATE_INTEGRATOR_TOKEN" in logged
    assert not user.spawner.active


@pytest.mark.parametrize("mode", ["open", "closed"])
async def test_with_tollgate_down_the_spawn_follows_the_failure_mode(
    mode: str, closed_port: int, hub: HubDatabase, caplog: pytest.LogCaptureFixture
) -> None:
    hooks = TollgateHooks(
        f"http://127.0.0.1:{closed_port}", integrator_token(), failure_mode=mode,  # type: ignore[arg-type]
        host=unique("hub"),
    )  # fmt: skip
    user = hub.user(unique("alice"), ["regular"], hooks)
    caplog.set_level(logging.INFO, "tollgate.jupyterhub")
    if mode == "closed":
        with pytest.raises(QuotaCheckFailed) as failed:
            await user.spawn()
        assert failed.value.status_code == 503
        assert format_exception(failed.value)[0] == (
            "Your server was not started: the quota service could not be reached to check "
            "your quota. Try again in a few minutes, and tell your hub's admin if this persists."
        )
        assert not user.spawner.active
        return
    try:
        await user.spawn()
        assert user.spawner.active and await user.spawner.poll() is None
    finally:
        await user.stop()
    said = [r.getMessage() for r in caplog.records if r.name == "tollgate.jupyterhub"]
    assert any("allowing it (fail open)" in s and str(closed_port) in s for s in said)
    assert any("TOLLGATE_NATS_URL is not set" in s for s in said)


async def _reported_all(heard: Heard, runs: dict[tuple[str, str], Any]) -> bool:
    seen = {c["workload"] for b in heard.bodies for c in b["counters"]}
    return seen >= {run.workload for run in runs.values()}


async def _row(pool: asyncpg.Pool, query: str, *args: Any) -> asyncpg.Record:
    async def found() -> bool:
        return await pool.fetchrow(query, *args) is not None

    await wait_until(found, what=query)
    row = await pool.fetchrow(query, *args)
    assert row is not None
    return row


def _seconds(delta: timedelta) -> Decimal:
    return Decimal(delta // timedelta(microseconds=1)) / 1_000_000


async def _positive(value: Any) -> bool:
    return await value > 0


async def _equals(value: Any, expected: Decimal) -> bool:
    return await value == expected
