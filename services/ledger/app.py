"""The ledger service: pull sample batches, fold them, commit, then ack.

Pipelined: while one batch is in its transaction, the next is fetched, parsed and planned
(folded, ordered, hashed, rows built) on the series states the ledger remembers
(`ingest.SeriesCache`). At most one transaction is in flight and commits stay in order;
a message is acked only after the transaction that folded it committed.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import logging
import os
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any

import asyncpg
import nats.errors
from faststream import AckPolicy, Context
from faststream.message import StreamMessage
from faststream.nats import PullSub
from faststream.nats.message import NatsBatchMessage
from faststream.nats.subscriber.usecases import BatchPullStreamSubscriber
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import ConsumerConfig

from contracts.durations import DEFAULT_MAX_CLOCK_SKEW
from contracts.errors import printable
from contracts.partitions import partition_samples_filter
from contracts.samples import samples_stream, samples_wildcard
from infra.broker import TollgateBroker, fetch_when_ready, jstream
from infra.bus import durable_pull, fetch_ready
from infra.deadletters import file_dead_letter

from . import ingest, metrics, store
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
        cache_series: int = 200_000,
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
        # Failpoint for crash tests: die right after the Nth commit, before its acks.
        self._exit_after_commits = int(os.environ.get(FAILPOINT_EXIT_AFTER_COMMIT, "0"))
        self._commits = 0
        self._sub: JetStreamContext.PullSubscription | None = None
        # Called with each committed batch right after its commit, before its messages are
        # acked (so a crash in between redelivers them; they then fold to nothing). It runs
        # on the ingest path: it must only hand the events over (say, to a queue).
        self.on_commit = on_commit
        self.cache = ingest.SeriesCache(cache_series)
        # The batch in its transaction (at most one), its plan, and the last one committed.
        self._inflight: asyncio.Task[bool] | None = None
        self._inflight_plan: store.Plan | None = None
        self._last_done: store.Committed | None = None
        self._subscriber: BatchPullStreamSubscriber | None = None
        self._stale = 0  # commits in a row whose plan another writer's commit overtook

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

    def declare(
        self, broker: TollgateBroker, stop: asyncio.Event, *, ready: bool = True
    ) -> BatchPullStreamSubscriber:
        """The samples consumer as a FastStream batch pull subscriber with manual acks.

        Its handler is `ingest` on the raw messages (each decoded by msgspec, poison ones
        dead-lettered, all acked after their commit). With `ready`, a lone sample is
        handed over at once (`fetch_when_ready`) rather than after `fetch_timeout`.
        Serve with `serve`; the caller connects and starts the broker.
        """
        subscriber = broker.subscriber(
            self.subject,
            stream=jstream(samples_stream(self.prefix)),
            durable=self.consumer,
            config=ConsumerConfig(ack_wait=self.ack_wait, max_deliver=-1, max_ack_pending=50_000),
            pull_sub=PullSub(batch_size=self.batch, timeout=self.fetch_timeout, batch=True),
            ack_policy=AckPolicy.MANUAL,
            decoder=_undecoded,
            title="samples",
            description="Counter batches of every host, folded into the ledger.",
        )
        if ready:
            fetch_when_ready(subscriber)

        @subscriber
        async def fold(bodies: list[bytes], message: Batch) -> None:
            await self.ingest(list(message.raw_message), stop)

        self._subscriber = subscriber
        return subscriber

    async def serve(self, stop: asyncio.Event) -> None:
        """With `declare`d subscriber running: until `stop`, then settle the last commit."""
        _fewer_collections()
        await stop.wait()
        if self._subscriber is not None:
            await self._subscriber.stop()  # no new batch; then the one in flight commits
        await self.settle()

    async def run(self, stop: asyncio.Event) -> None:
        """Consume until `stop` is set. Faults are retried with backoff, never fatal."""
        _fewer_collections()
        try:
            await self._run(stop)
        finally:
            await self.settle()

    async def _run(self, stop: asyncio.Event) -> None:
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
                if self._inflight is not None and self._inflight.done():
                    await self.settle()  # surfaces what went wrong, if anything did
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
            # Returns with the last chunk's transaction in flight: the next fetch overlaps it.
            await self.ingest(msgs, stop)

    async def handle(self, msgs: list[Msg], stop: asyncio.Event | None = None) -> None:
        """Fold one fetched batch: dead letters out, the rest committed, then acked."""
        try:
            await self.ingest(msgs, stop)
        finally:
            await self.settle()

    async def ingest(self, msgs: list[Msg], stop: asyncio.Event | None) -> bool:
        """Parse, plan and submit `msgs` in chunks; False when stopping cut it short.

        Returns with the last chunk's transaction still in flight (its messages are acked
        when it commits): the shape of a batch handler, e.g. a FastStream batch pull
        subscriber with manual acks; call `settle` before stopping. The batch is committed
        in chunks of at most `max_points` readings, so one transaction (and the memory it
        takes) stays bounded however large the messages.
        """
        metrics.MESSAGES.inc(len(msgs))
        chunk: list[Msg] = []
        items: list[Reading] = []
        skewed: list[tuple[str, str, Arrival]] = []
        for i, msg in enumerate(msgs):
            if i % 16 == 15:
                await asyncio.sleep(0)  # let the transaction in flight take its next step
            try:
                msg_id = msg.headers.get("Nats-Msg-Id") if msg.headers else None
                batch = parse_sample_message(msg.subject, msg.data, self.max_payload, msg_id)
            except DeadLetter as dead:
                await self._dead_letter(msg, dead)
                continue
            arrived = arrival(batch.sampled_at, received_at(msg), self.max_clock_skew)
            more = readings(batch, msg.metadata.sequence.stream, arrived)
            if chunk and len(items) + len(more) > self.max_points:
                if not await self._submit(chunk, items, skewed, stop):
                    return False
                chunk, items, skewed = [], [], []
            chunk.append(msg)
            items.extend(more)
            if arrived.skew_seconds is not None:
                skewed.append((batch.host, batch.epoch, arrived))
        return not chunk or await self._submit(chunk, items, skewed, stop)

    async def _submit(
        self,
        msgs: list[Msg],
        items: list[Reading],
        skewed: list[tuple[str, str, Arrival]],
        stop: asyncio.Event | None,
    ) -> bool:
        """Plan a chunk while the previous one commits, then put it in flight."""
        last_stream_seq = max(m.metadata.sequence.stream for m in msgs)
        if self._stale >= 2 and self._commits % 8:
            # Other writers keep moving the head (several ledgers on one database, say one
            # per partition): planning ahead would be wasted, so fold under the lock, as
            # before, and try planning again every 8th commit.
            if not await self.settle():
                return False
            task = self._commit_and_ack(msgs, items, last_stream_seq, None, skewed, stop)
            self._inflight = asyncio.create_task(task)
            return True
        inflight = self._inflight is not None and not self._inflight.done()
        before = self._inflight_plan if inflight else None
        try:
            planned: store.Plan | None = await ingest.plan_ahead(
                self.pool, self.cache, items, last_stream_seq, before
            )
        except TRANSIENT as exc:
            planned = self._cannot_plan(exc)
        if not await self.settle():
            return False  # stopping: nothing of this chunk was written; it is redelivered
        done = self._last_done
        if planned is None:
            pass  # folded under the commit's lock, which retries until Postgres is back
        elif before is not None and done is not None and done.plan is before and done.as_planned:
            assert planned.head[:3] == done.head[:3]
            planned.head = done.head  # it follows exactly the commit it was planned after
        elif planned.head != self.cache.head:
            # Planned after a batch that was re-planned (or not committed): plan it again.
            try:
                planned = await ingest.plan_ahead(
                    self.pool, self.cache, items, last_stream_seq, None
                )
            except TRANSIENT as exc:
                planned = self._cannot_plan(exc)
        self._inflight_plan = planned
        task = self._commit_and_ack(msgs, items, last_stream_seq, planned, skewed, stop)
        self._inflight = asyncio.create_task(task)
        return True

    def _cannot_plan(self, exc: BaseException) -> None:
        """Postgres went away while a batch was planned: fold it under the commit's lock."""
        self.cache.clear()  # what the database holds is read again once it is back
        log.warning(
            "ledger: cannot read series states to plan a batch (%s: %s); it is folded when "
            "its commit gets through, retried until Postgres is back",
            type(exc).__name__, exc,
        )  # fmt: skip

    async def settle(self) -> bool:
        """Wait for the transaction in flight; False if it was cut short by stopping."""
        task, self._inflight = self._inflight, None
        self._inflight_plan = None
        return True if task is None else await task

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
        self,
        msgs: list[Msg],
        items: list[Reading],
        last_stream_seq: int,
        planned: store.Plan | None,
        skewed: list[tuple[str, str, Arrival]],
        stop: asyncio.Event | None,
    ) -> bool:
        with metrics.COMMIT_SECONDS.time():
            done = await self._commit(items, last_stream_seq, planned, msgs, stop)
        if done is None:
            self.cache.clear()  # whether it went through is unknown: read the states again
            return False  # stopping: the messages are redelivered and fold to the same result
        self.cache.committed(done)
        self._last_done = done
        metrics.PLANNED_AHEAD.labels("yes" if done.as_planned else "no").inc()
        self._stale = 0 if done.as_planned else self._stale + 1
        self._commits += 1
        if self._commits == self._exit_after_commits:
            log.warning("failpoint %s: exiting between commit and ack", FAILPOINT_EXIT_AFTER_COMMIT)
            os._exit(137)
        p = done.plan
        if self.on_commit is not None and p.usage:
            self.on_commit(p.result())
        for msg in msgs:
            await msg.ack()
        metrics.POINTS.inc(len(p.items))
        metrics.EVENTS.inc(len(p.usage))
        metrics.LAST_COMMIT.set_to_current_time()
        if p.usage:
            self.committed.set()
        resets = p.resets()
        metrics.RESETS.inc(resets)
        for seq, u in enumerate(p.usage, p.first_seq):
            if resets and u.reset:
                k = u.key
                log.warning(
                    "counter reset: host=%s epoch=%s subject=%s workload=%s metric=%s "
                    "went back to %s; counted from zero (ledger seq %d)",
                    k.host, k.epoch, k.subject, k.workload, k.metric, u.delta, seq,
                )  # fmt: skip
        self._report_skew(skewed)
        return True

    async def _commit(
        self,
        items: list[Reading],
        last_stream_seq: int,
        planned: store.Plan | None,
        msgs: list[Msg],
        stop: asyncio.Event | None,
    ) -> store.Committed | None:
        backoff = 0.1
        while True:
            try:
                async with self.pool.acquire() as conn:
                    return await store.commit(conn, self.consumer, items, last_stream_seq, planned)
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


Batch = Annotated[NatsBatchMessage, Context("message")]


async def _undecoded(msg: StreamMessage[Any], original: Callable[..., Awaitable[Any]]) -> Any:
    """The bodies as they came: the ledger decodes each one itself (msgspec, else pydantic)."""
    return msg.body


# Folding allocates some ten tuples per reading, nearly none of them in reference cycles:
# at the default threshold (700) the collector ran every few dozen readings and walked the
# whole heap often; measured on plan(), ~25% of the ledger's CPU with a 300K-object heap.
GC_THRESHOLD = 50_000


def _fewer_collections() -> None:
    """Collect less often, and never walk what was alive at start-up (the process's own)."""
    first, *rest = gc.get_threshold()
    if first < GC_THRESHOLD:
        gc.freeze()
        gc.set_threshold(GC_THRESHOLD, *rest)


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
