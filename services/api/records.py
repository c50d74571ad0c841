"""Reads of what the policy records (workloads, decisions, reported groups), and the
decisions the API makes itself when no policy answers a spawn check."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from decimal import Decimal
from typing import Any

import asyncpg

from services.policy.store import head_seq, ledger_head


@dataclass(frozen=True)
class WorkloadUsage:
    subject: str
    host: str
    metric: str
    total: Decimal
    events: int
    first_hour: datetime
    last_hour: datetime


@dataclass(frozen=True)
class WorkloadFacts:
    """Everything stored about one workload name."""

    usage: list[WorkloadUsage]
    lifecycle: asyncpg.Record | None  # policy_workloads row, when the policy saw it
    terminations: list[asyncpg.Record]  # policy_decisions of kind 'terminate', newest first
    as_of_seq: int
    as_of: datetime | None

    @property
    def subjects(self) -> set[str]:
        found = {u.subject for u in self.usage}
        if self.lifecycle is not None and self.lifecycle["subject"]:
            found.add(self.lifecycle["subject"])
        return found


async def workload_facts(pool: asyncpg.Pool, workload: str) -> WorkloadFacts:
    """Usage of `workload` from the rollups, its lifecycle and terminations, in one snapshot."""
    async with pool.acquire() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
        seq, committed_at = await ledger_head(conn)
        usage = await conn.fetch(
            """SELECT subject, host, metric, sum(total) AS total, sum(events)::bigint AS events,
                      min(hour) AS first_hour, max(hour) AS last_hour
               FROM usage_hourly WHERE workload = $1
               GROUP BY subject, host, metric ORDER BY subject, metric, host""",
            workload,
        )
        lifecycle = await conn.fetchrow(
            "SELECT * FROM policy_workloads WHERE workload = $1", workload
        )
        subjects = sorted(
            {r["subject"] for r in usage} | {lifecycle["subject"] if lifecycle else ""}
        )
        terminations = await conn.fetch(
            """SELECT subject, decision_id, decided_at, reason, quota, message
               FROM policy_decisions
               WHERE subject = ANY($1::text[]) AND workload = $2 AND kind = 'terminate'
               ORDER BY decided_at DESC LIMIT 5""",
            subjects,
            workload,
        )
    return WorkloadFacts(
        [
            WorkloadUsage(
                r["subject"],
                r["host"],
                r["metric"],
                r["total"],
                int(r["events"]),
                r["first_hour"],
                r["last_hour"],
            )
            for r in usage
        ],
        lifecycle,
        list(terminations),
        seq,
        committed_at,
    )


async def reported_groups(pool: asyncpg.Pool, subject: str) -> list[str]:
    """Groups integrators last reported for `subject` (spawn requests, workload starts)."""
    groups = await pool.fetchval(
        "SELECT groups FROM policy_subject_groups WHERE subject = $1", subject
    )
    return list(groups or [])


async def recent_decisions(
    pool: asyncpg.Pool, subject: str, since: datetime, limit: int = 8
) -> list[asyncpg.Record]:
    """Denials, terminations, blocks and warnings of `subject`, newest first."""
    return list(
        await pool.fetch(
            """SELECT decision_id, kind, decided_at, workload, allowed, reason, message, quota,
                      fail_open
               FROM policy_decisions
               WHERE subject = $1 AND decided_at >= $2
                 AND (kind <> 'spawn' OR NOT allowed OR fail_open)
               ORDER BY decided_at DESC LIMIT $3""",
            subject,
            since,
            limit,
        )
    )


async def recent_workloads(
    pool: asyncpg.Pool, subject: str, limit: int = 8
) -> list[asyncpg.Record]:
    """The subject's workloads the policy saw, running ones and latest stops first."""
    return list(
        await pool.fetch(
            """SELECT workload, host, started_at, stopped_at, exit_status, stop_reason,
                      terminate_commands, ignored_commands, usage_after_command, resumed_from
               FROM policy_workloads WHERE subject = $1
               ORDER BY stopped_at IS NOT NULL, coalesce(stopped_at, started_at) DESC NULLS LAST
               LIMIT $2""",
            subject,
            limit,
        )
    )


@dataclass(frozen=True)
class ApiDecision:
    """A spawn decision the API made because no policy answered (failure_mode)."""

    decision_id: str
    decided_at: datetime
    subject: str
    workload: str | None
    allowed: bool
    reason: str
    message: str
    policy_version: str
    groups: list[str]
    inputs: dict[str, Any]


async def record_decision(pool: asyncpg.Pool, d: ApiDecision) -> None:
    """Store it like the policy stores its own, so `tollgate explain` and the page show it."""
    async with pool.acquire() as conn:
        seq = await head_seq(conn)
        await conn.execute(
            """INSERT INTO policy_decisions (decision_id, kind, decided_at, subject, workload,
                   allowed, reason, message, policy_version, as_of_seq, groups, fail_open,
                   inputs)
               VALUES ($1, 'spawn', $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12::jsonb)
               ON CONFLICT (decision_id) DO NOTHING""",
            d.decision_id, d.decided_at, d.subject, d.workload, d.allowed, d.reason, d.message,
            d.policy_version, seq, d.groups, d.allowed, json.dumps(d.inputs, default=str),
        )  # fmt: skip


async def active_subjects(pool: asyncpg.Pool, since: datetime, limit: int = 500) -> list[str]:
    """Subjects with usage in hour buckets from `since` (for an admin to pick from)."""
    rows = await pool.fetch(
        "SELECT DISTINCT subject FROM usage_hourly WHERE hour >= $1 ORDER BY subject LIMIT $2",
        since,
        limit,
    )
    return [r["subject"] for r in rows]


# A notice neither cancelled nor carried out by a terminate command (services/policy/notice.py).
_PENDING_NOTICE = """
    SELECT d.decision_id, d.decided_at, d.quota, d.inputs->>'terminate_at' AS terminate_at,
           d.inputs->>'sentence' AS sentence
    FROM policy_decisions d
    WHERE d.kind = 'termination_scheduled' AND d.workload = $1 AND d.subject = $2
      AND NOT EXISTS (SELECT 1 FROM policy_decisions c
                      WHERE c.decision_id = 'cancel-' || d.decision_id)
      AND NOT EXISTS (SELECT 1 FROM policy_decisions t
                      WHERE t.kind = 'terminate' AND t.workload = $1
                        AND t.inputs->>'notice_id' = d.decision_id)
    ORDER BY d.decided_at DESC LIMIT 1"""


@dataclass(frozen=True)
class PendingNotice:
    """A termination the policy announced and has neither cancelled nor carried out."""

    notice_id: str
    decided_at: datetime
    terminate_at: datetime
    quota: str
    message: str  # the sentence the workload was told, as `tollgate run` prints it


async def pending_notice(pool: asyncpg.Pool, workload: str, subject: str) -> PendingNotice | None:
    """The workload's pending termination notice, if it has one."""
    async with pool.acquire() as conn:
        r = await conn.fetchrow(_PENDING_NOTICE, workload, subject)
    if r is None:
        return None
    return PendingNotice(
        notice_id=r["decision_id"],
        decided_at=r["decided_at"],
        terminate_at=datetime.fromisoformat(r["terminate_at"]),
        quota=r["quota"],
        message=f"Tollgate: {r['sentence']}",
    )
