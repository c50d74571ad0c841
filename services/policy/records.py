"""The SQL of the policy's own records: decisions, outbox, marks, configs, holds."""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from decimal import Decimal
from typing import Any

import asyncpg

from .engine import Mark, MarkKey, Terminate
from .reissue import Attempt
from .reservations import Reservation
from .workloads import Workload


def to_json(value: Any) -> str:
    """JSON with exact decimals (as strings) and ISO times."""

    def default(v: Any) -> Any:
        if isinstance(v, Decimal):
            return format(v.normalize(), "f") if v == v.to_integral_value() else str(v)
        if isinstance(v, datetime):
            return v.isoformat()
        if isinstance(v, set | frozenset | tuple):
            return sorted(v)
        raise TypeError(f"cannot store {type(v).__name__} in a decision record")

    return json.dumps(value, default=default, sort_keys=True)


@dataclass(frozen=True)
class DecisionRecord:
    """One decision and everything it was based on (`tollgate explain` prints it)."""

    decision_id: str
    kind: str
    decided_at: datetime
    subject: str
    reason: str
    message: str
    policy_version: str
    as_of_seq: int
    groups: Sequence[str] = ()
    workload: str | None = None
    allowed: bool | None = None
    quota: str | None = None
    fail_open: bool = False
    reservation: dict[str, Any] | None = None
    inputs: dict[str, Any] = field(default_factory=dict)

    def row(self) -> tuple[Any, ...]:
        return (
            self.decision_id,
            self.kind,
            self.decided_at,
            self.subject,
            self.workload,
            self.allowed,
            self.reason,
            self.message,
            self.quota,
            self.policy_version,
            self.as_of_seq,
            list(self.groups),
            self.fail_open,
            None if self.reservation is None else to_json(self.reservation),
            to_json(self.inputs),
        )


@dataclass(frozen=True)
class OutboxRow:
    msg_id: str
    decision_id: str
    nats_subject: str
    payload: bytes


_INSERT_DECISION = """
    INSERT INTO policy_decisions (decision_id, kind, decided_at, subject, workload, allowed,
        reason, message, quota, policy_version, as_of_seq, groups, fail_open, reservation,
        inputs)
    VALUES ($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11, $12, $13, $14::jsonb, $15::jsonb)
    ON CONFLICT (decision_id) DO NOTHING"""


async def save_decisions(conn: asyncpg.Connection, records: Sequence[DecisionRecord]) -> None:
    await save_decision_rows(conn, [r.row() for r in records])


async def save_decision_rows(conn: asyncpg.Connection, rows: Sequence[tuple[Any, ...]]) -> None:
    """Decisions already made into rows (`DecisionRecord.row`)."""
    await conn.executemany(_INSERT_DECISION, rows)


async def save_plan(
    conn: asyncpg.Connection,
    records: Sequence[DecisionRecord],
    outbox: Sequence[OutboxRow],
    opened: Sequence[Mark],
    closed: Sequence[MarkKey],
    now: datetime,
    terminations: Sequence[Terminate] = (),
    resumed: Sequence[Workload] = (),
) -> set[str]:
    """Decisions, their messages and the marks they open/close, in one transaction.

    Returns the outbox ids that were new: a command id already in the table (an earlier
    run decided the same crossing) is neither stored nor sent again.
    """
    async with conn.transaction():
        await save_decisions(conn, records)
        new: set[str] = set()
        for o in outbox:
            got = await conn.fetchval(
                """INSERT INTO policy_outbox (msg_id, decision_id, nats_subject, payload,
                       created_at) VALUES ($1, $2, $3, $4, $5)
                   ON CONFLICT (msg_id) DO NOTHING RETURNING msg_id""",
                o.msg_id,
                o.decision_id,
                o.nats_subject,
                o.payload,
                now,
            )
            if got is not None:
                new.add(got)
        if closed:
            await conn.executemany(
                """DELETE FROM policy_marks
                   WHERE subject = $1 AND quota = $2 AND workload = $3 AND kind = $4""",
                [(k.subject, k.quota, k.workload, k.kind) for k in closed],
            )
        if opened:
            await conn.executemany(
                """INSERT INTO policy_marks (subject, quota, workload, kind, period, until,
                       opened_at) VALUES ($1, $2, $3, $4, $5, $6, $7)
                   ON CONFLICT (subject, quota, workload, kind) DO UPDATE SET
                       period = EXCLUDED.period, until = EXCLUDED.until,
                       opened_at = EXCLUDED.opened_at""",
                [
                    (m.key.subject, m.key.quota, m.key.workload, m.key.kind, m.period, m.until, now)
                    for m in opened
                ],
            )
        await _note_resumed(conn, resumed)
        await _note_terminations(conn, [t for t in terminations if t.command_id in new], now)
    return new


async def _note_resumed(conn: asyncpg.Connection, resumed: Sequence[Workload]) -> None:
    """Workloads whose usage outlived their stop: running again, with the stop they outlived."""
    await conn.executemany(
        """UPDATE policy_workloads SET stopped_at = NULL, exit_status = NULL, stop_reason = NULL,
               resumed_at = $2, resumed_from = $3, host = $4
           WHERE workload = $1 AND stopped_at IS NOT NULL AND stopped_at = $3""",
        [(w.workload, w.started_at, w.resumed_from, w.host) for w in resumed],
    )


async def _note_terminations(
    conn: asyncpg.Connection, terminations: Sequence[Terminate], now: datetime
) -> None:
    """Count each command on its workload's row (a row made now for one known by usage)."""
    await conn.executemany(
        """INSERT INTO policy_workloads (workload, subject, host, started_at, announced,
               terminate_commands, ignored_commands, last_command_at, usage_after_command)
           VALUES ($1, $2, $3, $4, false, $5, $5 - 1, $6, $7)
           ON CONFLICT (workload) DO UPDATE SET
               terminate_commands = policy_workloads.terminate_commands + 1,
               ignored_commands = greatest(policy_workloads.ignored_commands,
                                           EXCLUDED.ignored_commands),
               last_command_at = EXCLUDED.last_command_at,
               usage_after_command = coalesce(EXCLUDED.usage_after_command,
                                              policy_workloads.usage_after_command)""",
        [
            (
                t.workload.workload, t.workload.subject, t.workload.host,
                t.workload.started_at, t.attempt, now, t.usage_until,
            )
            for t in terminations
        ],
    )  # fmt: skip


async def load_attempts(conn: asyncpg.Connection, since: datetime) -> dict[str, Attempt]:
    """The latest terminate command of each crossing decided since `since`."""
    rows = await conn.fetch(
        """SELECT DISTINCT ON (crossing) crossing, number, decision_id, decided_at, grace,
                  host, workload
           FROM (SELECT coalesce(inputs->>'crossing', decision_id) AS crossing,
                        coalesce((inputs->>'attempt')::int, 1) AS number, decision_id,
                        decided_at, coalesce(inputs->>'grace_seconds', '0') AS grace,
                        coalesce(inputs->>'host', '') AS host, workload
                 FROM policy_decisions
                 WHERE kind = 'terminate' AND decided_at >= $1) AS t
           ORDER BY crossing, number DESC""",
        since,
    )
    return {
        r["crossing"]: Attempt(
            r["crossing"], r["number"], r["decision_id"], r["decided_at"], Decimal(r["grace"]),
            r["host"], r["workload"] or "",
        )
        for r in rows
    }  # fmt: skip


async def load_marks(conn: asyncpg.Connection) -> dict[str, dict[MarkKey, Mark]]:
    out: dict[str, dict[MarkKey, Mark]] = {}
    for r in await conn.fetch("SELECT * FROM policy_marks"):
        key = MarkKey(r["subject"], r["quota"], r["workload"], r["kind"])
        out.setdefault(key.subject, {})[key] = Mark(key, r["period"], r["until"])
    return out


async def load_sent(conn: asyncpg.Connection, since: datetime) -> set[str]:
    """Termination ids decided lately (older repeats are still caught by the table's key)."""
    rows = await conn.fetch(
        "SELECT msg_id FROM policy_outbox WHERE msg_id LIKE 'term-%' AND created_at >= $1", since
    )
    return {r["msg_id"] for r in rows}


async def pending_outbox(
    conn: asyncpg.Connection, limit: int = 500, after: tuple[datetime, str] | None = None
) -> list[asyncpg.Record]:
    """Unpublished rows with their decision's subject, oldest first, from after `after`."""
    start = after or (None, "")
    return list(
        await conn.fetch(
            """SELECT o.msg_id, o.nats_subject, o.payload, o.created_at, d.subject
               FROM policy_outbox o JOIN policy_decisions d USING (decision_id)
               WHERE o.published_at IS NULL
                 AND ($2::timestamptz IS NULL OR (o.created_at, o.msg_id) > ($2, $3))
               ORDER BY o.created_at, o.msg_id LIMIT $1""",
            limit,
            *start,
        )
    )


async def mark_published(conn: asyncpg.Connection, ids: Sequence[str], at: datetime) -> None:
    await conn.execute(
        "UPDATE policy_outbox SET published_at = $2 WHERE msg_id = ANY($1::text[])", list(ids), at
    )


async def record_config(conn: asyncpg.Connection, version: str, source: str, body: str) -> None:
    await conn.execute(
        """INSERT INTO policy_configs (version, source, body) VALUES ($1, $2, $3)
           ON CONFLICT (version) DO UPDATE SET last_seen = now(), source = EXCLUDED.source""",
        version,
        source,
        body,
    )


async def load_holds(conn: asyncpg.Connection, now: datetime) -> list[Reservation]:
    """Holds of recent allowed spawns; the caller drops those whose workload shows usage."""
    rows = await conn.fetch(
        """SELECT decision_id, subject, workload, decided_at, reservation FROM policy_decisions
           WHERE kind = 'spawn' AND reservation IS NOT NULL AND decided_at >= $1""",
        now - timedelta(days=7),
    )
    out = []
    for r in rows:
        data = json.loads(r["reservation"])
        expires = datetime.fromisoformat(data["expires"])
        if expires <= now:
            continue
        amounts = {m: Decimal(a) for m, a in data["amounts"].items()}
        out.append(
            Reservation(
                r["decision_id"], r["subject"], r["workload"], amounts, r["decided_at"], expires
            )
        )
    return out
