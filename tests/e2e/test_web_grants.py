"""The page in Chromium shows a grant with its expiry, a quota within grace, and a soft one."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import httpx
import pytest

from services.api.tokens import Role, issue_token
from tests.e2e.test_web_page import ARTIFACTS, launch, pytestmark  # noqa: F401
from tests.integration.test_api_support import (
    ADMIN,
    QUOTAS,
    SECRET,
    api_settings,
    live_api,
    seed_scene,
)
from tests.servers import TestServers

# The seeded scene against other limits: alice's 50 GiB·h over a 40 GiB·h memory limit (a
# grant lifts it), her 5.8 GB over 5 GB of egress inside a 20% grace, CPU a soft limit.
GRANTS_QUOTAS = (
    QUOTAS.replace("limit: 60 GiB*h", "limit: 40 GiB*h")
    .replace("    enforce: [spawn]\n", "    enforce: [spawn]\n    grace: 20%\n")
    .replace("limit: 200 core*h", "limit: 1 core*h\n    mode: soft")
)


@pytest.fixture
async def browser() -> AsyncIterator[Any]:
    async with launch() as b:
        yield b


async def test_the_page_shows_a_grant_and_its_expiry_grace_and_a_soft_limit(
    browser: Any, servers: TestServers, database_url: str, pool: asyncpg.Pool, tmp_path: Path
) -> None:
    await seed_scene(pool)
    settings = api_settings(tmp_path, database_url=database_url, nats_url=servers.nats_url)
    assert settings.config is not None
    settings.config.write_text(GRANTS_QUOTAS)
    token = issue_token(SECRET, "alice", Role.USER, timedelta(hours=1))
    async with live_api(settings) as url:
        async with httpx.AsyncClient(base_url=url) as http:
            r = await http.post(
                "/v1/subjects/alice/grants", headers={"Authorization": f"Bearer {ADMIN}"},
                json={"quota": "memory-30d", "amount": "20 GiB*h", "expires_in": "3d",
                      "reason": "thesis deadline"},
            )  # fmt: skip
            assert r.status_code == 201, r.text
            grant = r.json()
        context = await browser.new_context(viewport={"width": 1200, "height": 900})
        page = await context.new_page()
        await page.goto(url + "/")
        await page.fill("#token", token)
        await page.click("button[type=submit]")
        await page.wait_for_selector("article.quota")

        memory = page.locator('[data-quota="memory-30d"]')
        assert await memory.get_attribute("data-state") == "warning"  # 50 of 60 with the grant
        assert "50 of 60 GiB·h" in await memory.locator(".used").inner_text()
        line = await memory.locator(f'[data-grant="{grant["grant_id"]}"]').inner_text()
        assert f"Includes grant {grant['grant_id']}: +20 GiB·h until" in line
        expires = datetime.fromisoformat(grant["expires_at"])
        assert f"until {expires:%d %b %H:%M} UTC (in 2 d 23 h)" in line
        assert "Configured limit 40 GiB·h" in await memory.inner_text()

        egress = page.locator('[data-quota="egress-7d"]')
        assert await egress.get_attribute("data-state") == "exceeded"
        assert "Within grace" in await egress.locator(".head").inner_text()
        note = egress.locator(".note")
        assert await note.get_attribute("data-enforced") == "false"
        assert (await note.inner_text()).startswith("over by 0.8 GB, within grace")

        cpu = page.locator('[data-quota="cpu-month"]')
        assert "Soft" in await cpu.locator(".head").inner_text()
        assert "soft limit: reported, never enforced" in await cpu.locator(".foot").inner_text()

        ARTIFACTS.mkdir(exist_ok=True)
        await page.screenshot(path=str(ARTIFACTS / "web-grants.png"), full_page=True)
        await context.close()
