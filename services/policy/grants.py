"""Grants, pure: extra allowance on one quota for a subject or a group pool, for a while.

The record is append-only: a grant is one record, its revocation another. Each record is
chained by hash to the one before it, so a rewritten or deleted record shows on verify.
A grant raises its quota's limit while it is neither expired nor revoked.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Literal

GENESIS = "0" * 64
# A grant that ended this recently is named in the decisions it no longer lifts.
LAPSED_SHOWN = timedelta(days=7)

Scope = Literal["subject", "group"]
Kind = Literal["grant", "revoke"]


@dataclass(frozen=True)
class GrantRecord:
    """One row of the grants record: a grant, or the revocation of one."""

    seq: int
    kind: Kind
    grant_id: str
    scope: Scope
    target: str
    quota: str
    actor: str
    reason: str
    recorded_at: datetime
    amount: Decimal | None = None  # in the metric's base unit; None for a revocation
    amount_text: str | None = None  # as the admin wrote it, e.g. "10 GiB*h"
    expires_at: datetime | None = None
    prev_hash: str = GENESIS
    hash: str = ""

    def canonical(self) -> bytes:
        """The bytes the hash covers: every field but the hash itself, in a fixed form."""
        body = {
            "seq": self.seq,
            "kind": self.kind,
            "grant_id": self.grant_id,
            "scope": self.scope,
            "target": self.target,
            "quota": self.quota,
            "actor": self.actor,
            "reason": self.reason,
            "recorded_at": _instant(self.recorded_at),
            "amount": None if self.amount is None else _exact(self.amount),
            "amount_text": self.amount_text,
            "expires_at": None if self.expires_at is None else _instant(self.expires_at),
        }
        return json.dumps(body, sort_keys=True, separators=(",", ":")).encode()

    def chained(self, prev_hash: str) -> GrantRecord:
        """This record linked after `prev_hash`, with its own hash."""
        linked = replace(self, prev_hash=prev_hash)
        return replace(linked, hash=record_hash(prev_hash, linked))


def _exact(value: Decimal) -> str:
    return format(value.quantize(Decimal("0.000001")), "f")


def _instant(t: datetime) -> str:
    # Microseconds, as Postgres keeps them: the hash survives the round trip.
    return f"{t.timestamp():.6f}"


def record_hash(prev_hash: str, record: GrantRecord) -> str:
    return hashlib.sha256(prev_hash.encode() + b"\x1f" + record.canonical()).hexdigest()


@dataclass(frozen=True)
class ChainCheck:
    ok: bool
    records: int
    head_hash: str
    first_bad_seq: int | None = None
    problem: str | None = None


def verify(records: Iterable[GrantRecord]) -> ChainCheck:
    """Recompute the chain in seq order; name the first record that does not hold."""
    prev, count, expected = GENESIS, 0, 1
    for r in records:
        if r.seq != expected:
            return ChainCheck(False, count, prev, r.seq, f"record {expected} is missing")
        if r.prev_hash != prev:
            return ChainCheck(
                False, count, prev, r.seq, "prev_hash does not match the record before"
            )
        if record_hash(prev, r) != r.hash:
            return ChainCheck(False, count, prev, r.seq, "its fields do not hash to its hash")
        prev, count, expected = r.hash, count + 1, expected + 1
    return ChainCheck(True, count, prev)


@dataclass(frozen=True)
class Grant:
    """A grant and, when it was revoked, its revocation."""

    grant_id: str
    scope: Scope
    target: str
    quota: str
    amount: Decimal
    amount_text: str
    granted_by: str
    granted_at: datetime
    expires_at: datetime
    reason: str
    seq: int
    revoked_at: datetime | None = None
    revoked_by: str | None = None
    revoke_reason: str | None = None
    revoked_seq: int | None = None

    def active(self, now: datetime) -> bool:
        return self.revoked_at is None and now < self.expires_at

    def state(self, now: datetime) -> Literal["active", "expired", "revoked"]:
        if self.revoked_at is not None:
            return "revoked"
        return "active" if now < self.expires_at else "expired"

    def ended_at(self) -> datetime:
        return self.revoked_at if self.revoked_at is not None else self.expires_at

    @property
    def last_seq(self) -> int:
        return self.revoked_seq or self.seq


def fold(records: Iterable[GrantRecord], known: dict[str, Grant] | None = None) -> dict[str, Grant]:
    """Grants by id, from records in seq order (on top of `known`, when given)."""
    out = dict(known or {})
    for r in records:
        if r.kind == "grant":
            assert r.amount is not None and r.expires_at is not None
            out[r.grant_id] = Grant(
                r.grant_id, r.scope, r.target, r.quota, r.amount, r.amount_text or "",
                r.actor, r.recorded_at, r.expires_at, r.reason, r.seq,
            )  # fmt: skip
        elif r.grant_id in out:
            out[r.grant_id] = replace(
                out[r.grant_id], revoked_at=r.recorded_at, revoked_by=r.actor,
                revoke_reason=r.reason, revoked_seq=r.seq,
            )  # fmt: skip
    return out


@dataclass(frozen=True)
class Applied:
    """The grants of one quota for one subject: active ones raise the limit."""

    active: tuple[Grant, ...] = ()
    lapsed: tuple[Grant, ...] = ()
    last_seq: int = 0

    @property
    def granted(self) -> Decimal:
        return sum((g.amount for g in self.active), Decimal(0))


@dataclass
class GrantBook:
    """Every grant, folded from the record; `last_seq` is the newest record held."""

    grants: dict[str, Grant] = field(default_factory=dict)
    last_seq: int = 0

    def apply(self, records: Sequence[GrantRecord]) -> list[Grant]:
        """Fold newer records in; return the grants they touched."""
        fresh = [r for r in records if r.seq > self.last_seq]
        if not fresh:
            return []
        merged = fold(fresh, self.grants)
        self.grants = merged
        self.last_seq = max(r.seq for r in fresh)
        return [merged[r.grant_id] for r in fresh if r.grant_id in merged]

    def applying(
        self,
        names: Iterable[str],
        per: str,
        subject: str,
        pool_groups: Sequence[str],
        now: datetime,
    ) -> Applied:
        """The grants on a quota (known by any of `names`) that count for `subject`."""
        wanted = set(names)
        found = [
            g
            for g in self.grants.values()
            if g.quota in wanted
            and (
                (g.scope == "group" and per == "group" and g.target in pool_groups)
                or (g.scope == "subject" and per != "group" and g.target == subject)
            )
        ]
        if not found:
            return Applied()
        active = tuple(sorted((g for g in found if g.active(now)), key=lambda g: g.seq))
        lapsed = tuple(
            sorted(
                (g for g in found if not g.active(now) and now - g.ended_at() <= LAPSED_SHOWN),
                key=lambda g: g.ended_at(),
            )
        )
        return Applied(active, lapsed, max(g.last_seq for g in found))

    def of(self, scope: Scope, target: str) -> list[Grant]:
        return sorted(
            (g for g in self.grants.values() if g.scope == scope and g.target == target),
            key=lambda g: g.seq,
        )
