"""Grants: extra allowance on one quota, recorded and revoked by an admin (SPEC addition).

The API publishes each record after it commits, on `tollgate.v1.grants.<scope>.<target>`;
the policy takes it as a cue to read the grants record (Postgres is the record, so a
missed message only delays the policy until its next sweep).
"""

from __future__ import annotations

from typing import Final, Literal

from pydantic import Field

from ._base import (
    DEFAULT_PREFIX,
    Contract,
    DecimalText,
    Name,
    UtcDatetime,
    encode_token,
    subject_of,
)

RECORDED_SCHEMA: Final = "tollgate.grant_recorded.v1"
REVOKED_SCHEMA: Final = "tollgate.grant_revoked.v1"


class GrantRecorded(Contract):
    """An admin granted extra allowance on a quota to a subject or a group pool."""

    schema_: Literal["tollgate.grant_recorded.v1"] = Field(default=RECORDED_SCHEMA, alias="schema")
    seq: int = Field(ge=1, description="position in the hash-chained grants record")
    grant_id: str
    scope: Literal["subject", "group"]
    target: Name = Field(description="the subject, or the group whose pool it raises")
    quota: str
    amount: DecimalText = Field(description="in the quota's unit")
    unit: str
    granted_by: str
    granted_at: UtcDatetime
    expires_at: UtcDatetime
    reason: str
    hash: str


class GrantRevoked(Contract):
    """An admin revoked a grant before it expired."""

    schema_: Literal["tollgate.grant_revoked.v1"] = Field(default=REVOKED_SCHEMA, alias="schema")
    seq: int = Field(ge=1)
    grant_id: str
    scope: Literal["subject", "group"]
    target: Name
    quota: str
    revoked_by: str
    revoked_at: UtcDatetime
    reason: str
    hash: str


def grants_subject(scope: str, target: str, prefix: str = DEFAULT_PREFIX) -> str:
    """`tollgate.v1.grants.<subject|group>.<target>`."""
    return subject_of(prefix, "grants", scope, encode_token(target))


def grants_wildcard(prefix: str = DEFAULT_PREFIX) -> str:
    """Every grant record."""
    return subject_of(prefix, "grants", ">")
