"""The SQL of the grants record: append one record to the chain, read them back."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import replace

import asyncpg

from .grants import GENESIS, ChainCheck, GrantRecord, fold, verify

# Appends take turns: each record's hash needs the one before it.
GRANTS_LOCK = 0x67_72_61_6E


class GrantNotFound(LookupError):
    """No grant has that id."""


class AlreadyRevoked(ValueError):
    """The grant was revoked before; the message says when and by whom."""


_COLUMNS = (
    "seq, kind, grant_id, scope, target, quota, actor, reason, recorded_at, amount, "
    "amount_text, expires_at, prev_hash, hash"
)


def _record(r: asyncpg.Record) -> GrantRecord:
    return GrantRecord(**dict(r))


async def append(conn: asyncpg.Connection, record: GrantRecord) -> GrantRecord:
    """Chain `record` after the newest one and store it; its seq and hash are filled in."""
    async with conn.transaction():
        await conn.execute("SELECT pg_advisory_xact_lock($1)", GRANTS_LOCK)
        if record.kind == "revoke":
            grants = fold(await _about(conn, record.grant_id))
            found = grants.get(record.grant_id)
            if found is None:
                raise GrantNotFound(record.grant_id)
            if found.revoked_at is not None:
                raise AlreadyRevoked(
                    f"grant {record.grant_id} was already revoked "
                    f"{found.revoked_at:%Y-%m-%d %H:%M UTC} by {found.revoked_by}"
                )
            record = replace(record, scope=found.scope, target=found.target, quota=found.quota)
        head = await conn.fetchrow("SELECT seq, hash FROM quota_grants ORDER BY seq DESC LIMIT 1")
        seq, prev = (head["seq"], head["hash"]) if head is not None else (0, GENESIS)
        stored = replace(record, seq=seq + 1).chained(prev)
        await conn.execute(
            f"INSERT INTO quota_grants ({_COLUMNS}) VALUES "
            "($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14)",
            *(getattr(stored, c.strip()) for c in _COLUMNS.split(",")),
        )
    return stored


async def _about(conn: asyncpg.Connection, grant_id: str) -> list[GrantRecord]:
    rows = await conn.fetch(
        f"SELECT {_COLUMNS} FROM quota_grants WHERE grant_id = $1 ORDER BY seq", grant_id
    )
    return [_record(r) for r in rows]


async def about(conn: asyncpg.Connection, grant_id: str) -> list[GrantRecord]:
    """The records of one grant (the grant, and its revocation if any)."""
    return await _about(conn, grant_id)


async def after(conn: asyncpg.Connection, seq: int = 0) -> list[GrantRecord]:
    """Every record newer than `seq`, in order."""
    rows = await conn.fetch(f"SELECT {_COLUMNS} FROM quota_grants WHERE seq > $1 ORDER BY seq", seq)
    return [_record(r) for r in rows]


async def for_targets(
    conn: asyncpg.Connection, subject: str, groups: Sequence[str]
) -> list[GrantRecord]:
    """The records of a subject's own grants and of its groups' pool grants, in order."""
    rows = await conn.fetch(
        f"""SELECT {_COLUMNS} FROM quota_grants
            WHERE (scope = 'subject' AND target = $1) OR (scope = 'group' AND target = ANY($2))
            ORDER BY seq""",
        subject,
        list(groups),
    )
    return [_record(r) for r in rows]


async def head_seq(conn: asyncpg.Connection) -> int:
    return int(await conn.fetchval("SELECT coalesce(max(seq), 0) FROM quota_grants"))


async def verify_chain(conn: asyncpg.Connection) -> ChainCheck:
    """Recompute the chain over every record."""
    return verify(await after(conn, 0))
