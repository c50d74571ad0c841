"""Bearer authentication, rate limits and who may read what (SPEC 4).

The admin token is a static secret compared in constant time; every other role presents a
signed token from `tokens.py`, or (JupyterHub mode) a hub token the hub vouches for. A user
may read only their own subject: any other subject is a 404 indistinguishable from one
that does not exist, so names cannot be probed. Each principal has its own token bucket.
"""

from __future__ import annotations

import hmac
import math
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import TypeAdapter, ValidationError

from contracts._base import Name

from .deps import AuthKeys, deps_of
from .hub import HubAuthenticator, HubError, HubRefused
from .metrics import RATE_LIMITED
from .ratelimit import RateLimiter
from .tokens import (
    MAX_TOKEN_LENGTH,
    Principal,
    Role,
    TokenError,
    TokenExpired,
    looks_signed,
    verify_token,
)

HOW_TO_GET_A_TOKEN = (
    "Send 'Authorization: Bearer <token>'. Get a user token with "
    "`tollgate token issue --subject NAME --role user`, or use the admin token "
    "(TOLLGATE_ADMIN_TOKEN, or the admin-token file `tollgate up` writes to its data directory)."
)
SUBJECT_NOT_FOUND = "subject not found"
_NAME: TypeAdapter[str] = TypeAdapter(Name)

# Roles that may read any subject's usage and quotas.
READ_ANY_SUBJECT = frozenset({Role.ADMIN, Role.AUDITOR, Role.INTEGRATOR})

# Declared for the OpenAPI page's "Authorize" button; the header is parsed below so that
# each way of getting it wrong has its own message.
_bearer = HTTPBearer(auto_error=False, description="a token from `tollgate token issue`")


class AuthFailed(Exception):
    """A credential that cannot be accepted: the message says why and what to do."""

    def __init__(self, message: str, error: str | None = None, status: int = 401) -> None:
        super().__init__(message)
        self.error = error  # RFC 6750 error code for the WWW-Authenticate challenge
        self.status = status


async def authenticate(
    token: str, keys: AuthKeys, now: datetime, hub: HubAuthenticator | None
) -> Principal:
    """The principal a bearer token stands for, or `AuthFailed`.

    The admin token, then Tollgate's signed tokens, then (when configured) JupyterHub.
    """
    admin = keys.admin_token
    if admin and hmac.compare_digest(token.encode(), admin.encode()):
        return Principal(role=Role.ADMIN, subject=None)
    if looks_signed(token):
        try:
            return verify_token(keys.token_secret, token, now)
        except TokenExpired as exc:
            raise AuthFailed(f"Token expired: {exc}.", "invalid_token") from None
        except TokenError as exc:
            raise AuthFailed(f"Token refused: {exc}.", "invalid_token") from None
    if hub is not None and len(token) <= MAX_TOKEN_LENGTH:
        try:
            return await hub.principal(token)
        except HubRefused as exc:
            raise AuthFailed(f"Token refused: {exc}.", "invalid_token") from None
        except HubError as exc:
            raise AuthFailed(f"Cannot check the token now: {exc}.", status=503) from None
    raise AuthFailed(f"Token not recognised. {HOW_TO_GET_A_TOKEN}", "invalid_token")


def _unauthorized(message: str, error: str | None = None) -> HTTPException:
    challenge = 'Bearer realm="tollgate"'
    if error:
        # RFC 6750 §3: the error code tells clients whether to re-authenticate.
        challenge += f', error="{error}"'
    return HTTPException(401, message, headers={"WWW-Authenticate": challenge})


def throttle(limiter: RateLimiter, principal: Principal) -> None:
    """429 with Retry-After when `principal` has used up its requests for now."""
    wait = limiter.take(principal.key)
    if wait is not None:
        RATE_LIMITED.inc()
        who = "the admin token" if principal.subject is None else repr(principal.subject)
        raise HTTPException(
            429,
            f"Too many requests for {who}: at most {limiter.rate:g} per second with bursts "
            f"of {limiter.burst}. Retry in {math.ceil(wait)} s.",
            headers={"Retry-After": str(math.ceil(wait))},
        )


async def _principal(
    request: Request,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
    # Read from the app's state rather than as three dependencies of their own: FastAPI
    # resolves each dependency on every request, and this one is on every route.
    state = request.app.state
    clock = deps_of(request).clock
    keys: AuthKeys = state.keys
    limiter: RateLimiter = state.limiter
    header = request.headers.get("authorization")
    if not header:
        raise _unauthorized(f"No bearer token. {HOW_TO_GET_A_TOKEN}")
    scheme, _sep, token = header.partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        raise _unauthorized(
            f"The Authorization header must be 'Bearer <token>'. {HOW_TO_GET_A_TOKEN}",
            "invalid_request",
        )
    try:
        principal = await authenticate(token, keys, clock(), keys.hub)
    except AuthFailed as exc:
        if exc.status == 401:
            raise _unauthorized(str(exc), exc.error) from None
        raise HTTPException(exc.status, str(exc), headers={"Retry-After": "5"}) from None
    throttle(limiter, principal)
    return principal


CurrentUser = Annotated[Principal, Depends(_principal)]


def may_read_subject(principal: Principal, subject: str) -> bool:
    """Users read their own subject; admins, auditors and integrators read any."""
    return principal.role in READ_ANY_SUBJECT or principal.subject == subject


async def _readable_subject(
    principal: CurrentUser,
    subject: Annotated[str, Path(description="the subject, usually a user name")],
) -> str:
    if not may_read_subject(principal, subject):
        raise HTTPException(404, SUBJECT_NOT_FOUND)
    try:
        return _NAME.validate_python(subject)
    except ValidationError as exc:
        reason = exc.errors()[0]["msg"].removeprefix("Value error, ")
        raise HTTPException(422, f"subject: {reason}") from None


ReadableSubject = Annotated[str, Depends(_readable_subject)]


def _a(word: str) -> str:
    return f"{'an' if word[:1] in 'aeio' else 'a'} {word}"  # our role names: a user, an admin


def require_role(
    roles: frozenset[Role], what: str, how: str
) -> Callable[[Principal], Awaitable[Principal]]:
    """A dependency that lets only `roles` through, with a 403 that says who may and how."""
    names = " or ".join(sorted(r.value for r in roles))

    async def guard(principal: CurrentUser) -> Principal:
        if principal.role not in roles:
            raise HTTPException(
                403,
                f"{what} needs {_a(names)} token; yours is {_a(principal.role.value)} token. "
                + how,
            )
        return principal

    return guard


AdminUser = Annotated[
    Principal,
    Depends(
        require_role(
            frozenset({Role.ADMIN}),
            "A usage report",
            "Use the admin token (TOLLGATE_ADMIN_TOKEN, or the admin-token file of `tollgate up`).",
        )
    ),
]
SpawnCaller = Annotated[
    Principal,
    Depends(
        require_role(
            frozenset({Role.ADMIN, Role.INTEGRATOR}),
            "A spawn check",
            "Ask an admin for one: `tollgate token issue --subject NAME --role integrator`.",
        )
    ),
]
