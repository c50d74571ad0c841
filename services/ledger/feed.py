"""The usage feed: committed events published to `tollgate.v1.usage.<subject>` in seq order.

One JetStream message carries many events: a `tollgate.usage_batch.v1` envelope per (ledger
batch, subject, chunk of at most MAX_BATCH_EVENTS events and MAX_BATCH_BYTES bytes). The
ledger numbers a batch's events grouped by subject, so each envelope covers a contiguous
range of seqs and consecutive envelopes are consecutive ranges.

`usage_events` stays the outbox. The publisher takes what the ledger just committed from
memory (`on_commit`, no read back), and reads from Postgres whatever it does not hold: after
a restart, when another ledger instance committed it, or when it fell so far behind that it
dropped its in-memory copy (bounded by `max_buffered` events). The feed's position advances
only past envelopes JetStream acked, so a crash between commit and publish loses nothing.
The chunking depends only on the committed events, never on how they were read, so a
republished envelope has the same `Nats-Msg-Id` (`usage:<first_seq>-<last_seq>`) and
JetStream drops it inside its duplicate window; consumers are idempotent by seq beyond it.
The row lock on the position makes one publisher active at a time.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import threading
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Mapping
from datetime import UTC, datetime
from decimal import Decimal
from typing import NamedTuple

import asyncpg
import msgspec
import nats.errors
from nats.js import JetStreamContext

from contracts import format_decimal
from contracts.usage import (
    BATCH_SCHEMA,
    MAX_BATCH_BYTES,
    MAX_BATCH_EVENTS,
    usage_msg_id,
    usage_subject,
)

from . import metrics
from .app import TRANSIENT
from .store import BatchResult

log = logging.getLogger("tollgate.ledger.feed")
FEED = "usage"
# Room for the envelope's own fields around its events (a subject is at most 800 bytes).
_HEAD_ROOM = 2048


class FeedEvent(msgspec.Struct, frozen=True, gc=False, omit_defaults=True):
    """One event of an envelope (`UsageBatchEvent`), ready to encode; fields at their default
    (null, false, no labels) are left out of the JSON.

    Not tracked by the garbage collector (it holds no cycles): tens of thousands are made
    per batch, and tracking them made the collector, not the encoding, the cost.
    """

    seq: int
    host: str
    epoch: str
    workload: str
    metric: str
    delta: str
    window_end: datetime
    window_start: datetime | None = None
    reset: bool = False
    labels: Mapping[str, str] = {}
    received_at: datetime | None = None
    sampled_at: datetime | None = None
    clock_skew_seconds: str | None = None


class FeedBatch(NamedTuple):
    """(Part of) a committed ledger batch as the feed publishes it: consecutive events from
    seq `first_seq`, each as its JSON, subjects grouped."""

    batch_id: int
    batch_hash: str
    recorded_at: datetime
    first_seq: int  # of events[0]
    subjects: list[str]  # per event
    events: list[bytes]  # per event: its JSON object (`UsageBatchEvent`)

    @property
    def last_seq(self) -> int:
        return self.first_seq + len(self.events) - 1


class Envelope(NamedTuple):
    subject: str
    first_seq: int
    last_seq: int
    body: bytes

    @property
    def msg_id(self) -> str:
        return usage_msg_id(self.first_seq, self.last_seq)


# Dict keys sorted: labels read back from jsonb encode exactly as those held in memory.
_ENCODER = msgspec.json.Encoder(order="deterministic")
_NO_LABELS: Mapping[str, str] = {}


def encode_event(event: FeedEvent) -> bytes:
    return _ENCODER.encode(event)


def delta_text(value: Decimal) -> str:
    """`format_decimal`, faster for the plain notation `str` gives most amounts."""
    text = str(value)
    if "E" in text:
        return format_decimal(value)
    return text.rstrip("0").rstrip(".") if "." in text else text


def _amount(value: Decimal | None) -> str | None:
    return None if value is None else delta_text(value)


def _utc(value: datetime) -> datetime:
    return value if value.tzinfo is UTC else value.astimezone(UTC)


def _maybe_utc(value: datetime | None) -> datetime | None:
    if value is None or value.tzinfo is UTC:
        return value
    return value.astimezone(UTC)


def _labels(value: object) -> dict[str, str]:
    loaded = json.loads(value) if isinstance(value, str) else value
    return dict(loaded) if isinstance(loaded, dict) else {}


def batch_of_result(result: BatchResult, lo: int = 0, hi: int | None = None) -> FeedBatch | None:
    """The feed's view of a batch the ledger just committed (in memory, no read back), or of
    its events [lo:hi]."""
    chosen = result.events[lo:hi]
    if not chosen:
        return None
    first = chosen[0]
    subjects: list[str] = []
    events: list[bytes] = []
    encode = _ENCODER.encode
    for e in chosen:
        u = e.usage
        k = u.key
        subjects.append(k.subject)
        # The ledger's times are UTC already: the checks are for safety, not conversion.
        event = FeedEvent(
            e.seq, k.host, k.epoch, k.workload, k.metric, delta_text(u.delta), _utc(u.window_end),
            _maybe_utc(u.window_start), u.reset, dict(u.labels) if u.labels else _NO_LABELS,
            _maybe_utc(u.received_at), _maybe_utc(u.sampled_at), _amount(u.clock_skew),
        )  # fmt: skip
        events.append(encode(event))
    return FeedBatch(
        first.batch_id, first.batch_hash, _utc(first.recorded_at), first.seq, subjects, events
    )


def subject_runs(result: BatchResult) -> Iterator[tuple[int, int]]:
    """[lo, hi) of each run of one subject's events: no envelope crosses their bounds."""
    lo = 0
    events = result.events
    for i in range(1, len(events) + 1):
        if i == len(events) or events[i].usage.key.subject != events[lo].usage.key.subject:
            yield lo, i
            lo = i


def _event_of_row(r: asyncpg.Record) -> bytes:
    event = FeedEvent(
        r["seq"], r["host"], r["epoch"], r["workload"], r["metric"], delta_text(r["delta"]),
        _utc(r["window_end"]), _maybe_utc(r["window_start"]), r["reset"], _labels(r["labels"]),
        _maybe_utc(r["received_at"]), _maybe_utc(r["sampled_at"]),
        _amount(r["clock_skew_seconds"]),
    )  # fmt: skip
    return _ENCODER.encode(event)


def envelopes(
    batch: FeedBatch,
    prefix: str,
    after: int = 0,
    max_events: int = MAX_BATCH_EVENTS,
    max_bytes: int = MAX_BATCH_BYTES,
) -> Iterator[Envelope]:
    """The batch's envelopes for the events past seq `after`, in seq order.

    Greedy and deterministic: a chunk ends where the subject changes, at `max_events`, or
    before the event that would take its JSON past `max_bytes`. Starting at an envelope's
    boundary gives the same envelopes as starting at the batch's first event.
    """
    budget = max_bytes - _HEAD_ROOM
    head = (
        f'{{"schema":"{BATCH_SCHEMA}","subject":%s,"batch_id":{batch.batch_id},'
        f'"batch_hash":%s,"recorded_at":%s,"first_seq":%d,"last_seq":%d,"events":['
    )
    common = (_ENCODER.encode(batch.batch_hash), _ENCODER.encode(batch.recorded_at))
    start = max(after + 1 - batch.first_seq, 0)
    subject: str | None = None
    parts: list[bytes] = []
    size = 0
    first = 0

    def close() -> Envelope:
        assert subject is not None
        last = first + len(parts) - 1
        top = head % (_ENCODER.encode(subject).decode(), *(c.decode() for c in common), first, last)
        return Envelope(subject, first, last, top.encode() + b",".join(parts) + b"]}")

    for i in range(start, len(batch.events)):
        data, owner = batch.events[i], batch.subjects[i]
        if parts and (
            owner != subject or len(parts) >= max_events or size + len(data) + 1 > budget
        ):
            yield close()
            parts, size = [], 0
        if not parts:
            subject, first = owner, batch.first_seq + i
        parts.append(data)
        size += len(data) + 1
    if parts:
        yield close()


async def committed_batches(
    conn: asyncpg.Connection, position: int, limit: int = 20_000
) -> list[FeedBatch]:
    """Whole ledger batches read back from the one holding `position + 1`, about `limit` events
    (at least one batch); events up to `position` left out."""
    first_batch = await conn.fetchval(
        "SELECT batch_id FROM usage_events WHERE seq = $1", position + 1
    )
    if first_batch is None:
        return []
    heads = await conn.fetch(
        """SELECT batch_id, hash, committed_at, first_seq, last_seq FROM ledger_batches
           WHERE batch_id >= $1 ORDER BY batch_id LIMIT 1000""",
        first_batch,
    )
    chosen, count = [], 0
    for h in heads:
        if chosen and count >= limit:
            break
        chosen.append(h)
        count += h["last_seq"] - max(h["first_seq"], position + 1) + 1
    rows = await conn.fetch(
        """SELECT seq, batch_id, host, epoch, subject, workload, metric, delta, window_start,
                  window_end, reset, labels, received_at, sampled_at, clock_skew_seconds
           FROM usage_events WHERE seq > $1 AND seq <= $2 ORDER BY seq""",
        position,
        chosen[-1]["last_seq"],
    )
    by_batch: dict[int, list[asyncpg.Record]] = {}
    for r in rows:
        by_batch.setdefault(r["batch_id"], []).append(r)
    out = []
    for h in chosen:
        mine = by_batch.get(h["batch_id"], [])
        if not mine:
            break  # not visible (cannot happen: committed batches are a prefix)
        batch = FeedBatch(
            h["batch_id"], h["hash"], _utc(h["committed_at"]), mine[0]["seq"],
            [r["subject"] for r in mine], [_event_of_row(r) for r in mine],
        )  # fmt: skip
        out.append(batch)
    return out


class UsageFeed:
    """Publishes every committed usage event once, gap-free, in ledger order, many to a message.

    `on_commit` may be called from another thread than the one `run` runs in: `tollgate
    ledger` runs the publisher on an event loop of its own (`run_in_thread`), so the ledger's
    CPU-bound parsing never delays a publish and publishing never delays a fetch.
    """

    def __init__(
        self,
        js: JetStreamContext | None,
        pool: asyncpg.Pool | None,
        prefix: str,
        batch: int = 20_000,
        max_buffered: int = 200_000,
    ):
        self.js = js
        self.pool = pool
        self.prefix = prefix
        self.batch = batch  # events per publish round (whole ledger batches, at least one)
        self.max_buffered = max_buffered
        self.published = 0
        self.envelopes = 0
        self.dropped = 0  # times the in-memory copy was dropped for falling behind
        # Committed batches as the ledger handed them over (converted when published).
        self._memory: deque[BatchResult] = deque()
        self._buffered = 0
        self._lock = threading.Lock()
        self._wake = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None

    def on_commit(self, result: BatchResult) -> None:
        """The ledger committed `result`: keep it for publishing (O(1), never blocks long)."""
        n = len(result.events)
        if not n:
            return
        with self._lock:
            if self._buffered + n > self.max_buffered:
                # Behind by more than we hold: publish from Postgres until caught up.
                if self._memory:
                    self.dropped += 1
                    log.info(
                        "usage feed: %d committed events not yet published; reading them "
                        "from Postgres instead of holding them in memory", self._buffered + n,
                    )  # fmt: skip
                self._memory.clear()
                self._buffered = 0
            else:
                self._memory.append(result)
                self._buffered += n
        loop = self._loop
        if loop is None:
            self._wake.set()
        else:
            with contextlib.suppress(RuntimeError):  # its loop closed: stopping
                loop.call_soon_threadsafe(self._wake.set)

    def _forget_through(self, seq: int) -> None:
        with self._lock:
            while self._memory and self._memory[0].events[-1].seq <= seq:
                self._buffered -= len(self._memory.popleft().events)

    def _from_memory(self, position: int) -> list[BatchResult]:
        """Consecutive batches held in memory starting at `position + 1` (else none)."""
        self._forget_through(position)
        with self._lock:
            held = list(self._memory)
        out: list[BatchResult] = []
        expected, count = position + 1, 0
        for r in held:
            first, last = r.events[0].seq, r.events[-1].seq
            if not first <= expected <= last or (out and count >= self.batch):
                break
            out.append(r)
            count += last - expected + 1
            expected = last + 1
        return out

    async def publish_pending(self) -> int:
        """Publish what is committed but not yet published; return how many events went out.

        Each envelope is sent as soon as it is built (its ack awaited with the others at the
        end), so encoding the next overlaps JetStream storing the last.
        """
        assert self.pool is not None and self.js is not None, "attach a pool and JetStream"
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO feed_positions VALUES ($1, 0, now()) ON CONFLICT DO NOTHING", FEED
            )
            position = await conn.fetchval(
                "SELECT seq FROM feed_positions WHERE feed = $1 FOR UPDATE", FEED
            )
            held = self._from_memory(position)
            batches: Iterable[FeedBatch | BatchResult] = held or await committed_batches(
                conn, position, self.batch
            )
            sent: list[tuple[Envelope, asyncio.Task[object]]] = []
            for source in batches:
                # A subject's run at a time, each sent while the next is encoded.
                if isinstance(source, FeedBatch):
                    parts: Iterable[FeedBatch | None] = [source]
                else:
                    parts = (batch_of_result(source, lo, hi) for lo, hi in subject_runs(source)
                             if source.events[hi - 1].seq > position)  # fmt: skip
                for batch in parts:
                    assert batch is not None
                    for env in envelopes(batch, self.prefix, position):
                        sent.append((env, asyncio.create_task(self._send(env))))
                        await asyncio.sleep(0)  # it goes out while the next one is built
            if not sent:
                return 0
            acks = await asyncio.gather(*(t for _, t in sent), return_exceptions=True)
            done, count = position, 0
            for (env, _), ack in zip(sent, acks, strict=True):
                if isinstance(ack, BaseException):
                    break
                done, count = env.last_seq, count + 1
            await conn.execute(
                "UPDATE feed_positions SET seq = $2, updated_at = $3 WHERE feed = $1",
                FEED,
                done,
                datetime.now(UTC),
            )
        self._forget_through(done)
        failed = next((a for a in acks if isinstance(a, BaseException)), None)
        if failed is not None:
            raise failed
        self.published += done - position
        self.envelopes += count
        metrics.FEED_PUBLISHED.inc(done - position)
        return int(done - position)

    async def _send(self, env: Envelope) -> object:
        assert self.js is not None
        return await self.js.publish(
            usage_subject(env.subject, self.prefix), env.body, headers={"Nats-Msg-Id": env.msg_id}
        )

    async def run(self, stop: asyncio.Event, wake: asyncio.Event | None = None) -> None:
        """Publish whenever the ledger commits (`on_commit`, or `wake`), at least once a second."""
        self._loop = asyncio.get_running_loop()
        backoff = 0.1
        wakes = [self._wake] if wake is None else [self._wake, wake]
        while not stop.is_set():
            for w in wakes:
                w.clear()
            try:
                while await self.publish_pending():
                    pass  # more may be waiting: keep going before sleeping
                backoff = 0.1
            except (*TRANSIENT, nats.errors.Error) as exc:
                log.warning("usage feed: cannot publish (%s: %s); retrying in %.1fs",
                            type(exc).__name__, exc, backoff)  # fmt: skip
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            if any(w.is_set() for w in wakes):
                continue
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(_first(stop, *wakes), 1.0)


Connections = Callable[
    [asyncio.Event], contextlib.AbstractAsyncContextManager[tuple[JetStreamContext, asyncpg.Pool]]
]


async def run_in_thread(feed: UsageFeed, connect: Connections, stop: asyncio.Event) -> None:
    """Run `feed` until `stop` on an event loop of its own, in a thread of its own.

    `connect(stop)` opens its NATS connection and pool there (they belong to that loop).
    The ledger's loop only hands committed batches over (`on_commit`); a fetch, a parse or
    a commit there never waits for a publish, nor a publish for them.
    """
    loop = asyncio.get_running_loop()
    done: asyncio.Future[None] = loop.create_future()
    inner: list[tuple[asyncio.AbstractEventLoop, asyncio.Event]] = []

    async def main() -> None:
        local = asyncio.Event()
        inner.append((asyncio.get_running_loop(), local))
        if stop.is_set():
            return
        async with connect(local) as (js, pool):
            feed.js, feed.pool = js, pool
            await feed.run(local)

    def body() -> None:
        error: BaseException | None = None
        try:
            asyncio.run(main())
        except asyncio.CancelledError:
            pass  # stopped while still connecting
        except BaseException as exc:  # handed to the caller, who decides
            error = exc

        def finish() -> None:
            if not done.done():
                if error is None:
                    done.set_result(None)
                else:
                    done.set_exception(error)

        with contextlib.suppress(RuntimeError):  # the caller's loop is gone: nothing to tell
            loop.call_soon_threadsafe(finish)

    # A daemon: a publish stuck on a server that is gone must not hold up the process's exit.
    threading.Thread(target=body, name="usage-feed", daemon=True).start()
    waiter = asyncio.ensure_future(stop.wait())
    try:
        await asyncio.wait([done, waiter], return_when=asyncio.FIRST_COMPLETED)
        if done.done():
            done.result()
            return
    finally:
        waiter.cancel()
        for other, local in inner:
            with contextlib.suppress(RuntimeError):
                other.call_soon_threadsafe(local.set)
    await done


async def _first(*events: asyncio.Event) -> None:
    waits = [asyncio.create_task(e.wait()) for e in events]
    try:
        await asyncio.wait(waits, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for w in waits:
            w.cancel()
