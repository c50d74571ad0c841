"""JupyterHub sign-in: a hub API token is checked against the hub's `GET /hub/api/user`.

The hub user's name becomes the subject and the hub's groups the subject's groups, so a
JupyterHub user sees their own quotas with the token the hub gave them. Answers are
cached for a short while (revoking a hub token takes effect within that time).
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from urllib.parse import urlsplit

import httpx
from pydantic import BaseModel, ConfigDict, Field, ValidationError

from contracts._base import Name

from .metrics import HUB_CHECKS
from .tokens import Principal, Role

# Refusals are remembered for less time than acceptances: a user who just logged in to
# the hub should not wait a minute for a retried token to work.
REFUSAL_CACHE_SECONDS = 5.0
MAX_CACHED = 10_000


class HubError(Exception):
    """The hub did not give an answer about a token: unreachable, or a reply we cannot read."""


class HubRefused(Exception):
    """The hub says the token is not a valid user token."""


class _HubUser(BaseModel):
    model_config = ConfigDict(extra="ignore")

    kind: str = "user"
    name: Name
    groups: list[Name] = Field(default_factory=list, max_length=1000)


def user_endpoint(api_url: str) -> str:
    """`…/hub/api/user` from the hub's base URL or from its JUPYTERHUB_API_URL."""
    base = api_url.rstrip("/")
    return f"{base}/user" if base.endswith("/hub/api") else f"{base}/hub/api/user"


@dataclass
class HubAuthenticator:
    """Checks hub tokens, caching each answer for `cache_seconds` (refusals for less)."""

    api_url: str
    cache_seconds: float = 60.0
    timeout: float = 5.0
    clock: Callable[[], float] = time.monotonic
    _cache: dict[str, tuple[float, Principal | str]] = field(default_factory=dict)

    @property
    def where(self) -> str:
        parts = urlsplit(self.api_url)
        return f"{parts.hostname}:{parts.port}" if parts.port else str(parts.hostname)

    async def principal(self, token: str) -> Principal:
        """The hub user a token belongs to; `HubRefused` or `HubError` otherwise."""
        key = hashlib.sha256(token.encode()).hexdigest()
        now = self.clock()
        cached = self._cache.get(key)
        if cached is not None and cached[0] > now:
            if isinstance(cached[1], str):
                raise HubRefused(cached[1])
            return cached[1]
        try:
            found: Principal | str = await self._ask(token)
        except HubRefused as exc:
            HUB_CHECKS.labels("refused").inc()
            found = str(exc)
        except HubError:
            HUB_CHECKS.labels("unavailable").inc()
            raise
        else:
            HUB_CHECKS.labels("accepted").inc()
        self._remember(key, now, found)
        if isinstance(found, str):
            raise HubRefused(found)
        return found

    async def _ask(self, token: str) -> Principal:
        url = user_endpoint(self.api_url)
        try:
            async with httpx.AsyncClient(timeout=self.timeout) as http:
                r = await http.get(url, headers={"Authorization": f"token {token}"})
        except httpx.HTTPError as exc:
            raise HubError(
                f"JupyterHub at {self.where} did not answer ({type(exc).__name__}); "
                "retry in a moment, or tell your admin if it persists"
            ) from None
        if r.status_code in (401, 403, 404):
            raise HubRefused(
                f"JupyterHub did not accept this token (HTTP {r.status_code}); sign in to "
                "the hub again and copy a fresh token from its Token page"
            )
        if r.status_code != 200:
            raise HubError(f"JupyterHub at {self.where} answered HTTP {r.status_code}; retry")
        try:
            user = _HubUser.model_validate_json(r.content)
        except ValidationError:
            raise HubError(f"JupyterHub at {self.where} sent a user model we cannot read") from None
        if user.kind != "user":
            raise HubRefused(
                f"this is a JupyterHub {user.kind} token; services use a Tollgate "
                "integrator token (`tollgate token issue --role integrator`)"
            )
        return Principal(role=Role.USER, subject=user.name, groups=tuple(sorted(set(user.groups))))

    def _remember(self, key: str, now: float, found: Principal | str) -> None:
        ttl = self.cache_seconds if isinstance(found, Principal) else REFUSAL_CACHE_SECONDS
        ttl = min(ttl, self.cache_seconds)
        if ttl <= 0:
            return
        if len(self._cache) >= MAX_CACHED:
            for k in [k for k, (until, _) in self._cache.items() if until <= now]:
                del self._cache[k]
            if len(self._cache) >= MAX_CACHED:
                self._cache.clear()
        self._cache[key] = (now + ttl, found)
