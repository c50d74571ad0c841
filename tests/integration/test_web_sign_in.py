"""The web page's sign-in, sign-out, admin view and bad input, without a browser."""

from __future__ import annotations

import html
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import httpx
import pytest
from nats.aio.client import Client

from infra.settings import Settings
from services.api.app import create_app
from services.api.deps import ApiDeps
from services.api.options import ApiOptions
from services.api.routes.web import COOKIE
from services.api.tokens import Role, issue_token
from services.policy.config import parse_config
from services.policy.source import ConfigSource
from tests.integration.test_api_support import ADMIN, QUOTAS, SECRET, World, seeded_world
from tests.servers import TestServers


@pytest.fixture(scope="module")
async def world(servers: TestServers) -> AsyncIterator[World]:
    async with seeded_world(servers) as w:
        yield w


@pytest.fixture
async def client(world: World, nc: Client, tmp_path: Path) -> AsyncIterator[httpx.AsyncClient]:
    pool = world.pool
    settings = Settings(data_dir=tmp_path, admin_token=ADMIN, token_secret=SECRET)
    deps = ApiDeps(pool, nc, ConfigSource.fixed(parse_config(QUOTAS)))
    app = create_app(settings, deps=deps, options=ApiOptions())
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://tollgate.test") as c:
        yield c


async def test_signing_in_sets_a_cookie_that_lasts_no_longer_than_the_token(
    client: httpx.AsyncClient,
) -> None:
    token = issue_token(SECRET, "alice", Role.USER, timedelta(minutes=10))

    r = await client.post("/sign-in", data={"token": token})

    assert r.status_code == 303
    cookie = r.headers["set-cookie"]
    assert cookie.startswith(f"{COOKIE}={token};")
    max_age = int(cookie.split("Max-Age=")[1].split(";")[0])
    assert 590 <= max_age <= 600
    assert "HttpOnly" in cookie and "Path=/" in cookie and "Secure" not in cookie
    page = await client.get("/")
    assert page.headers["content-security-policy"].startswith("default-src 'none'; style-src")
    assert page.headers["cache-control"] == "no-store"
    assert page.headers["x-frame-options"] == "DENY"
    out = await client.post("/sign-out")
    assert out.status_code == 303 and "Max-Age=0" in out.headers["set-cookie"]
    assert "Sign in" in (await client.get("/")).text


async def test_a_cookie_is_not_a_bearer_token_for_the_api(client: httpx.AsyncClient) -> None:
    client.cookies.set(COOKIE, ADMIN)

    page = await client.get("/")
    api = await client.get("/v1/reports/usage")

    assert page.status_code == 200
    assert api.status_code == 401  # a forged cross-site request carries no bearer header


@pytest.mark.parametrize(
    ("form", "headers", "status", "says"),
    [
        ({"token": ""}, {}, 422, "Paste your token first."),
        ({"token": "x" * 20_000}, {}, 413, "far too long"),
        ({"token": ADMIN}, {"Origin": "https://evil.example"}, 403, "this site's own form"),
        ({"token": ADMIN}, {"Origin": "null"}, 403, "this site's own form"),
        ({"token": "tg1.abc.def"}, {}, 401, "signature does not match"),
    ],
)
async def test_bad_sign_ins_say_what_went_wrong_and_set_no_cookie(
    client: httpx.AsyncClient, form: dict[str, str], headers: dict[str, str], status: int, says: str
) -> None:
    r = await client.post("/sign-in", data=form, headers=headers)

    assert r.status_code == status
    assert says in html.unescape(r.text)
    assert "set-cookie" not in r.headers


async def test_an_expired_cookie_shows_the_sign_in_form_with_the_reason(
    client: httpx.AsyncClient,
) -> None:
    old = issue_token(
        SECRET, "alice", Role.USER, timedelta(hours=1), datetime.now(UTC) - timedelta(hours=2)
    )
    client.cookies.set(COOKIE, old)

    r = await client.get("/")

    assert r.status_code == 401
    assert "Token expired" in r.text and "Sign in again." in r.text
    assert "Max-Age=0" in r.headers["set-cookie"]


async def test_an_admin_picks_a_subject_from_those_with_usage(client: httpx.AsyncClient) -> None:
    client.cookies.set(COOKIE, ADMIN)

    listing = await client.get("/")
    alice = await client.get("/", params={"subject": "alice", "range": "7d"})

    assert 'href="/?subject=alice"' in listing.text and 'href="/?subject=bob"' in listing.text
    assert "<h1>alice</h1>" in alice.text
    assert 'href="/?range=30d&amp;subject=alice"' in alice.text  # the tabs keep the subject


@pytest.mark.parametrize(
    ("params", "status", "says"),
    [
        ({"range": "1y"}, 422, "range must be one of 24h, 7d, 30d, 90d"),
        ({"subject": "a\x01b"}, 422, "subject: must not contain control characters"),
        ({"subject": "x" * 300}, 422, "subject: must be 1 to 200 characters"),
    ],
)
async def test_bad_page_parameters_get_a_4xx_page_saying_why(
    client: httpx.AsyncClient, params: dict[str, str], status: int, says: str
) -> None:
    client.cookies.set(COOKIE, ADMIN)

    r = await client.get("/", params=params)

    assert r.status_code == status
    assert says in r.text
