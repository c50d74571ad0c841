"""All of the ledger's SQL. One transaction per batch: events, series, rollups, position."""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from decimal import Decimal
from typing import NamedTuple

import asyncpg

from .domain import (
    Reading,
    SeriesKey,
    SeriesState,
    UsageDelta,
    fold,
    usage_batch_hash,
)

_EVENT_COLUMNS = (
    "seq",
    "batch_id",
    "recorded_at",
    "host",
    "epoch",
    "subject",
    "workload",
    "metric",
    "delta",
    "window_start",
    "window_end",
    "sample_seq",
    "stream_seq",
    "reset",
    "labels",
    "received_at",
    "sampled_at",
    "clock_skew_seconds",
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


async def _save_states(
    conn: asyncpg.Connection, changed: dict[SeriesKey, SeriesState], now: datetime
) -> None:
    if not changed:
        return
    keys = list(changed)
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
        [k.host for k in keys],
        [k.epoch for k in keys],
        [k.subject for k in keys],
        [k.workload for k in keys],
        [k.metric for k in keys],
        [changed[k].high for k in keys],
        [changed[k].last_seq for k in keys],
        [changed[k].last_sampled_at for k in keys],
        [changed[k].final for k in keys],
        now,
    )


async def _save_rollups(conn: asyncpg.Connection, usage: Sequence[UsageDelta]) -> None:
    totals: dict[tuple[str, str, datetime, str, str, str], list[Decimal | int]] = defaultdict(
        lambda: [Decimal(0), 0]
    )
    hours: dict[datetime, datetime] = {}  # a batch's events share a handful of instants
    for u in usage:
        end = u.window_end
        hour = hours.get(end)
        if hour is None:
            hour = hours[end] = end.astimezone(UTC).replace(minute=0, second=0, microsecond=0)
        k = u.key
        gpu_model = u.labels.get("gpu_model", "") if u.labels else ""
        acc = totals[(k.subject, k.metric, hour, k.workload, k.host, gpu_model)]
        acc[0] += u.delta
        acc[1] += 1
    if not totals:
        return
    keys = list(totals)
    await conn.execute(
        """
        INSERT INTO usage_hourly (subject, metric, hour, workload, host, total, events, gpu_model)
        SELECT * FROM unnest($1::text[], $2::text[], $3::timestamptz[], $4::text[],
                             $5::text[], $6::numeric[], $7::integer[], $8::text[])
        ON CONFLICT (subject, metric, hour, workload, host, gpu_model) DO UPDATE SET
            total = usage_hourly.total + EXCLUDED.total,
            events = usage_hourly.events + EXCLUDED.events
        """,
        [k[0] for k in keys],
        [k[1] for k in keys],
        [k[2] for k in keys],
        [k[3] for k in keys],
        [k[4] for k in keys],
        [totals[k][0] for k in keys],
        [totals[k][1] for k in keys],
        [k[5] for k in keys],
    )


def _event_records(
    first_seq: int, batch_id: int, now: datetime, usage: Sequence[UsageDelta]
) -> list[tuple[object, ...]]:
    """usage_events rows in _EVENT_COLUMNS order."""
    rows = []
    seq = first_seq
    for u in usage:
        labels = json.dumps(dict(u.labels)) if u.labels else "{}"
        rows.append(
            (seq, batch_id, now, *u.key, u.delta, u.window_start, u.window_end,
             u.sample_seq, u.stream_seq, u.reset, labels, u.received_at, u.sampled_at,
             u.clock_skew)
        )  # fmt: skip
        seq += 1
    return rows


def _subject_of(u: UsageDelta) -> str:
    return u.key.subject


async def apply_readings(
    conn: asyncpg.Connection, consumer: str, items: Sequence[Reading], last_stream_seq: int
) -> BatchResult:
    """Fold readings and commit everything they imply in one transaction.

    The ledger head row is locked first, so concurrent writers serialize, sequence numbers
    stay gap-free and the hash chain stays linear.
    """
    async with conn.transaction():
        head = await conn.fetchrow(
            "SELECT last_seq, last_batch, last_hash FROM ledger_head WHERE id = 1 FOR UPDATE"
        )
        assert head is not None, "ledger_head row missing: run migrations"
        keys = list({r.key: None for r in items})  # each series once
        states = await _load_states(conn, keys)
        usage, changed = fold(states, items)
        # Seqs grouped by subject (stable: a series keeps its order), so the usage feed's
        # envelope of one subject in this batch covers a contiguous range of seqs.
        usage.sort(key=_subject_of)
        now = datetime.now(UTC)
        committed: list[CommittedEvent] = []
        if usage:
            # The month's partition, created by the first batch of the month (cheap check).
            await conn.execute("SELECT tollgate_usage_partition($1)", now)
            batch_id = head["last_batch"] + 1
            first_seq = head["last_seq"] + 1
            digest = usage_batch_hash(head["last_hash"], batch_id, first_seq, usage)
            last_seq = first_seq + len(usage) - 1
            await conn.execute(
                """INSERT INTO ledger_batches (batch_id, committed_at, first_seq, last_seq,
                       event_count, prev_hash, hash, consumer)
                   VALUES ($1, $2, $3, $4, $5, $6, $7, $8)""",
                batch_id,
                now,
                first_seq,
                last_seq,
                len(usage),
                head["last_hash"],
                digest,
                consumer,
            )
            await conn.copy_records_to_table(
                "usage_events",
                columns=_EVENT_COLUMNS,
                records=_event_records(first_seq, batch_id, now, usage),
            )
            await conn.execute(
                "UPDATE ledger_head SET last_seq = $1, last_batch = $2, last_hash = $3 "
                "WHERE id = 1",
                last_seq,
                batch_id,
                digest,
            )
            committed = [
                CommittedEvent(first_seq + i, batch_id, digest, now, u) for i, u in enumerate(usage)
            ]
        await _save_states(conn, changed, now)
        await _save_rollups(conn, usage)
        await conn.execute(
            """INSERT INTO consumer_positions (consumer, stream_seq, updated_at)
               VALUES ($1, $2, $3)
               ON CONFLICT (consumer) DO UPDATE SET
                   stream_seq = GREATEST(consumer_positions.stream_seq, EXCLUDED.stream_seq),
                   updated_at = EXCLUDED.updated_at""",
            consumer,
            last_stream_seq,
            now,
        )
    return BatchResult(committed, len(changed), sum(1 for u in usage if u.reset))
