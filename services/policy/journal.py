"""Spawn decisions written behind the reply: stored within a tenth of a second, never in
the way.

A spawn check answers from memory; its record (with every input) goes to Postgres in
batches (each batch is a few round trips to Postgres on the policy's event loop: at 200
checks/s, 10 batches a second rather than 50), made into rows a slice at a time so checks
arriving meanwhile are not held up. While
Postgres is away the records wait here, in order, and are written when it returns, so an
outage slows nothing down and loses nothing short of a crash.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Sequence
from datetime import datetime

import asyncpg

from . import records, roster
from .live import PolicyStats
from .records import DecisionRecord
from .turns import Turns

log = logging.getLogger("tollgate.policy")

UNAVAILABLE = (
    OSError,
    TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # A pooled connection that got the FATAL of a Postgres killed under it (kill -9).
    asyncpg.InternalClientError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.AdminShutdownError,
)


LINGER = 0.1  # seconds


class DecisionJournal:
    """A queue of decision records and learned groups, flushed to Postgres in the background."""

    def __init__(self, pool: asyncpg.Pool, stats: PolicyStats, limit: int = 200_000) -> None:
        self.pool = pool
        self.stats = stats
        self.limit = limit
        self.pending: deque[DecisionRecord] = deque()
        self.groups: dict[str, tuple[Sequence[str], str, datetime]] = {}
        self.wake = asyncio.Event()
        self.dropped = 0

    def add(self, record: DecisionRecord) -> None:
        if len(self.pending) >= self.limit:
            self.pending.popleft()
            self.dropped += 1
        self.pending.append(record)
        self.wake.set()

    def learn(self, subject: str, groups: Sequence[str], source: str, at: datetime) -> None:
        self.groups[subject] = (tuple(groups), source, at)
        self.wake.set()

    async def flush(self, batch: int = 1000) -> int:
        """Write what is pending; on a fault keep it for the next try and re-raise."""
        taken = [self.pending.popleft() for _ in range(min(batch, len(self.pending)))]
        learned, self.groups = self.groups, {}
        try:
            rows = []
            turns = Turns()
            for record in taken:
                rows.append(record.row())  # JSON of every input: the costly part
                await turns.take()
            async with self.pool.acquire() as conn, conn.transaction():
                if rows:
                    await records.save_decision_rows(conn, rows)
                for subject, (groups, source, at) in learned.items():
                    await roster.learn_groups(conn, subject, groups, source, at)
        except BaseException:
            self.pending.extendleft(reversed(taken))
            for subject, value in learned.items():
                self.groups.setdefault(subject, value)
            raise
        self.stats.bump("decisions_stored", len(taken))
        return len(taken)

    async def run(self, stop: asyncio.Event) -> None:
        backoff = 0.2
        while not stop.is_set():
            self.wake.clear()
            try:
                while self.pending or self.groups:
                    await self.flush()
                backoff = 0.2
            except (*UNAVAILABLE, asyncpg.PostgresError) as exc:
                self.stats.bump("decision_store_failures")
                log.warning(
                    "cannot store %d spawn decisions yet (%s: %s); retrying in %.1fs",
                    len(self.pending),
                    type(exc).__name__,
                    exc,
                    backoff,
                )
                await _wait(stop, backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            await _wait(self.wake, 0.5)
            # Linger a moment so a burst of decisions goes to Postgres in one round trip.
            await _wait(stop, LINGER)
        with contextlib.suppress(*UNAVAILABLE, asyncpg.PostgresError):
            while self.pending or self.groups:
                await self.flush()


async def _wait(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
