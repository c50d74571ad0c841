"""The SQL of what the policy knows about workloads and groups (SPEC 2.4)."""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime, timedelta

import asyncpg

from contracts.workloads import WorkloadStarted, WorkloadStopped

from .workloads import Workload, WorkloadBook


async def learn_groups(
    conn: asyncpg.Connection | asyncpg.Pool,
    subject: str,
    groups: Sequence[str],
    source: str,
    at: datetime,
) -> None:
    await conn.execute(
        """INSERT INTO policy_subject_groups (subject, groups, source, updated_at)
           VALUES ($1, $2, $3, $4) ON CONFLICT (subject) DO UPDATE SET
               groups = EXCLUDED.groups, source = EXCLUDED.source,
               updated_at = EXCLUDED.updated_at
           WHERE policy_subject_groups.updated_at <= EXCLUDED.updated_at""",
        subject,
        list(groups),
        source,
        at,
    )


async def load_book(conn: asyncpg.Connection, now: datetime) -> WorkloadBook:
    """Running workloads, those stopped in the last day, and reported groups."""
    book = WorkloadBook()
    for r in await conn.fetch(
        """SELECT workload, subject, host, groups, started_at, stopped_at, announced,
                  resumed_from
           FROM policy_workloads WHERE stopped_at IS NULL OR stopped_at >= $1""",
        now - timedelta(days=1),
    ):
        if r["stopped_at"] is not None:
            book.stopped[r["workload"]] = r["stopped_at"]
        elif r["started_at"] is not None:
            book.start(
                Workload(
                    r["workload"], r["subject"], r["host"], r["started_at"], tuple(r["groups"]),
                    announced=r["announced"], resumed_from=r["resumed_from"],
                )
            )  # fmt: skip
    for r in await conn.fetch("SELECT subject, groups FROM policy_subject_groups"):
        book.groups[r["subject"]] = tuple(r["groups"])
    return book


async def apply_workload_event(
    conn: asyncpg.Connection,
    consumer: str,
    stream_seq: int,
    event: WorkloadStarted | WorkloadStopped,
) -> bool:
    """Store one lifecycle event with the consumer's position; False if it was stored before."""
    async with conn.transaction():
        await conn.execute(
            "INSERT INTO policy_positions VALUES ($1, 0, now()) ON CONFLICT DO NOTHING", consumer
        )
        done = await conn.fetchval(
            "SELECT stream_seq FROM policy_positions WHERE consumer = $1 FOR UPDATE", consumer
        )
        if stream_seq <= done:
            return False
        if isinstance(event, WorkloadStarted):
            await conn.execute(
                """INSERT INTO policy_workloads (workload, subject, host, groups, resources,
                       started_at) VALUES ($1, $2, $3, $4, $5::jsonb, $6)
                   ON CONFLICT (workload) DO UPDATE SET subject = EXCLUDED.subject,
                       host = EXCLUDED.host, groups = EXCLUDED.groups,
                       resources = EXCLUDED.resources, started_at = EXCLUDED.started_at,
                       announced = true, stopped_at = NULL, exit_status = NULL,
                       stop_reason = NULL
                   -- first word of it, a row the policy made from usage, or the same
                   -- name started again after its stop
                   WHERE policy_workloads.started_at IS NULL OR NOT policy_workloads.announced
                      OR policy_workloads.stopped_at < EXCLUDED.started_at""",
                event.workload,
                event.subject,
                event.host,
                list(event.groups),
                event.resources.model_dump_json(),
                event.started_at,
            )
            if event.groups:
                await learn_groups(
                    conn, event.subject, event.groups, "workload_started", event.started_at
                )
        else:
            await conn.execute(
                """INSERT INTO policy_workloads (workload, subject, host, stopped_at,
                       exit_status, stop_reason) VALUES ($1, $2, $3, $4, $5, $6)
                   ON CONFLICT (workload) DO UPDATE SET stopped_at = EXCLUDED.stopped_at,
                       exit_status = EXCLUDED.exit_status, stop_reason = EXCLUDED.stop_reason""",
                event.workload,
                event.subject or "",
                event.host or "",
                event.stopped_at,
                event.exit_status,
                event.termination_reason,
            )
        await conn.execute(
            "UPDATE policy_positions SET stream_seq = $2, updated_at = now() WHERE consumer = $1",
            consumer,
            stream_seq,
        )
    return True
