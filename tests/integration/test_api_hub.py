"""JupyterHub mode against a small fake hub on a loopback port, and per-principal rate limits."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path

import asyncpg
import httpx
import pytest
import uvicorn
from nats.aio.client import Client
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from infra.settings import Settings
from services.api.app import create_app
from services.api.bootstrap import listen
from services.api.deps import ApiDeps
from services.api.errors import ApiStartupError
from services.api.options import ApiOptions
from services.api.routes.web import COOKIE
from services.api.tokens import Role, issue_token
from services.policy.config import parse_config
from services.policy.source import ConfigSource
from tests.conftest import wait_until
from tests.integration.test_api_support import ADMIN, QUOTAS, SECRET, seed_scene
from tollgate.embedded import free_port

GPU_QUOTA = """
  - name: gpu-30d
    metric: gpu.alloc.seconds
    limit: 160 GPU*h
    window: {rolling: 30d}
    applies_to: {groups: [gpu-dev]}
"""
HUB_QUOTAS = QUOTAS.replace("failure_mode:", GPU_QUOTA.lstrip("\n") + "failure_mode:")
USERS = {
    "hub-token-alice": {"kind": "user", "name": "alice", "groups": ["gpu-dev"], "admin": False},
    "hub-token-cull": {"kind": "service", "name": "idle-culler"},
}


@dataclass
class FakeHub:
    """JupyterHub's `GET /hub/api/user`, as much of it as Tollgate uses."""

    url: str = ""
    asked: list[str] = field(default_factory=list)
    broken: bool = False

    async def user(self, request: Request) -> JSONResponse:
        token = request.headers.get("authorization", "").removeprefix("token ")
        self.asked.append(token)
        if self.broken:
            return JSONResponse({"message": "oops"}, status_code=500)
        if token not in USERS:
            return JSONResponse({"status": 403, "message": "Forbidden"}, status_code=403)
        return JSONResponse(USERS[token])


@pytest.fixture
async def hub() -> AsyncIterator[FakeHub]:
    fake = FakeHub()
    app = Starlette(routes=[Route("/hub/api/user", fake.user)])
    sock = listen("127.0.0.1", 0)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", lifespan="off"))
    task = asyncio.create_task(server.serve(sockets=[sock]))

    async def listening() -> bool:
        return server.started

    await wait_until(listening, 10, "the fake hub to listen")
    fake.url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        yield fake
    finally:
        server.should_exit = True
        with contextlib.suppress(asyncio.CancelledError):
            await task
        sock.close()


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def client_for(
    tmp_path: Path, pool: asyncpg.Pool, nc: Client, options: ApiOptions
) -> tuple[httpx.AsyncClient, FakeClock]:
    settings = Settings(data_dir=tmp_path, admin_token=ADMIN, token_secret=SECRET)
    deps = ApiDeps(pool, nc, ConfigSource.fixed(parse_config(HUB_QUOTAS)))
    app = create_app(settings, deps=deps, options=options)
    clock = FakeClock()
    if app.state.keys.hub is not None:
        app.state.keys.hub.clock = clock
    app.state.limiter.clock = clock
    transport = httpx.ASGITransport(app=app)
    return httpx.AsyncClient(transport=transport, base_url="http://t"), clock


def token(name: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {name}"}


async def test_a_hub_user_sees_their_own_quotas_with_their_hub_groups(
    hub: FakeHub, pool: asyncpg.Pool, nc: Client, tmp_path: Path
) -> None:
    await seed_scene(pool)
    options = ApiOptions(jupyterhub_api_url=hub.url)
    c, _ = client_for(tmp_path, pool, nc, options)
    signed = token(issue_token(SECRET, "alice", Role.USER, timedelta(hours=1)))
    async with c:
        own = await c.get("/v1/subjects/alice/quotas", headers=token("hub-token-alice"))
        others = await c.get("/v1/subjects/bob/quotas", headers=token("hub-token-alice"))
        by_signed_token = await c.get("/v1/subjects/alice/quotas", headers=signed)
        by_admin = await c.get("/v1/subjects/alice/quotas", headers=token(ADMIN))

    assert own.status_code == 200, own.text
    assert "gpu-dev" in own.json()["groups"]
    assert "gpu-30d" in [q["name"] for q in own.json()["quotas"]]
    assert others.status_code == 404 and "bob" not in others.text
    # Hub groups count when the hub user asks; other tokens know nothing of them.
    assert "gpu-30d" not in [q["name"] for q in by_signed_token.json()["quotas"]]
    assert by_admin.status_code == 200
    assert hub.asked == ["hub-token-alice"]  # signed and admin tokens never go to the hub


async def test_hub_answers_are_cached_for_a_while(
    hub: FakeHub, pool: asyncpg.Pool, nc: Client, tmp_path: Path
) -> None:
    options = ApiOptions(jupyterhub_api_url=hub.url + "/hub/api", jupyterhub_cache_seconds=30)
    c, clock = client_for(tmp_path, pool, nc, options)
    async with c:
        for _ in range(3):
            r = await c.get("/v1/subjects/alice/usage", headers=token("hub-token-alice"))
            assert r.status_code == 200
        refused = [await c.get("/v1/subjects/alice/usage", headers=token("nope")) for _ in "ab"]
        assert hub.asked == ["hub-token-alice", "nope"]
        clock.now += 31
        await c.get("/v1/subjects/alice/usage", headers=token("hub-token-alice"))
        await c.get("/v1/subjects/alice/usage", headers=token("nope"))

    assert hub.asked == ["hub-token-alice", "nope", "hub-token-alice", "nope"]
    assert all(r.status_code == 401 for r in refused)
    assert "JupyterHub did not accept this token (HTTP 403)" in refused[0].json()["detail"]


async def test_hub_service_tokens_and_an_unreachable_hub_are_refused_clearly(
    hub: FakeHub, pool: asyncpg.Pool, nc: Client, tmp_path: Path
) -> None:
    c, _ = client_for(tmp_path, pool, nc, ApiOptions(jupyterhub_api_url=hub.url))
    dead, _ = client_for(
        tmp_path, pool, nc, ApiOptions(jupyterhub_api_url=f"http://127.0.0.1:{free_port()}")
    )
    async with c, dead:
        service = await c.get("/v1/subjects/alice/usage", headers=token("hub-token-cull"))
        hub.broken = True
        broken = await c.get("/v1/subjects/alice/usage", headers=token("hub-token-alice"))
        unreachable = await dead.get("/v1/subjects/alice/usage", headers=token("hub-token-x"))

    assert service.status_code == 401
    assert (
        "JupyterHub service token; services use a Tollgate integrator token"
        in (service.json()["detail"])
    )
    assert broken.status_code == 503 and broken.headers["Retry-After"] == "5"
    assert "answered HTTP 500" in broken.json()["detail"]
    assert unreachable.status_code == 503
    assert "did not answer (ConnectError)" in unreachable.json()["detail"]


async def test_a_hub_user_signs_in_to_the_page_with_their_hub_token(
    hub: FakeHub, pool: asyncpg.Pool, nc: Client, tmp_path: Path
) -> None:
    await seed_scene(pool)
    c, _ = client_for(tmp_path, pool, nc, ApiOptions(jupyterhub_api_url=hub.url))
    async with c:
        form = await c.get("/")
        signed_in = await c.post("/sign-in", data={"token": "hub-token-alice"})
        page = await c.get("/")
        assert c.cookies.get(COOKIE) == "hub-token-alice"
        refused = await c.post("/sign-in", data={"token": "stolen-guess"})

    assert "JupyterHub" in form.text
    assert signed_in.status_code == 303 and signed_in.headers["location"] == "/"
    assert "HttpOnly" in signed_in.headers["set-cookie"]
    assert "SameSite=lax" in signed_in.headers["set-cookie"]
    assert page.status_code == 200 and "<h1>alice</h1>" in page.text
    assert 'data-quota="gpu-30d"' in page.text
    assert refused.status_code == 401 and "did not accept this token" in refused.text


async def test_each_principal_has_its_own_rate_limit(
    pool: asyncpg.Pool, nc: Client, tmp_path: Path
) -> None:
    options = ApiOptions(api_rate_per_second=0.5, api_rate_burst=3)
    c, clock = client_for(tmp_path, pool, nc, options)
    alice = token(issue_token(SECRET, "alice", Role.USER, timedelta(hours=1)))
    bob = token(issue_token(SECRET, "bob", Role.USER, timedelta(hours=1)))
    async with c:
        burst = [await c.get("/v1/subjects/alice/usage", headers=alice) for _ in range(3)]
        limited = await c.get("/v1/subjects/alice/quotas", headers=alice)
        others = await c.get("/v1/subjects/bob/usage", headers=bob)
        c.cookies.set(COOKIE, alice["Authorization"].removeprefix("Bearer "))
        page = await c.get("/")
        c.cookies.clear()
        clock.now += 2  # one token back at 0.5/s
        again = await c.get("/v1/subjects/alice/usage", headers=alice)
        limited_again = await c.get("/v1/subjects/alice/usage", headers=alice)
        anonymous = await c.get("/healthz")

    assert [r.status_code for r in burst] == [200, 200, 200]
    assert limited.status_code == 429
    assert limited.headers["Retry-After"] == "2"
    assert (
        "Too many requests for 'alice': at most 0.5 per second with bursts of 3"
        in (limited.json()["detail"])
    )
    assert others.status_code == 200
    assert page.status_code == 429 and "Too many requests" in page.text
    assert again.status_code == 200 and limited_again.status_code == 429
    assert anonymous.status_code == 200


async def test_sign_in_attempts_are_limited_per_address(
    hub: FakeHub, pool: asyncpg.Pool, nc: Client, tmp_path: Path
) -> None:
    options = ApiOptions(jupyterhub_api_url=hub.url, api_rate_per_second=0.5, api_rate_burst=3)
    c, _ = client_for(tmp_path, pool, nc, options)
    async with c:
        tries = [await c.post("/sign-in", data={"token": f"guess-{i}"}) for i in range(4)]

    assert [r.status_code for r in tries] == [401, 401, 401, 429]
    assert "Too many sign-in attempts; try again in 2 s." in tries[3].text
    assert tries[3].headers["Retry-After"] == "2"
    assert hub.asked == ["guess-0", "guess-1", "guess-2"]  # the fourth never reached the hub


async def test_a_bad_setting_stops_the_api_with_the_variable_to_fix(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TOLLGATE_JUPYTERHUB_API_URL", "hub:8081")
    monkeypatch.setenv("TOLLGATE_API_RATE_BURST", "0")
    settings = Settings(data_dir=tmp_path, admin_token=ADMIN, token_secret=SECRET)

    with pytest.raises(ApiStartupError) as caught:
        create_app(settings)

    assert "TOLLGATE_JUPYTERHUB_API_URL: 'hub:8081' is not an http(s) URL" in str(caught.value)
    assert "TOLLGATE_API_RATE_BURST: Input should be greater than or equal to 1" in str(
        caught.value
    )
