"""The ledger service: pull sample batches, fold them, commit, then ack."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections import OrderedDict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from contracts.durations import DEFAULT_MAX_CLOCK_SKEW
from contracts.errors import printable
from contracts.partitions import partition_samples_filter
from contracts.samples import samples_stream, samples_wildcard
from infra.bus import durable_pull, fetch_ready
from infra.deadletters import file_dead_letter

from . import metrics, store
from .domain import Arrival, Reading, arrival, readings
from .errors import DeadLetter
from .handlers import parse_sample_message

log = logging.getLogger("tollgate.ledger")
FAILPOINT_EXIT_AFTER_COMMIT = "TOLLGATE_FAILPOINT_EXIT_AFTER_COMMIT"

# Faults that go away by themselves: wait and try the same batch again.
TRANSIENT = (
    OSError,
    asyncio.TimeoutError,
    asyncpg.PostgresConnectionError,
    asyncpg.InterfaceError,
    # A pooled connection that got the FATAL of a Postgres killed under it (kill -9).
    asyncpg.InternalClientError,
    asyncpg.CannotConnectNowError,
    asyncpg.TooManyConnectionsError,
    asyncpg.DeadlockDetectedError,
    asyncpg.SerializationError,
    asyncpg.AdminShutdownError,
    asyncpg.CrashShutdownError,
)


class LedgerService:
    """One ledger consumer: fetch, fold, commit in one transaction, ack after commit."""

    def __init__(
        self,
        nc: Client,
        pool: asyncpg.Pool,
        *,
        prefix: str,
        consumer: str = "ledger",
        partition: int | None = None,
        batch: int = 1000,
        fetch_timeout: float = 0.5,
        max_payload: int = 1 << 20,
        ack_wait: float = 30.0,
        max_points: int = 50_000,
        max_clock_skew: timedelta = DEFAULT_MAX_CLOCK_SKEW,
        on_commit: Callable[[store.BatchResult], None] | None = None,
    ) -> None:
        self.nc = nc
        self.js: JetStreamContext = nc.jetstream()
        self.pool = pool
        self.prefix = prefix
        # One partition of a partitioned samples stream (durable `ledger-p<k>`), or all.
        self.consumer = consumer if partition is None else f"{consumer}-p{partition}"
        self.subject = (
            samples_wildcard(prefix)
            if partition is None
            else partition_samples_filter(partition, prefix)
        )
        self.batch = batch
        self.fetch_timeout = fetch_timeout
        self.max_payload = max_payload
        self.ack_wait = ack_wait
        self.max_points = max_points
        self.max_clock_skew = max_clock_skew
        # (host, epoch) pairs whose skew was logged already: one line per host clock life.
        self._skew_logged: OrderedDict[tuple[str, str], None] = OrderedDict()
        self._skew_max = 0.0
        # Set after every commit that appended events: wakes the usage feed publisher.
        self.committed = asyncio.Event()
        # Called with every committed batch, at once (the usage feed publishes from it).
        self.on_commit = on_commit
        # Failpoint for crash tests: die right after the Nth commit, before its acks.
        self._exit_after_commits = int(os.environ.get(FAILPOINT_EXIT_AFTER_COMMIT, "0"))
        self._commits = 0
        self._sub: JetStreamContext.PullSubscription | None = None

    async def subscribe(self) -> None:
        """Create or update the durable pull consumer, then bind to it."""
        self._sub = await durable_pull(
            self.js,
            stream=samples_stream(self.prefix),
            subject=self.subject,
            durable=self.consumer,
            # How soon a message whose ack was lost (crash, NATS restart) comes back.
            # Commits that wait on Postgres keep their messages with in_progress().
            ack_wait=self.ack_wait,
            max_ack_pending=50_000,
        )

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set. Faults are retried with backoff, never fatal."""
        backoff = 0.1
        while not stop.is_set():
            try:
                if self._sub is None:
                    await self.subscribe()
                assert self._sub is not None
                msgs = await fetch_ready(self._sub, self.batch, self.fetch_timeout)
            except TimeoutError:
                # Nothing to fetch (nats-py raises its own and the builtin TimeoutError);
                # a message that arrives late waits in the client's queue for the next fetch.
                continue
            except (nats.errors.Error, OSError) as exc:
                log.warning(
                    "ledger: cannot fetch from NATS (%s: %s); retrying in %.1fs",
                    type(exc).__name__, exc, backoff,
                )  # fmt: skip
                await _sleep_or_stop(stop, backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            await self.handle(msgs, stop)

    async def handle(self, msgs: list[Msg], stop: asyncio.Event | None = None) -> None:
        """Fold one fetched batch: dead letters out, the rest committed, then acked.

        The batch is committed in chunks of at most `max_points` readings, so one
        transaction (and the memory it takes) stays bounded however large the messages.
        """
        metrics.MESSAGES.inc(len(msgs))
        chunk: list[Msg] = []
        items: list[Reading] = []
        skewed: list[tuple[str, str, Arrival]] = []
        for msg in msgs:
            try:
                msg_id = msg.headers.get("Nats-Msg-Id") if msg.headers else None
                batch = parse_sample_message(msg.subject, msg.data, self.max_payload, msg_id)
            except DeadLetter as dead:
                await self._dead_letter(msg, dead)
                continue
            arrived = arrival(batch.sampled_at, received_at(msg), self.max_clock_skew)
            more = readings(batch, msg.metadata.sequence.stream, arrived)
            if chunk and len(items) + len(more) > self.max_points:
                if not await self._commit_and_ack(chunk, items, stop):
                    return
                self._report_skew(skewed)
                chunk, items, skewed = [], [], []
            chunk.append(msg)
            items.extend(more)
            if arrived.skew_seconds is not None:
                skewed.append((batch.host, batch.epoch, arrived))
        if chunk and await self._commit_and_ack(chunk, items, stop):
            self._report_skew(skewed)

    def _report_skew(self, skewed: list[tuple[str, str, Arrival]]) -> None:
        """Count committed skewed samples; log each host's epoch once, so it can be found."""
        for host, epoch, arrived in skewed:
            assert arrived.skew_seconds is not None
            metrics.CLOCK_SKEWED.inc()
            size = abs(float(arrived.skew_seconds))
            if size > self._skew_max:
                self._skew_max = size
                metrics.CLOCK_SKEW_MAX.set(size)
            if (host, epoch) in self._skew_logged:
                continue
            self._skew_logged[(host, epoch)] = None
            if len(self._skew_logged) > 10_000:
                self._skew_logged.popitem(last=False)
            ahead = "ahead of" if arrived.skew_seconds > 0 else "behind"
            log.warning(
                "clock skew: host=%s epoch=%s reports sampled_at %s seconds %s when JetStream "
                "stored its sample (%s); its usage is counted in full at %s, the edge of the "
                "%ss window (TOLLGATE_MAX_CLOCK_SKEW). Fix the host's clock (NTP); this is "
                "logged once per host and epoch, every such sample is counted in "
                "tollgate_ledger_clock_skewed_samples_total and flagged on its events",
                host, epoch, abs(arrived.skew_seconds), ahead,
                arrived.received_at.isoformat(), arrived.placed_at.isoformat(),
                int(self.max_clock_skew.total_seconds()),
            )  # fmt: skip

    async def _commit_and_ack(
        self, msgs: list[Msg], items: list[Reading], stop: asyncio.Event | None
    ) -> bool:
        last_stream_seq = max(m.metadata.sequence.stream for m in msgs)
        with metrics.COMMIT_SECONDS.time():
            result = await self._commit(items, last_stream_seq, msgs, stop)
        if result is None:
            return False  # stopping: the messages are redelivered and fold to the same result
        if self.on_commit is not None and result.events:
            self.on_commit(result)
        self._commits += 1
        if self._commits == self._exit_after_commits:
            log.warning("failpoint %s: exiting between commit and ack", FAILPOINT_EXIT_AFTER_COMMIT)
            os._exit(137)
        for msg in msgs:
            await msg.ack()
        metrics.POINTS.inc(len(items))
        metrics.EVENTS.inc(len(result.events))
        metrics.RESETS.inc(result.resets)
        metrics.LAST_COMMIT.set_to_current_time()
        if result.events:
            self.committed.set()
        for event in result.events:
            if event.usage.reset:
                k = event.usage.key
                log.warning(
                    "counter reset: host=%s epoch=%s subject=%s workload=%s metric=%s "
                    "went back to %s; counted from zero (ledger seq %d)",
                    k.host, k.epoch, k.subject, k.workload, k.metric, event.usage.delta,
                    event.seq,
                )  # fmt: skip
        return True

    async def _commit(
        self,
        items: list[Reading],
        last_stream_seq: int,
        msgs: list[Msg],
        stop: asyncio.Event | None,
    ) -> store.BatchResult | None:
        backoff = 0.1
        while True:
            try:
                async with self.pool.acquire() as conn:
                    return await store.apply_readings(conn, self.consumer, items, last_stream_seq)
            except TRANSIENT as exc:
                metrics.COMMIT_RETRIES.inc()
                log.warning(
                    "ledger: commit failed (%s: %s); retrying the same %d messages in %.1fs",
                    type(exc).__name__,
                    exc,
                    len(msgs),
                    backoff,
                )
            # Keep the messages ours while we wait, so they are not redelivered meanwhile.
            for msg in msgs:
                try:
                    await msg.in_progress()
                except (nats.errors.Error, OSError):
                    break
            if stop is not None and stop.is_set():
                return None
            await asyncio.sleep(backoff)
            backoff = min(backoff * 2, 5.0)

    async def _dead_letter(self, msg: Msg, dead: DeadLetter) -> None:
        await file_dead_letter(
            self.js, msg, dead.reason, dead.detail, prefix=self.prefix, consumer=self.consumer
        )
        metrics.DEAD_LETTERS.labels(dead.reason.value).inc()
        log.warning(
            "dead letter %s (stream seq %d on %s): %s",
            dead.reason.value,
            msg.metadata.sequence.stream,
            msg.subject,
            printable(dead.detail, 1000),
        )


def received_at(msg: Msg) -> datetime:
    """When JetStream stored `msg` (the same on every redelivery), else the ledger's clock."""
    try:
        stored = msg.metadata.timestamp
    except (AttributeError, ValueError, IndexError, nats.errors.Error):
        stored = None
    if isinstance(stored, datetime):
        return stored.astimezone(UTC)
    return datetime.now(UTC)


async def _sleep_or_stop(stop: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(stop.wait(), seconds)
