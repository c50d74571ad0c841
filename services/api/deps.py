"""What the API's handlers depend on, and the `Annotated` aliases that hand it to them.

`create_app` stores one `ApiDeps` on `app.state`: built by the lifespan in production, or
passed in by a test that already holds a pool and a NATS connection.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Annotated

import asyncpg
from fastapi import Depends, HTTPException, Request
from nats.aio.client import Client

from contracts._base import DEFAULT_PREFIX
from services.policy.config import PolicyConfig
from services.policy.source import ConfigSource

from .bus import ApiChannels
from .hub import HubAuthenticator
from .options import ApiOptions
from .ratelimit import RateLimiter

log = logging.getLogger("tollgate.api")

Clock = Callable[[], datetime]


def utc_now() -> datetime:
    return datetime.now(UTC)


@dataclass
class AuthKeys:
    """The secrets bearer tokens are checked against."""

    token_secret: str
    admin_token: str | None = None
    hub: HubAuthenticator | None = None  # JupyterHub mode, when TOLLGATE_JUPYTERHUB_API_URL is set


@dataclass
class ApiDeps:
    """Connections and configuration every request may use."""

    pool: asyncpg.Pool
    nc: Client | None  # None until the first connection to NATS succeeds
    config: ConfigSource
    clock: Clock = field(default=utc_now)
    nats_address: str = "NATS"  # host:port, for messages while not connected
    prefix: str = DEFAULT_PREFIX
    bus: ApiChannels | None = None  # the FastStream publishers, once connected

    def channels(self) -> ApiChannels | None:
        """The API's publishers (services.api.bus), or None while NATS is not connected.

        Over `nc` when a test handed one in; under `tollgate api` the lifespan's broker.
        """
        if self.bus is None and self.nc is not None:
            self.bus = ApiChannels.around(self.nc, self.prefix)
        return self.bus


async def _deps(request: Request) -> ApiDeps:
    deps: ApiDeps | None = getattr(request.app.state, "deps", None)
    if deps is None:
        # Only reachable when the app is served without its lifespan.
        raise HTTPException(503, "the API is still starting; retry in a moment")
    return deps


async def _pool(deps: Annotated[ApiDeps, Depends(_deps)]) -> asyncpg.Pool:
    return deps.pool


async def _config(deps: Annotated[ApiDeps, Depends(_deps)]) -> PolicyConfig:
    return deps.config.current()


async def _clock(deps: Annotated[ApiDeps, Depends(_deps)]) -> Clock:
    return deps.clock


async def _keys(request: Request) -> AuthKeys:
    keys: AuthKeys = request.app.state.keys
    return keys


async def _limiter(request: Request) -> RateLimiter:
    limiter: RateLimiter = request.app.state.limiter
    return limiter


async def _max_skew(request: Request) -> timedelta:
    skew: timedelta = request.app.state.max_skew
    return skew


async def _options(request: Request) -> ApiOptions:
    options: ApiOptions = request.app.state.options
    return options


# The providers are `async def` although they never wait: FastAPI runs plain `def`
# dependencies in a thread pool, a hop per dependency per request.
DepsDep = Annotated[ApiDeps, Depends(_deps)]
PoolDep = Annotated[asyncpg.Pool, Depends(_pool)]
ConfigDep = Annotated[PolicyConfig, Depends(_config)]
ClockDep = Annotated[Clock, Depends(_clock)]
KeysDep = Annotated[AuthKeys, Depends(_keys)]
LimiterDep = Annotated[RateLimiter, Depends(_limiter)]
OptionsDep = Annotated[ApiOptions, Depends(_options)]
MaxSkewDep = Annotated[timedelta, Depends(_max_skew)]  # TOLLGATE_MAX_CLOCK_SKEW
