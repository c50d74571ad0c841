"""The API application: routers, error mapping and the connections its lifespan owns."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager
from urllib.parse import urlsplit

import asyncpg
from fastapi import FastAPI

from infra.broker import TollgateBroker, bus_metrics
from infra.bus import CredentialsError, seed_public_key
from infra.db import close_pool, connect_and_migrate
from infra.settings import Settings
from infra.tasks import cancel_and_wait
from services.policy.config import ConfigError
from services.policy.source import ConfigSource

from . import errors
from .bus import ApiChannels
from .deps import ApiDeps, AuthKeys
from .errors import ApiStartupError
from .hub import HubAuthenticator
from .limits import BodyLimit
from .metrics import RequestMetrics
from .options import ApiOptions, options_from_environment
from .ratelimit import RateLimiter
from .routes import (
    audit,
    grants,
    health,
    metrics,
    quotas,
    reports,
    spawn,
    usage,
    web,
    workloads,
)

DESCRIPTION = """Usage and quotas of Tollgate subjects.

Authenticate with `Authorization: Bearer <token>`: mint one with
`tollgate token issue --subject NAME --role user`, use the admin token, or (JupyterHub
mode) a hub API token. Each principal may make `TOLLGATE_API_RATE_PER_SECOND` requests
per second with bursts of `TOLLGATE_API_RATE_BURST`; beyond that the answer is 429 with
`Retry-After`. People sign in to the web page at `/`.
"""


def create_app(
    settings: Settings, deps: ApiDeps | None = None, options: ApiOptions | None = None
) -> FastAPI:
    """The FastAPI app. With `deps` it uses those connections and never opens or closes any.

    `options` default to the TOLLGATE_* environment (JupyterHub, rate limits, timeouts).
    """
    if options is None:
        try:
            options = options_from_environment()
        except ValueError as exc:
            raise ApiStartupError(f"{exc}; fix the variable or unset it") from None
    app = FastAPI(
        title="Tollgate", version="1", description=DESCRIPTION, lifespan=_lifespan(settings)
    )
    app.state.deps = deps
    app.state.injected = deps is not None
    app.state.startup_error = None
    # Read once: rotating the admin token or the signing secret takes an API restart.
    secret = settings.resolved_token_secret(create=True)
    if not secret:
        raise ApiStartupError(
            f"the token secret is empty; set TOLLGATE_TOKEN_SECRET or delete "
            f"{settings.data_dir / 'token-secret'} so a new one is made"
        )
    hub = None
    if options.jupyterhub_api_url:
        hub = HubAuthenticator(
            options.jupyterhub_api_url, options.jupyterhub_cache_seconds, options.jupyterhub_timeout
        )
    app.state.keys = AuthKeys(
        token_secret=secret, admin_token=settings.resolved_admin_token(), hub=hub
    )
    app.state.options = options
    # Where every read of usage ends depends on how far the ledger lets clocks stray.
    app.state.max_skew = settings.max_clock_skew
    app.state.limiter = RateLimiter(options.api_rate_per_second, options.api_rate_burst)
    errors.install(app)
    app.add_middleware(BodyLimit)
    app.add_middleware(RequestMetrics)
    for module in (
        health, metrics, web, usage, quotas, grants, workloads, spawn, reports, audit,
    ):  # fmt: skip
        app.include_router(module.router)
    return app


def _lifespan(settings: Settings) -> Callable[[FastAPI], AbstractAsyncContextManager[None]]:
    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if app.state.injected:
            yield
            return
        try:
            async with _connected(settings) as deps:
                app.state.deps = deps
                try:
                    yield
                finally:
                    app.state.deps = None
        except ApiStartupError as exc:
            # Kept for `bootstrap.serve`, which turns it into one clear line for the user.
            app.state.startup_error = exc
            raise

    return lifespan


def _where(url: str) -> str:
    """host:port of a server URL, without any credentials it may carry."""
    parts = urlsplit(url)
    return f"{parts.hostname}:{parts.port}" if parts.hostname else "the configured address"


@contextlib.asynccontextmanager
async def _connected(settings: Settings) -> AsyncIterator[ApiDeps]:
    try:
        config = ConfigSource.load(settings.config)
    except ConfigError as exc:
        raise ApiStartupError(f"{exc}\nFix the file or unset TOLLGATE_CONFIG.") from None
    s = settings.with_endpoints()
    if not s.nats_url or not s.database_url:
        raise ApiStartupError(
            "the API does not know where NATS and Postgres are: start it with `tollgate up`, "
            "or set TOLLGATE_NATS_URL and TOLLGATE_DATABASE_URL"
        )
    if s.nats_nkey_seed_file is not None:
        try:  # checked now: NATS is joined in the background, where it would go unseen
            seed_public_key(s.nats_nkey_seed_file)
        except CredentialsError as exc:
            raise ApiStartupError(str(exc)) from None
    try:
        pool = await connect_and_migrate(s.database_url)
    except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
        raise ApiStartupError(
            f"cannot open Postgres at {_where(s.database_url)} (TOLLGATE_DATABASE_URL): "
            f"{exc}; check that the server is up"
        ) from exc
    deps = ApiDeps(
        pool=pool, nc=None, config=config, nats_address=_where(s.nats_url), prefix=s.prefix
    )
    # NATS is joined in the background: only spawn checks and a part of /metrics need it
    # (and answer without it), and the client
    # retries forever, so waiting for it would leave the API silent while NATS is down.
    # /readyz reports it until it is connected.
    broker = TollgateBroker(
        s.nats_url, name="tollgate-api", seed_file=s.nats_nkey_seed_file,
        middlewares=[bus_metrics("tollgate-api")],
    )  # fmt: skip
    channels = ApiChannels(broker, s.prefix)
    joining = asyncio.create_task(_join_nats(deps, broker, channels))
    try:
        yield deps
    finally:
        await cancel_and_wait([joining])
        await broker.stop()  # closes the connection (with a timeout), never drains it
        await close_pool(pool)


async def _join_nats(deps: ApiDeps, broker: TollgateBroker, channels: ApiChannels) -> None:
    # Connected, not started: the API only publishes and requests (no subscribers).
    await broker.connect()
    deps.bus = channels
    deps.nc = broker.nc
