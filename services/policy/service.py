"""The policy service: restore state, follow usage and workloads, enforce, answer spawn checks."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import time
from datetime import timedelta

import asyncpg
from nats.aio.client import Client

from contracts.durations import DEFAULT_MAX_CLOCK_SKEW

from . import records, roster, store
from .config import PolicyConfig
from .enforcer import Enforcer
from .feed import UsageFollower
from .grantfeed import GrantFollower
from .handlers import SpawnChecker
from .journal import UNAVAILABLE, DecisionJournal
from .lifecycle import WorkloadFollower
from .live import Clock, LiveState, utc_now
from .noticeorders import load_notices
from .partitions import Ownership
from .reservations import START_TIMEOUT
from .source import ConfigSource
from .standings import horizon_hours
from .windows import HOUR, floor_hour

log = logging.getLogger("tollgate.policy")
SENT_MEMORY = timedelta(days=45)
COMPACT_EVERY = 600.0


def settle_heap() -> None:
    """Take what is loaded now (modules, the usage snapshot) out of the cycle collector's
    scans, with one full collection first.

    Measured on the policy under bench load: full collections of its heap took up to 69 ms
    of CPU, four times a minute, each a stall of every spawn check waiting behind it. What
    is frozen is still freed when nothing refers to it; only cycles among it are kept.
    """
    gc.collect()
    gc.freeze()


def minute_metrics(config: PolicyConfig) -> frozenset[str]:
    """Metrics with a workload_hour quota: kept in minute buckets for running workloads."""
    return frozenset(q.metric for q in config.quotas if q.window.workload_hour)


class PolicyService:
    """Owns the live state and every task that keeps it current and acts on it."""

    def __init__(
        self,
        nc: Client,
        pool: asyncpg.Pool,
        config: ConfigSource,
        prefix: str,
        clock: Clock = utc_now,
        sweep_every: float = 10.0,
        partition: int = 0,
        partitions: int = 1,
        max_clock_skew: timedelta = DEFAULT_MAX_CLOCK_SKEW,
        grant_cues: bool = True,
    ) -> None:
        """`grant_cues=False`: the grant cues arrive through PolicyChannels, not a
        subscription of the service's own."""
        self.pool = pool
        # Partitioned, this instance decides only for its own subjects, but follows the
        # whole usage feed and workloads stream (group pools need every member's usage),
        # each with durables of its own.
        self.owns = Ownership(partition, partitions)
        suffix = f"-p{partition}" if partitions > 1 else ""
        self.live = LiveState(config, clock, max_skew=max_clock_skew)
        self.journal = DecisionJournal(pool, self.live.stats)
        self.checker = SpawnChecker(self.live, self.journal)
        self.usage = UsageFollower(nc, pool, self.live, prefix, durable=f"policy{suffix}")
        self.workloads = WorkloadFollower(
            nc, pool, self.live, prefix, durable=f"policy-workloads{suffix}"
        )
        self.enforcer = Enforcer(nc, pool, self.live, prefix, sweep_every, owns=self.owns)
        self.grants = GrantFollower(
            nc, pool, self.live, prefix, poll_every=sweep_every, listen=grant_cues
        )
        self.ready = asyncio.Event()
        self._loaded_horizon = 0
        self._tasks: list[asyncio.Task[None]] = []

    async def load(self) -> None:
        """Restore workloads, open episodes, sent commands and holds; then take a snapshot."""
        live = self.live
        now = live.clock()
        async with self.pool.acquire() as conn:
            live.book = await roster.load_book(conn, now)
            live.marks = await records.load_marks(conn)
            live.sent = await records.load_sent(conn, now - SENT_MEMORY)
            live.attempts = await records.load_attempts(conn, now - SENT_MEMORY)
            live.notices = await load_notices(conn, now - SENT_MEMORY)
            holds = await records.load_holds(conn, now)
        await self.workloads.catch_up()
        await self.grants.start()
        # The feed's consumer exists before the snapshot, so nothing falls between them.
        await self.usage.ensure_subscribed()
        await self.resync()
        assert live.usage is not None
        for h in holds:
            # A hold whose workload already reports usage has been replaced by it.
            replaced = h.workload is not None and h.workload in live.usage.seen
            if not replaced and (h.workload is not None or now < h.created + START_TIMEOUT):
                live.holds.add(h)
        log.info(
            "policy state loaded as of ledger seq %d: %d running workloads, %d open episodes, "
            "%d holds",
            live.usage.last_seq,
            len(live.book.running),
            sum(len(m) for m in live.marks.values()),
            len(live.holds.items),
        )

    async def resync(self) -> None:
        """Rebuild usage from the ledger's rollups as of its head (start, or a config that
        needs more history than is held)."""
        live = self.live
        config = live.config.current()
        now = live.clock()
        hours = horizon_hours(config)
        spec = store.SnapshotSpec(
            now=now,
            horizon_start=floor_hour(now - hours * HOUR),
            minute_metrics=minute_metrics(config),
            running=sorted(live.book.running),
            pricebook=config.pricebook,
            max_skew=live.max_skew,
        )
        async with self.pool.acquire() as conn:
            usage = await store.load_snapshot(conn, spec)
        live.replace_usage(usage, now)
        self._loaded_horizon = hours

    def _needs_resync(self) -> bool:
        usage = self.live.usage
        config = self.live.config.current()
        if usage is None:
            return False
        grown = horizon_hours(config) > self._loaded_horizon
        # Costs are folded with the prices in force; new prices re-price from the rollups.
        repriced = usage.pricebook != config.pricebook
        return grown or repriced or not minute_metrics(config) <= usage.minute_metrics

    async def run(self, stop: asyncio.Event) -> None:
        """Load (retrying while Postgres is away), then run every task until `stop`."""
        await self._load_with_retry(stop)
        if stop.is_set():
            return
        settle_heap()
        self.ready.set()
        self._tasks = [
            asyncio.create_task(self.usage.run(stop), name="policy-usage-feed"),
            asyncio.create_task(self.usage.watch(stop), name="policy-ledger-watch"),
            asyncio.create_task(self.workloads.run(stop), name="policy-workloads"),
            asyncio.create_task(self.enforcer.run(stop), name="policy-enforcer"),
            asyncio.create_task(self.grants.run(stop), name="policy-grants"),
            asyncio.create_task(self.journal.run(stop), name="policy-journal"),
        ]
        try:
            await self._housekeeping(stop)
        finally:
            stop.set()
            self.live.wake.set()  # loops waiting for work notice the stop at once
            self.journal.wake.set()
            _, waiting = await asyncio.wait(self._tasks, timeout=0.2)
            # Fetches wait out their poll; cut them short (what they held is redelivered),
            # but let the journal write the decisions it still holds.
            for task in waiting:
                if task.get_name() != "policy-journal":
                    task.cancel()
            await asyncio.gather(*self._tasks, return_exceptions=True)

    async def _load_with_retry(self, stop: asyncio.Event) -> None:
        delay = 0.2
        while not stop.is_set():
            try:
                await self.load()
                return
            except (*UNAVAILABLE, asyncpg.PostgresError) as exc:
                log.warning(
                    "cannot load policy state (%s: %s); spawn checks answer by "
                    "failure_mode meanwhile; retrying in %.1fs",
                    type(exc).__name__,
                    exc,
                    delay,
                )
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), delay)
            delay = min(delay * 2, 5.0)

    async def _housekeeping(self, stop: asyncio.Event) -> None:
        """Resync when the config needs more history; bound memory now and then."""
        compacted = time.monotonic()
        while not stop.is_set():
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 0.5)
            for task in self._tasks:
                failed = task.exception() if task.done() and not task.cancelled() else None
                if failed is not None:
                    raise failed
            try:
                if self._needs_resync():
                    log.info("quota configuration needs more usage history: reloading it")
                    await self.resync()
            except (*UNAVAILABLE, asyncpg.PostgresError) as exc:
                log.warning("cannot reload usage history yet (%s)", exc)
            if time.monotonic() - compacted > COMPACT_EVERY and self.live.usage is not None:
                compacted = time.monotonic()
                now = self.live.clock()
                hours = horizon_hours(self.live.config.current())
                self.live.usage.compact(
                    floor_hour(now - hours * HOUR), set(self.live.book.running), now
                )
                self._loaded_horizon = hours  # older hours are now folded into totals
                settle_heap()
