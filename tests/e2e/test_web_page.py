"""The web page in a real headless Chromium: sign in, read the bars and the chart, sign out.

Needs Debian's `chromium` at /usr/bin/chromium (`make install` brings it) and the
`playwright` Python package, which drives it without downloading a browser of its own.
A screenshot is saved under test-artifacts/.
"""

from __future__ import annotations

import asyncio
import contextlib
import shutil
from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from contracts.spawn import SpawnRequest
from services.api.tokens import Role, issue_token
from tests.conftest import unique, wait_until
from tests.integration.conftest import ledger, streams  # noqa: F401 (fixtures)
from tests.integration.test_api_support import (
    ADMIN,
    ALICE_EGRESS,
    ALICE_MEMORY,
    MEM,
    SECRET,
    api_settings,
    live_api,
    seed_scene,
)
from tests.integration.test_policy_support import spawn
from tests.servers import TestServers

pytest_plugins = ["tests.integration.test_policy_support"]
AS_ADMIN = {"Authorization": f"Bearer {ADMIN}"}

CHROMIUM = Path("/usr/bin/chromium")
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
CHROMIUM_ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
    "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-quic",
]  # fmt: skip

async_api = pytest.importorskip(
    "playwright.async_api", reason="the playwright package is missing: pip install playwright"
)
pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists() and shutil.which("chromium") is None,
    reason="no Chromium at /usr/bin/chromium: apt-get install chromium (make install does)",
)


@contextlib.asynccontextmanager
async def launch() -> AsyncIterator[Any]:
    """Headless Chromium, closed on exit (other page tests use it too)."""
    async with async_api.async_playwright() as p:
        b = await p.chromium.launch(
            executable_path=str(CHROMIUM if CHROMIUM.exists() else shutil.which("chromium")),
            args=CHROMIUM_ARGS,
        )
        try:
            yield b
        finally:
            await b.close()


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with launch() as b:
        yield b


async def test_a_user_signs_in_and_sees_their_bars_chart_and_decisions(
    browser: Any, servers: TestServers, database_url: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    scene = await seed_scene(pool)
    settings = api_settings(tmp_path, database_url=database_url, nats_url=servers.nats_url)
    token = issue_token(SECRET, "alice", Role.USER, timedelta(hours=1))
    async with live_api(settings) as url:
        context = await browser.new_context(viewport={"width": 1200, "height": 900})
        page = await context.new_page()
        await page.goto(url + "/")
        assert await page.locator("h1").inner_text() == "Your usage and quotas"

        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "web-sign-in.png"))
        await page.fill("#token", "not-a-token")
        await page.click("button[type=submit]")
        assert "Token not recognised" in await page.locator(".alert").inner_text()

        await page.fill("#token", token)
        await page.click("button[type=submit]")
        await page.wait_for_selector("article.quota")
        assert await page.locator("h1").inner_text() == "alice"

        memory = page.locator('[data-quota="memory-30d"]')
        assert await memory.get_attribute("data-state") == "warning"
        assert sum(ALICE_MEMORY.values()) == 50
        assert "50 of 60 GiB·h" in await memory.locator(".used").inner_text()
        assert await memory.locator(".pct").inner_text() == "83%"
        assert float(await memory.locator("rect.fill").get_attribute("width")) == pytest.approx(
            100 * 50 / 60, abs=0.01
        )
        egress = page.locator('[data-quota="egress-7d"]')
        assert await egress.get_attribute("data-state") == "exceeded"
        assert f"{sum(ALICE_EGRESS.values())} of 5 GB" in await egress.locator(".used").inner_text()
        assert "Quota returns" in await egress.locator(".returns").inner_text()
        cpu = page.locator('[data-quota="cpu-month"]')
        assert await cpu.get_attribute("data-state") == "ok"

        # 30 daily bars; together they hold every GiB·h seeded in the last 30 days.
        bars = page.locator('svg.chart[data-metric="mem.alloc.byte_seconds"] rect.bar')
        assert await bars.count() == 30
        shown = sum([Decimal(await bars.nth(i).get_attribute("data-total")) for i in range(30)])
        assert shown == scene.total("alice", MEM)
        net = page.locator('svg.chart[data-metric="net.tx.wan.bytes"] rect.bar')
        assert await net.count() == 30
        assert (
            "5.8 GB in total"
            in await page.locator(
                'article.chart-card[data-metric="net.tx.wan.bytes"] .title'
            ).inner_text()
        )

        events = page.locator("tr.event")
        assert [await events.nth(i).get_attribute("data-kind") for i in range(3)] == [
            "spawn", "terminate", "warning",
        ]  # fmt: skip
        assert "Spawn denied" in await events.nth(0).inner_text()
        assert "quota returns from" in await events.nth(0).inner_text()

        text = await page.locator("body").inner_text()
        assert "bob" not in text and "987" not in text and "4.2 GB" not in text

        await page.screenshot(path=str(ARTIFACTS / "web-page.png"), full_page=True)
        await page.emulate_media(color_scheme="dark")
        await page.screenshot(path=str(ARTIFACTS / "web-page-dark.png"), full_page=True)
        await page.emulate_media(color_scheme="light")

        await page.click('a:has-text("7 days")')
        await page.wait_for_url("**/?range=7d")
        assert await net.count() == 28

        # Another subject's page is refused exactly like one that does not exist.
        for other in ("bob", "nobody-at-all"):
            response = await page.goto(f"{url}/?subject={other}")
            assert response is not None and response.status == 404
            assert "bob" not in await page.locator("body").inner_text()

        await page.goto(url + "/")
        await page.click("text=Sign out")
        assert await page.locator("h1").inner_text() == "Your usage and quotas"
        assert await context.cookies() == []

        # An admin picks any subject from those with usage.
        await page.fill("#token", ADMIN)
        await page.click("button[type=submit]")
        assert await page.locator("h1").inner_text() == "Subjects"
        await page.screenshot(path=str(ARTIFACTS / "web-admin.png"))
        await page.click('ul.subjects a:has-text("bob")')
        assert await page.locator("h1").inner_text() == "bob"
        assert await page.locator('[data-quota="memory-30d"]').get_attribute("data-state") == (
            "exceeded"
        )
        await context.close()


DEMO_QUOTAS = """
quotas:
  - {{name: memory-bob, metric: mem.alloc.byte_seconds, limit: 0.05 GiB*h,
     window: {{rolling: 30d}}, applies_to: {{users: [{bob}]}}, enforce: [spawn]}}
  - {{name: budget-30d, metric: cost, limit: 1 USD, window: {{rolling: 30d}},
     enforce: [spawn], warn_at: [0.8]}}
prices:
  - {{metric: gpu.alloc.seconds, price: 2.50 USD/GPU*h}}
  - {{metric: gpu.alloc.seconds, price: 3.20 USD/GPU*h, labels: {{gpu_model: H100}}}}
  - {{metric: net.tx.wan.bytes, price: 0.09 USD/GB}}
"""


async def test_the_demo_fleet_is_announced_and_the_page_shows_forecast_cost_and_repeats(
    browser: Any, servers: TestServers, database_url: str, pool: asyncpg.Pool, nc: Any,
    prefix: str, ledger: Any, policy_for: Any,  # noqa: F811 (the fixture imported above)
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:  # fmt: skip
    from tollgate import demo

    bob, carol = unique("bob"), unique("carol")
    fleet = {
        unique("demo-node"): [demo.SimWorkload(bob, f"jupyter-{bob}", 192 * 2**30, 0,
                                               Decimal("3.5"), 900_000, 2000)],
        unique("demo-node"): [demo.SimWorkload(carol, f"train-{carol}", 64 * 2**30, 2,
                                               Decimal("7.9"), 120_000, 800, "H100")],
    }  # fmt: skip
    monkeypatch.setattr(demo, "FLEET", fleet)
    config = DEMO_QUOTAS.format(bob=bob)
    await policy_for(config)
    stop = asyncio.Event()
    running = asyncio.create_task(demo.run_fleet(nc, prefix, stop, interval=0.5))
    try:
        # The policy records the workloads the fleet announced, like a real host's.
        async def announced() -> bool:
            n = await pool.fetchval(
                "SELECT count(*) FROM policy_workloads WHERE subject = ANY($1::text[]) "
                "AND stopped_at IS NULL", [bob, carol])  # fmt: skip
            return n == 2

        await wait_until(announced, 30, "the demo's workloads announced to the policy")

        async def blocked() -> bool:
            return bool(await pool.fetchval(
                "SELECT count(*) FROM policy_decisions WHERE subject = $1 AND kind = 'block'",
                bob))  # fmt: skip

        await wait_until(blocked, 30, "bob's spawns blocked")
        # A hub retrying bob's spawn eight times: eight denials in a row.
        for _ in range(8):
            d = await spawn(nc, prefix, SpawnRequest(subject=bob, workload=f"next-{bob}"))
            assert not d.allowed
        # Carol's GPUs cost money: wait until the budget counts some and projects its end.
        settings = api_settings(
            tmp_path, database_url=database_url, nats_url=servers.nats_url, prefix=prefix
        )
        settings.config.write_text(config)
        async with live_api(settings) as url:
            async with httpx.AsyncClient(base_url=url, headers=AS_ADMIN) as api:

                async def forecast() -> bool:
                    r = await api.get(f"/v1/subjects/{carol}/quotas")
                    [budget] = [q for q in r.json()["quotas"] if q["name"] == "budget-30d"]
                    return budget["projected_exhaustion_at"] is not None

                await wait_until(forecast, 30, "a forecast of carol's budget")
            context = await browser.new_context(viewport={"width": 1200, "height": 1000})
            page = await context.new_page()
            await page.goto(url + "/")
            await page.fill("#token", ADMIN)
            await page.click("button[type=submit]")
            await page.goto(f"{url}/?subject={carol}")
            budget = page.locator('[data-quota="budget-30d"]')
            assert "USD" in await budget.locator(".used").inner_text()
            assert "At this rate you run out on" in await budget.locator(".forecast").inner_text()
            assert "USD" in await page.locator(".total-cost").inner_text()
            gpu = page.locator('article.chart-card[data-metric="gpu.alloc.seconds"]')
            assert "USD" in await gpu.locator(".cost").inner_text()
            text = await page.locator("body").inner_text()
            assert "No workloads announced to the policy yet" not in text
            row = page.locator(f'tr.workload[data-workload="train-{carol}"]')
            assert "running" in await row.inner_text()
            assert "GPU allocated" in await row.locator(".usage").inner_text()
            await page.screenshot(path=str(ARTIFACTS / "web-page-demo.png"), full_page=True)

            # Bob's page: the eight denials are one line (the demo's own checks name
            # other subjects). Decisions are stored behind the reply: wait for all eight.
            async def stored() -> bool:
                n = await pool.fetchval(
                    "SELECT count(*) FROM policy_decisions WHERE subject = $1 "
                    "AND kind = 'spawn' AND NOT allowed", bob)  # fmt: skip
                return n == 8

            await wait_until(stored, 30, "the eight denials stored")
            await page.goto(f"{url}/?subject={bob}")
            denials = page.locator('tr.event[data-kind="spawn"]')
            assert await denials.count() == 1
            assert await denials.first.get_attribute("data-count") == "8"
            line = await denials.first.inner_text()
            assert "Spawn denied \u00d78" in line and "last at" in line
            assert "running" in await page.locator(
                f'tr.workload[data-workload="jupyter-{bob}"]').inner_text()  # fmt: skip
            await page.screenshot(path=str(ARTIFACTS / "web-page-repeats.png"), full_page=True)
            await context.close()
    finally:
        stop.set()
        await asyncio.wait_for(running, 20)

    # The demo said its workloads stopped when it ended.
    async def stopped() -> bool:
        n = await pool.fetchval(
            "SELECT count(*) FROM policy_workloads WHERE subject = ANY($1::text[]) "
            "AND stopped_at IS NOT NULL", [bob, carol])  # fmt: skip
        return n == 2

    await wait_until(stopped, 30, "the demo's workloads announced as stopped")
