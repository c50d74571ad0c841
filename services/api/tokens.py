"""Signed, expiring bearer tokens: `tg1.<base64url(claims)>.<base64url(hmac-sha256)>`.

Pure: no I/O. The admin token is a static secret checked in `auth.py`; every other role
carries a token minted here, so the API never needs a user table to check one.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from enum import StrEnum

from contracts._base import name_problem

VERSION = "tg1"
# Long enough for any real token, short enough that garbage is refused before any work.
MAX_TOKEN_LENGTH = 4096
MAX_TTL = timedelta(days=400)


class Role(StrEnum):
    ADMIN = "admin"
    AUDITOR = "auditor"
    INTEGRATOR = "integrator"
    USER = "user"


# The admin role is the static TOLLGATE_ADMIN_TOKEN: a signed token can never claim it, so
# a leaked signing secret does not hand out admin rights.
SIGNED_ROLES = frozenset({Role.AUDITOR, Role.INTEGRATOR, Role.USER})


@dataclass(frozen=True)
class Principal:
    """Who a request acts as. `subject` is None for the admin.

    `groups` are the groups an identity provider (JupyterHub) says the subject is in.
    """

    role: Role
    subject: str | None
    expires_at: datetime | None = None
    groups: tuple[str, ...] = ()

    @property
    def key(self) -> str:
        """Who this is, for rate limits: one bucket per role and subject."""
        return f"{self.role.value}:{self.subject or ''}"


class TokenError(Exception):
    """A bearer token that cannot be accepted; the message says why and what to do."""


class MalformedToken(TokenError):
    """Not a Tollgate token at all, or its claims are unreadable."""


class BadSignature(TokenError):
    """The signature does not match: altered, or signed with another secret."""


class TokenExpired(TokenError):
    """A genuine token past its expiry."""

    def __init__(self, subject: str, expired_at: datetime) -> None:
        super().__init__(
            f"the token for {subject!r} expired at {expired_at:%Y-%m-%d %H:%M:%S} UTC; "
            f"issue a new one with `tollgate token issue --subject {subject} --role ...`"
        )
        self.subject = subject
        self.expired_at = expired_at


def _b64encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


_B64_ALPHABET = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_")


def _b64decode(text: str) -> bytes:
    # The stdlib decoder skips characters outside the alphabet; a token must not.
    if not text or any(c not in _B64_ALPHABET for c in text):
        raise ValueError("not base64url")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def _mac(secret: str, signed_part: str) -> bytes:
    if not secret:
        raise ValueError(
            "the token secret is empty; set TOLLGATE_TOKEN_SECRET or run `tollgate up`"
        )
    return hmac.new(secret.encode(), signed_part.encode("ascii"), hashlib.sha256).digest()


def issue_token(
    secret: str, subject: str, role: Role | str, ttl: timedelta, now: datetime | None = None
) -> str:
    """Mint a token for `subject` acting as `role`, valid for `ttl` from `now`."""
    role = Role(role)
    if role not in SIGNED_ROLES:
        raise ValueError(
            "admin tokens are not minted: use TOLLGATE_ADMIN_TOKEN or the admin-token file "
            "`tollgate up` writes to its data directory"
        )
    problem = name_problem(subject)
    if problem is not None:
        raise ValueError(f"subject {problem}")
    if not timedelta(0) < ttl <= MAX_TTL:
        raise ValueError(f"ttl must be positive and at most {MAX_TTL.days} days")
    issued = int((now or datetime.now(UTC)).timestamp())
    claims = {
        "sub": subject,
        "role": role.value,
        "iat": issued,
        "exp": issued + int(ttl.total_seconds()),
    }
    payload = _b64encode(json.dumps(claims, separators=(",", ":"), sort_keys=True).encode())
    signed_part = f"{VERSION}.{payload}"
    return f"{signed_part}.{_b64encode(_mac(secret, signed_part))}"


def looks_signed(token: str) -> bool:
    """True for tokens in this module's format (as opposed to the static admin token)."""
    return token.startswith(VERSION + ".")


def verify_token(secret: str, token: str, now: datetime) -> Principal:
    """The principal a token names, or a `TokenError` saying why it is refused."""
    parts = token.split(".") if len(token) <= MAX_TOKEN_LENGTH else []
    if len(parts) != 3 or parts[0] != VERSION:
        raise MalformedToken(
            "the token is not a Tollgate token (expected tg1.<claims>.<signature>); "
            "copy it again from `tollgate token issue` without extra characters"
        )
    try:
        signature = _b64decode(parts[2])
    except (ValueError, binascii.Error):
        raise MalformedToken("the token's signature part is not base64url") from None
    # Check the signature before reading the claims: nothing unauthenticated gets parsed.
    if not hmac.compare_digest(signature, _mac(secret, f"{parts[0]}.{parts[1]}")):
        raise BadSignature(
            "the token's signature does not match: it was altered, or it was signed by "
            "another Tollgate (different data directory or TOLLGATE_TOKEN_SECRET); "
            "issue a new one with `tollgate token issue`"
        )
    principal = _principal(parts[1])
    assert principal.subject is not None and principal.expires_at is not None
    if now >= principal.expires_at:
        raise TokenExpired(principal.subject, principal.expires_at)
    return principal


def _principal(payload: str) -> Principal:
    try:
        claims = json.loads(_b64decode(payload))
    except (ValueError, binascii.Error, UnicodeDecodeError):
        raise MalformedToken("the token's claims are not readable JSON") from None
    ok = (
        isinstance(claims, dict)
        and isinstance(claims.get("sub"), str)
        and claims["sub"] != ""
        and claims.get("role") in {r.value for r in SIGNED_ROLES}
        and type(claims.get("exp")) is int
        and type(claims.get("iat")) is int
    )
    if not ok:
        raise MalformedToken("the token's claims lack sub, a non-admin role, iat or exp")
    try:
        expires_at = datetime.fromtimestamp(claims["exp"], UTC)
    except (OverflowError, OSError, ValueError):
        raise MalformedToken("the token's expiry is not a representable time") from None
    return Principal(role=Role(claims["role"]), subject=claims["sub"], expires_at=expires_at)
