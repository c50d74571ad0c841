"""The web page in a real headless Chromium: sign in, read the bars and the chart, sign out.

Needs Debian's `chromium` at /usr/bin/chromium (`make install` brings it) and the
`playwright` Python package, which drives it without downloading a browser of its own.
A screenshot is saved under test-artifacts/.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import AsyncIterator
from datetime import timedelta
from decimal import Decimal
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from services.api.tokens import Role, issue_token
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
from tests.servers import TestServers

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
