"""Bearer authentication and who may read what (SPEC 4).

The admin token is a static secret compared in constant time; every other role presents a
signed token from `tokens.py`. A user may read only their own subject: any other subject is
a 404 indistinguishable from one that does not exist, so names cannot be probed.
"""

from __future__ import annotations

import hmac
from typing import Annotated

from fastapi import Depends, HTTPException, Path, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from pydantic import TypeAdapter, ValidationError

from contracts._base import Name

from .deps import ClockDep, KeysDep
from .tokens import Principal, Role, TokenError, TokenExpired, looks_signed, verify_token

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


def _unauthorized(message: str, error: str | None = None) -> HTTPException:
    challenge = 'Bearer realm="tollgate"'
    if error:
        # RFC 6750 §3: the error code tells clients whether to re-authenticate.
        challenge += f', error="{error}"'
    return HTTPException(401, message, headers={"WWW-Authenticate": challenge})


def _principal(
    request: Request,
    keys: KeysDep,
    clock: ClockDep,
    _: Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)],
) -> Principal:
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
    admin = keys.admin_token
    if admin and hmac.compare_digest(token.encode(), admin.encode()):
        return Principal(role=Role.ADMIN, subject=None)
    if looks_signed(token):
        try:
            return verify_token(keys.token_secret, token, clock())
        except TokenExpired as exc:
            raise _unauthorized(f"Token expired: {exc}.", "invalid_token") from None
        except TokenError as exc:
            raise _unauthorized(f"Token refused: {exc}.", "invalid_token") from None
    raise _unauthorized(f"Token not recognised. {HOW_TO_GET_A_TOKEN}", "invalid_token")


CurrentUser = Annotated[Principal, Depends(_principal)]


def may_read_subject(principal: Principal, subject: str) -> bool:
    """Users read their own subject; admins, auditors and integrators read any."""
    return principal.role in READ_ANY_SUBJECT or principal.subject == subject


def _readable_subject(
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
