"""The policy's SQL: usage per hour bucket from the ledger's rollups."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from decimal import Decimal

import asyncpg


async def hourly_usage(
    conn: asyncpg.Connection,
    subjects: Sequence[str],
    metric: str,
    since: datetime | None,
) -> list[tuple[str, datetime, Decimal]]:
    """(workload, hour, total) for the subjects and metric from `since` (None: all time)."""
    rows = await conn.fetch(
        """SELECT workload, hour, sum(total) AS total FROM usage_hourly
           WHERE subject = ANY($1::text[]) AND metric = $2
             AND ($3::timestamptz IS NULL OR hour >= $3)
           GROUP BY workload, hour""",
        list(subjects),
        metric,
        since,
    )
    return [(r["workload"], r["hour"], r["total"]) for r in rows]


async def ledger_head(conn: asyncpg.Connection) -> tuple[int, datetime | None]:
    """The last ledger sequence and when its batch committed: usage is as of that."""
    row = await conn.fetchrow(
        """SELECT h.last_seq, b.committed_at FROM ledger_head h
           LEFT JOIN ledger_batches b ON b.batch_id = h.last_batch WHERE h.id = 1"""
    )
    if row is None:
        return 0, None
    return int(row["last_seq"]), row["committed_at"]
