"""All of the ledger's SQL. One transaction per batch: events, series, rollups, position."""

from __future__ import annotations

import itertools
import operator
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import NamedTuple

import asyncpg

from . import rows
from .domain import (
    Reading,
    SeriesKey,
    SeriesState,
    UsageDelta,
    fold,
    usage_batch_hash,
)


class CommittedEvent(NamedTuple):
    """A usage event as committed, with its ledger sequence and batch hash."""

    seq: int
    batch_id: int
    batch_hash: str
    recorded_at: datetime
    usage: UsageDelta


@dataclass(frozen=True)
class BatchResult:
    events: list[CommittedEvent]
    series_changed: int
    resets: int


async def _load_states(
    conn: asyncpg.Connection, keys: Sequence[SeriesKey]
) -> dict[SeriesKey, SeriesState]:
    if not keys:
        return {}
    rows = await conn.fetch(
        """
        SELECT s.host, s.epoch, s.subject, s.workload, s.metric,
               s.high, s.last_seq, s.last_sampled_at, s.final
        FROM series s
        JOIN unnest($1::text[], $2::text[], $3::text[], $4::text[], $5::text[])
             AS k(host, epoch, subject, workload, metric)
          USING (host, epoch, subject, workload, metric)
        """,
        [k.host for k in keys],
        [k.epoch for k in keys],
        [k.subject for k in keys],
        [k.workload for k in keys],
        [k.metric for k in keys],
    )
    # By position (the SELECT's order): tens of thousands of rows per batch.
    return {SeriesKey(*r[:5]): SeriesState(*r[5:]) for r in rows}


async def _save_states(conn: asyncpg.Connection, plan: Plan) -> None:
    if not plan.changed:
        return
    await conn.execute(
        """
        INSERT INTO series (host, epoch, subject, workload, metric,
                            high, last_seq, last_sampled_at, final, updated_at)
        SELECT *, $10::timestamptz FROM unnest($1::text[], $2::text[], $3::text[], $4::text[],
                             $5::text[], $6::numeric[], $7::bigint[], $8::timestamptz[],
                             $9::boolean[])
        ON CONFLICT (host, epoch, subject, workload, metric) DO UPDATE SET
            high = EXCLUDED.high, last_seq = EXCLUDED.last_seq,
            last_sampled_at = EXCLUDED.last_sampled_at, final = EXCLUDED.final,
            updated_at = EXCLUDED.updated_at
        """,
        *_columns(plan.changed.keys(), 5),
        *_columns(plan.changed.values(), 4),
        plan.now,
    )


def _columns(rows: Iterable[tuple[object, ...]], width: int) -> list[list[object]]:
    """Rows of `width` fields as `width` column lists (the unnest arrays)."""
    cols = list(zip(*rows, strict=True))
    return [list(c) for c in cols] if cols else [[] for _ in range(width)]


def _rollups(usage: Sequence[UsageDelta]) -> list[list[object]]:
    """usage_hourly increments of `usage`, as the columns of the upsert."""
    totals: dict[tuple[str, str, datetime, str, str, str], list[Decimal | int]] = {}
    hours: dict[datetime, datetime] = {}  # a batch's events share a handful of instants
    for u in usage:
        end = u.window_end
        hour = hours.get(end)
        if hour is None:
            hour = hours[end] = end.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        k = u.key
        gpu_model = u.labels.get("gpu_model", "") if u.labels else ""
        key = (k.subject, k.metric, hour, k.workload, k.host, gpu_model)
        acc = totals.get(key)
        if acc is None:
            totals[key] = [u.delta, 1]
        else:
            acc[0] += u.delta
            acc[1] += 1
    keys = list(totals)
    return [*_columns(keys, 6), [totals[k][0] for k in keys], [totals[k][1] for k in keys]]


async def _save_rollups(conn: asyncpg.Connection, plan: Plan) -> None:
    if not plan.usage:
        return
    subject, metric, hour, workload, host, gpu_model, total, events = plan.rollups
    await conn.execute(
        """
        INSERT INTO usage_hourly (subject, metric, hour, workload, host, total, events, gpu_model)
        SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[],
                             $5::text[], $6::numeric[], $7::integer[], $8::text[])
        ON CONFLICT (subject, metric, hour, workload, host, gpu_model) DO UPDATE SET
            total = usage_hourly.total + EXCLUDED.total,
            events = usage_hourly.events + EXCLUDED.events
        """,
        subject, metric, hour, workload, host, total, events, gpu_model,
    )  # fmt: skip


class Head(NamedTuple):
    """The ledger head row, and its version: the xmin every commit of every writer changes."""

    last_seq: int
    last_batch: int
    last_hash: str
    version: int = -1


@dataclass(eq=False)
class Plan:
    """A batch folded, put in seq order, hashed and turned into rows, ready to write.

    Planned against `head` and the series `states` it read: valid only while the ledger
    head still is exactly that (no other commit in between), which its transaction checks.
    """

    items: Sequence[Reading]
    last_stream_seq: int
    head: Head
    states: dict[SeriesKey, SeriesState]
    usage: list[UsageDelta]
    changed: dict[SeriesKey, SeriesState]
    now: datetime
    batch_id: int
    first_seq: int
    digest: str
    copy: bytes  # the usage_events rows, binary COPY (rows.COLUMNS)
    rollups: list[list[object]]

    def after(self, version: int = -1) -> Head:
        """The head once this plan is committed (by the transaction of xid `version`)."""
        if not self.usage:
            return self.head._replace(version=version)
        return Head(self.first_seq + len(self.usage) - 1, self.batch_id, self.digest, version)

    def result(self) -> BatchResult:
        """The committed events (built on demand: the ingest path needs only their count)."""
        b, digest, now, new = self.batch_id, self.digest, self.now, tuple.__new__
        events = [
            new(CommittedEvent, (seq, b, digest, now, u))
            for seq, u in zip(itertools.count(self.first_seq), self.usage)
        ]
        return BatchResult(events, len(self.changed), self.resets())

    def resets(self) -> int:
        return sum(1 for u in self.usage if u.reset)


def series_keys(items: Iterable[Reading]) -> list[SeriesKey]:
    """Each series of `items` once, in order."""
    return list({r.key: None for r in items})


def plan(
    items: Sequence[Reading],
    states: dict[SeriesKey, SeriesState],
    head: Head,
    last_stream_seq: int,
    now: datetime | None = None,
) -> Plan:
    """Everything a batch writes, from the states of its series and the head it follows.

    Seqs are assigned grouped by subject (stable: a series keeps its order), so each
    subject's events of one batch form one contiguous seq range.
    """
    usage, changed = fold(states, items)
    usage.sort(key=_BY_SUBJECT)
    now = datetime.now(UTC) if now is None else now
    batch_id, first_seq = head.last_batch + 1, head.last_seq + 1
    digest = usage_batch_hash(head.last_hash, batch_id, first_seq, usage) if usage else ""
    return Plan(
        items, last_stream_seq, head, states, usage, changed, now, batch_id, first_seq, digest,
        rows.copy_data(first_seq, batch_id, now, usage), _rollups(usage),
    )  # fmt: skip


_BY_SUBJECT = operator.attrgetter("key.subject")


async def read_head(conn: asyncpg.Connection, lock: bool = False) -> Head:
    """The ledger head and its version; with `lock`, held until the transaction ends."""
    row = await conn.fetchrow(
        "SELECT last_seq, last_batch, last_hash, xmin::text::bigint FROM ledger_head WHERE id = 1"
        + (" FOR UPDATE" if lock else "")
    )
    assert row is not None, "ledger_head row missing: run migrations"
    return Head(*row)


async def load_states(
    conn: asyncpg.Connection, keys: Sequence[SeriesKey]
) -> dict[SeriesKey, SeriesState]:
    """The stored states of `keys` (series never seen are absent)."""
    return await _load_states(conn, keys)


class Committed(NamedTuple):
    """What a transaction wrote: the plan it carried out and the head it left."""

    plan: Plan
    head: Head
    as_planned: bool  # False: the head had moved, so it was re-planned under the lock


async def commit(
    conn: asyncpg.Connection,
    consumer: str,
    items: Sequence[Reading],
    last_stream_seq: int,
    planned: Plan | None = None,
) -> Committed:
    """Commit `items` in one transaction: `planned` if the head is still what it expected.

    The ledger head row is locked first, so concurrent writers serialize, sequence numbers
    stay gap-free and the hash chain stays linear. Any other commit since `planned` was
    made (another writer, or one of ours it did not build on) moves the head's version,
    and the batch is folded again from the states stored now.
    """
    async with conn.transaction():
        head = await read_head(conn, lock=True)
        as_planned = planned is not None and planned.head == head
        if planned is None or not as_planned:
            states = await _load_states(conn, series_keys(items))
            planned = plan(items, states, head, last_stream_seq)
        version = await _write(conn, consumer, planned)
    return Committed(planned, planned.after(version), as_planned)


async def _write(conn: asyncpg.Connection, consumer: str, p: Plan) -> int:
    """Write a plan inside the caller's transaction; return this transaction's xid."""
    if p.usage:
        # The month's partition, created by the first batch of the month (cheap check).
        await conn.execute("SELECT tollgate_usage_partition($1)", p.now)
        await conn.execute(
            """INSERT INTO ledger_batches (batch_id, committed_at, first_seq, last_seq,
                   event_count, prev_hash, hash, consumer)
               VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
            p.batch_id,
            p.now,
            p.first_seq,
            p.first_seq + len(p.usage) - 1,
            len(p.usage),
            p.head.last_hash,
            p.digest,
            consumer,
        )
        await conn.copy_to_table(
            # A memoryview: asyncpg would take bytes for a file name.
            "usage_events",
            source=memoryview(p.copy),
            columns=rows.COLUMNS,
            format="binary",
        )
    after = p.after()
    # Written even when nothing was appended: every commit moves the head's version, so a
    # writer that planned ahead of it knows its plan is stale.
    version = await conn.fetchval(
        "UPDATE ledger_head SET last_seq = $1, last_batch = $2, last_hash = $3 WHERE id = 1 "
        "RETURNING xmin::text::bigint",
        after.last_seq,
        after.last_batch,
        after.last_hash,
    )
    await _save_states(conn, p)
    await _save_rollups(conn, p)
    await conn.execute(
        """INSERT INTO consumer_positions (consumer, stream_seq, updated_at)
           VALUES ($1, $2, $3)
           ON CONFLICT (consumer) DO UPDATE SET
               stream_seq = GREATEST(consumer_positions.stream_seq, EXCLUDED.stream_seq),
               updated_at = EXCLUDED.updated_at""",
        consumer,
        p.last_stream_seq,
        p.now,
    )
    return int(version)


async def apply_readings(
    conn: asyncpg.Connection, consumer: str, items: Sequence[Reading], last_stream_seq: int
) -> BatchResult:
    """Fold readings and commit everything they imply in one transaction."""
    return (await commit(conn, consumer, items, last_stream_seq)).plan.result()
