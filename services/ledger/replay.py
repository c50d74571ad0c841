"""Auditing the ledger: verify the hash chain, rebuild projections, read events in order."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Callable, Sequence
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from .domain import GENESIS_HASH, ChainedEvent, batch_hash

Progress = Callable[[int], None]

EVENT_COLUMNS = """e.seq, e.batch_id, e.recorded_at, e.host, e.epoch, e.subject, e.workload,
    e.metric, e.delta, e.window_start, e.window_end, e.reset, e.sample_seq, e.labels,
    e.received_at, e.sampled_at, e.clock_skew_seconds, b.hash AS batch_hash"""


@dataclass(frozen=True)
class ChainVerdict:
    """The result of recomputing the chain: ok, or the first batch that does not hold."""

    ok: bool
    batches: int
    events: int
    head_hash: str
    first_bad_batch: int | None = None
    problem: str | None = None


async def verify_chain(conn: asyncpg.Connection, progress: Progress | None = None) -> ChainVerdict:
    """Recompute every batch hash from the events and compare with what was recorded."""
    prev = GENESIS_HASH
    batches = events = 0
    next_seq = 1

    def bad(batch_id: int, problem: str) -> ChainVerdict:
        return ChainVerdict(False, batches, events, prev, batch_id, problem)

    async with conn.transaction(isolation="repeatable_read", readonly=True):
        cursor = conn.cursor(
            """SELECT b.batch_id, b.prev_hash, b.hash, b.event_count, b.first_seq, b.last_seq,
                      array_agg(e.seq ORDER BY e.seq) AS seqs,
                      array_agg(e.host ORDER BY e.seq) AS hosts,
                      array_agg(e.epoch ORDER BY e.seq) AS epochs,
                      array_agg(e.subject ORDER BY e.seq) AS subjects,
                      array_agg(e.workload ORDER BY e.seq) AS workloads,
                      array_agg(e.metric ORDER BY e.seq) AS metrics,
                      array_agg(e.delta ORDER BY e.seq) AS deltas,
                      array_agg(e.window_start ORDER BY e.seq) AS starts,
                      array_agg(e.window_end ORDER BY e.seq) AS ends,
                      array_agg(e.reset ORDER BY e.seq) AS resets,
                      array_agg(e.received_at ORDER BY e.seq) AS received,
                      array_agg(e.sampled_at ORDER BY e.seq) AS sampled,
                      array_agg(e.clock_skew_seconds ORDER BY e.seq) AS skews
               FROM ledger_batches b LEFT JOIN usage_events e USING (batch_id)
               GROUP BY b.batch_id ORDER BY b.batch_id""",
            prefetch=200,
        )
        async for row in cursor:
            bid = row["batch_id"]
            seqs = [s for s in row["seqs"] if s is not None]
            if bid != batches + 1:
                return bad(bid, f"batch ids jump from {batches} to {bid}")
            if row["prev_hash"] != prev:
                return bad(bid, "prev_hash does not match the previous batch's hash")
            if len(seqs) != row["event_count"]:
                return bad(bid, f"batch records {row['event_count']} events, {len(seqs)} found")
            if seqs != list(range(next_seq, next_seq + len(seqs))):
                return bad(bid, f"event sequence numbers are not {next_seq}.. without gaps")
            chained = [
                ChainedEvent(*fields)
                for fields in zip(
                    seqs, row["hosts"], row["epochs"], row["subjects"], row["workloads"],
                    row["metrics"], row["deltas"], row["starts"], row["ends"], row["resets"],
                    row["received"], row["sampled"], row["skews"], strict=True,
                )
            ]  # fmt: skip
            digest = batch_hash(prev, bid, chained)
            if digest != row["hash"]:
                return bad(bid, "its events do not hash to the recorded hash")
            prev = digest
            batches += 1
            events += len(seqs)
            next_seq += len(seqs)
            if progress is not None:
                progress(len(seqs))
        head = await conn.fetchrow("SELECT last_hash, last_batch FROM ledger_head WHERE id = 1")
        if head is not None and head["last_hash"] != prev:
            return bad(head["last_batch"], "the ledger head does not match the last batch")
    return ChainVerdict(True, batches, events, prev)


@dataclass(frozen=True)
class RebuildResult:
    """What a rebuild of the hourly rollups found and did."""

    rows: int
    missing: int  # rows the events imply that the projection lacked or had different
    extra: int  # rows the projection had that the events do not imply

    @property
    def identical(self) -> bool:
        return self.missing == 0 and self.extra == 0


# The hourly rollup as the events imply it. `hour` is the UTC hour: rebuild_rollups sets the
# transaction's time zone to UTC, where date_trunc's two-argument form (cheaper than naming
# the zone on every row) truncates to the same hour the ledger's writer does.
REBUILT = """SELECT subject, metric, date_trunc('hour', window_end) AS hour,
                      workload, host, sum(delta)::numeric(38, 6) AS total,
                      count(*)::integer AS events,
                      coalesce(labels->>'gpu_model', '') AS gpu_model
               FROM usage_events GROUP BY 1, 2, 3, 4, 5, 8"""

# One aggregate over the events and the projection together, so the comparison costs one
# more row per projection row in the same hash or sort, not a second hash of every rebuilt
# row and a join. Per key: `s` = sum of the events' deltas less the projection's total,
# `c` = the events counted less the projection's count, `p` = projection rows (0 or 1: it is
# the primary key), `n` = rows in the group, of which n - p are events. A row matches
# exactly when both sides exist and s = 0 and c = 0 (numeric arithmetic: exact).
# `$2` of `$1` parts: the keys whose metric, host and workload hash to it (a key's rows all
# do, on either side), so parts compared on separate connections at once cover every key
# once.
_COMPARE = """
    WITH both_sides AS (
        SELECT subject, metric, date_trunc('hour', window_end) AS hour, workload, host,
               coalesce(labels->>'gpu_model', '') AS gpu_model, delta AS x, 1 AS k, 0 AS p
        FROM usage_events
        WHERE $1::int = 1 OR (hashtext(metric || host || workload) & 65535) % $1::int = $2::int
        UNION ALL
        SELECT subject, metric, hour, workload, host, gpu_model, -total, -events, 1
        FROM usage_hourly
        WHERE $1::int = 1 OR (hashtext(metric || host || workload) & 65535) % $1::int = $2::int),
    keyed AS (
        SELECT sum(x) AS s, sum(k) AS c, sum(p) AS p, count(*) AS n
        FROM both_sides GROUP BY subject, metric, hour, workload, host, gpu_model)
    SELECT count(*) FILTER (WHERE n > p) AS rows,
           count(*) FILTER (WHERE n > p AND (p = 0 OR s <> 0 OR c <> 0)) AS missing,
           count(*) FILTER (WHERE p > 0 AND (n = p OR s <> 0 OR c <> 0)) AS extra
    FROM keyed"""


async def _compare_part(conn: asyncpg.Connection, parts: int, part: int) -> RebuildResult:
    """One part of the comparison, inside the caller's transaction on `conn`."""
    await conn.execute("SET LOCAL TimeZone = 'UTC'")
    # Postgres's own parallel plan for this aggregate finalizes every partial numeric sum
    # in one process (serialized states: slower than no workers at all); the parts are the
    # parallelism, one Postgres process each.
    await conn.execute("SET LOCAL max_parallel_workers_per_gather = 0")
    found = await conn.fetchrow(_COMPARE, parts, part)
    assert found is not None
    return RebuildResult(int(found["rows"]), int(found["missing"]), int(found["extra"]))


async def _helper_part(conn: asyncpg.Connection, parts: int, part: int) -> RebuildResult:
    async with conn.transaction(readonly=True):
        return await _compare_part(conn, parts, part)


async def rebuild_rollups(
    conn: asyncpg.Connection, apply: bool = True, helpers: Sequence[asyncpg.Connection] = ()
) -> RebuildResult:
    """Recompute `usage_hourly` from `usage_events`; compare; replace it when `apply`.

    The ledger head is locked meanwhile, so no batch commits between reading the events
    and writing the projection (every batch takes that lock first). Every row the events
    imply is compared exactly with the projection's row of the same key (a row that
    differs counts as missing and as extra, as with EXCEPT) in one pass (`_COMPARE`): a
    rebuild that finds nothing to do costs the GROUP BY plus one row per projection row;
    only a projection that differs is rewritten. With `helpers` (more connections to the
    same database), the keys are split into 1 + len(helpers) parts compared at once, each
    by one Postgres process; they start once the lock is held, so they read the same rows.
    """
    async with conn.transaction():
        await conn.execute("SET LOCAL TimeZone = 'UTC'")
        await conn.execute("SELECT 1 FROM ledger_head WHERE id = 1 FOR UPDATE")
        parts = 1 + len(helpers)
        found = await asyncio.gather(
            _compare_part(conn, parts, 0),
            *(_helper_part(c, parts, i) for i, c in enumerate(helpers, start=1)),
        )
        rows = sum(f.rows for f in found)
        missing = sum(f.missing for f in found)
        extra = sum(f.extra for f in found)
        if apply and (missing or extra):
            await conn.execute("DELETE FROM usage_hourly")
            await conn.execute(
                "INSERT INTO usage_hourly (subject, metric, hour, workload, host, total, events,"
                f" gpu_model) {REBUILT}"
            )
    return RebuildResult(rows, missing, extra)


async def events_after(
    conn: asyncpg.Connection, after: int, limit: int | None = None
) -> AsyncIterator[dict[str, Any]]:
    """Ledger events with seq > `after`, in order, with their batch hash (a cursor)."""
    async with conn.transaction(isolation="repeatable_read", readonly=True):
        cursor = conn.cursor(
            f"""SELECT {EVENT_COLUMNS} FROM usage_events e JOIN ledger_batches b USING (batch_id)
                WHERE e.seq > $1 ORDER BY e.seq LIMIT $2""",
            after,
            limit,
            prefetch=1000,
        )
        async for row in cursor:
            yield dict(row)


def _plain(value: Any) -> Any:
    if isinstance(value, Decimal):
        return format(value.normalize(), "f") if value else "0"
    if isinstance(value, datetime):
        return value.isoformat().replace("+00:00", "Z")
    return value


def event_line(event: dict[str, Any]) -> str:
    """One event as an NDJSON line: exact decimals as strings, UTC times, labels as JSON."""
    fields = {k: _plain(v) for k, v in event.items()}
    labels = fields.get("labels")
    fields["labels"] = json.loads(labels) if isinstance(labels, str) else (labels or {})
    return json.dumps(fields) + "\n"
