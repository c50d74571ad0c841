"""Keeping usage current: the usage feed (durable consumer) and the ledger as a fallback.

The feed's messages are `tollgate.usage_batch.v1` envelopes, each a contiguous range of
ledger seqs of one subject (a per-event `tollgate.usage_recorded.v1`, as published before
issue 13, is read too). Events are folded strictly by ledger seq, so a redelivered or
replayed message is a no-op and a missing one is noticed; a large envelope is folded in
slices with the event loop handed back in between, so spawn checks never wait on it.

The feed is the fast path; a watcher polls the ledger head,
which both tells how fresh the state is (for `max_staleness`) and, when the feed falls
behind or has a gap, reads the missing events straight from `usage_events` (the same
events, in the same order), so enforcement never waits on a stalled feed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from datetime import datetime
from decimal import Decimal
from typing import Annotated

import asyncpg
import msgspec
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy

from contracts.usage import BATCH_SCHEMA, SCHEMA, UsageRecorded, usage_stream, usage_wildcard
from infra.bus import durable_pull

from . import store
from .journal import UNAVAILABLE
from .live import LiveState
from .usage import Applied, UsageEvent

log = logging.getLogger("tollgate.policy.feed")


# Events folded between two turns of the event loop (a spawn check waits at most this many).
FOLD_SLICE = 256

Seq = Annotated[int, msgspec.Meta(ge=1)]
Instant = Annotated[datetime, msgspec.Meta(tz=True)]  # a time without a zone is refused


class _Event(msgspec.Struct, frozen=True):
    """What the policy reads of an envelope's event (unknown fields are ignored)."""

    seq: Seq
    host: str
    workload: str
    metric: str
    delta: Decimal  # exact: decoded from the decimal text
    window_end: Instant
    labels: dict[str, str] = {}


class _Envelope(msgspec.Struct, frozen=True, tag_field="schema", tag=BATCH_SCHEMA):
    subject: str
    first_seq: Seq
    last_seq: Seq
    events: list[_Event]


class _Recorded(msgspec.Struct, frozen=True, tag_field="schema", tag=SCHEMA):
    """A per-event message, as the feed carried before envelopes."""

    seq: Seq
    subject: str
    host: str
    workload: str
    metric: str
    delta: Decimal  # exact: decoded from the decimal text
    window_end: Instant
    labels: dict[str, str] = {}


_DECODER = msgspec.json.Decoder(_Envelope | _Recorded)


class NotUsage(ValueError):
    """A feed message that is not a usage envelope (or event) this policy can fold."""


def decode_envelope(body: bytes) -> list[UsageEvent]:
    """The events of one feed message in seq order; NotUsage if it is not one."""
    try:
        msg = _DECODER.decode(body)
    except msgspec.DecodeError as exc:  # bad JSON, a wrong type, an unknown schema
        raise NotUsage(str(exc)) from None
    if isinstance(msg, _Recorded):
        if msg.delta < 0 or not msg.delta.is_finite():
            raise NotUsage(f"event {msg.seq} has a negative delta")
        return [
            UsageEvent(msg.seq, msg.subject, msg.workload, msg.host, msg.metric, msg.delta,
                       msg.window_end, msg.labels.get("gpu_model", ""))
        ]  # fmt: skip
    subject, first = msg.subject, msg.first_seq
    events = msg.events
    if not events or msg.last_seq - first + 1 != len(events):
        raise NotUsage(f"{len(events)} events do not cover seqs {first}..{msg.last_seq}")
    out = []
    for i, e in enumerate(events):
        if e.seq != first + i:
            raise NotUsage(f"event {i} has seq {e.seq}, expected {first + i}")
        if e.delta < 0 or not e.delta.is_finite():
            raise NotUsage(f"event {e.seq} has delta {e.delta}, not a usage amount")
        out.append(
            UsageEvent(e.seq, subject, e.workload, e.host, e.metric, e.delta, e.window_end,
                       e.labels.get("gpu_model", ""))
        )  # fmt: skip
    return out


def event_of(msg: UsageRecorded) -> UsageEvent:
    return UsageEvent(
        msg.seq, msg.subject, msg.workload, msg.host, msg.metric, msg.delta, msg.window_end,
        msg.labels.get("gpu_model", ""),
    )  # fmt: skip


class UsageFollower:
    """Folds the usage feed into the live state, and fills gaps from the ledger."""

    def __init__(
        self,
        nc: Client,
        pool: asyncpg.Pool,
        live: LiveState,
        prefix: str,
        durable: str = "policy",
        batch: int = 32,  # envelopes (of up to 1000 events each) per fetch
    ) -> None:
        self.js = nc.jetstream()
        self.pool = pool
        self.live = live
        self.prefix = prefix
        self.durable = durable
        self.batch = batch
        self._sub: JetStreamContext.PullSubscription | None = None

    async def subscribe(self) -> None:
        # NEW on first creation: the snapshot covers the past, and the ledger fills any gap.
        self._sub = await durable_pull(
            self.js,
            stream=usage_stream(self.prefix),
            subject=usage_wildcard(self.prefix),
            durable=self.durable,
            deliver_policy=DeliverPolicy.NEW,
            ack_wait=30,
            max_ack_pending=1000,
        )

    async def ensure_subscribed(self) -> None:
        """Bind the consumer now if NATS is there; otherwise `run` keeps trying."""
        try:
            if self._sub is None:
                await self.subscribe()
        except (nats.errors.Error, OSError) as exc:
            log.warning("usage feed: cannot subscribe yet (%s); the ledger fills in", exc)

    async def run(self, stop: asyncio.Event) -> None:
        backoff = 0.1
        while not stop.is_set():
            if not self.live.ready:
                await _wait(stop, 0.05)
                continue
            try:
                if self._sub is None:
                    await self.subscribe()
                assert self._sub is not None
                msgs: list[Msg] = await self._sub.fetch(self.batch, timeout=0.5)
            except TimeoutError:
                continue
            except (nats.errors.Error, OSError) as exc:
                log.warning(
                    "usage feed: cannot fetch (%s: %s); retrying in %.1fs",
                    type(exc).__name__,
                    exc,
                    backoff,
                )
                self._sub = None
                await _wait(stop, backoff)
                backoff = min(backoff * 2, 5.0)
                continue
            backoff = 0.1
            await self.handle(msgs)

    async def handle(self, msgs: list[Msg]) -> None:
        """Fold a fetched batch in order and ack it; what sits beyond a gap the ledger cannot
        fill yet goes back, to be redelivered shortly (each message is acked on its own, so
        a later ack never covers one handed back)."""
        for i, msg in enumerate(msgs):
            try:
                events = decode_envelope(msg.data)
            except NotUsage as exc:
                log.error("usage feed: message %s on %s is not a usage envelope (%s); skipped",
                          msg.metadata.sequence.stream, msg.subject, exc)  # fmt: skip
                await msg.term()
                continue
            if not await self._fold(events):
                for later in msgs[i:]:
                    await later.nak(delay=0.5)
                return
            await msg.ack()

    async def _fold(self, events: list[UsageEvent]) -> bool:
        """Fold one message's events in slices; False if a gap before them cannot be filled."""
        for start in range(0, len(events), FOLD_SLICE):
            if start:
                await asyncio.sleep(0)  # spawn checks answer between slices
            piece = events[start : start + FOLD_SLICE]
            if self.live.apply(piece) is not Applied.GAP:
                continue
            log.warning("usage feed: gap before ledger seq %d; reading the missing events "
                        "from the ledger", piece[0].seq)  # fmt: skip
            with contextlib.suppress(*UNAVAILABLE, asyncpg.PostgresError):
                await self.catch_up()
            if self.live.apply(piece) is Applied.GAP:
                return False
        return True

    async def catch_up(self, limit: int = 5000) -> int:
        """Fold events the feed has not delivered, read from the ledger."""
        usage = self.live.usage
        if usage is None:
            return 0
        async with self.pool.acquire() as conn:
            events = await store.events_after(conn, usage.last_seq, limit)
        before = usage.last_seq
        self.live.apply(events)
        gained = usage.last_seq - before
        self.live.stats.bump("usage_catchup_events", gained)
        return gained

    async def watch(
        self, stop: asyncio.Event, interval: float = 0.25, patience: float = 1.0
    ) -> None:
        """Poll the ledger head: freshness for failure_mode, and catch-up when the feed lags."""
        # The oldest head seen that the state does not hold yet, and when it was seen: the
        # feed lags when an event the ledger had `patience` ago is still not folded (under
        # steady ingest the state is rarely level with the head, yet not behind).
        behind: tuple[float, int] | None = None
        failing = False
        while not stop.is_set():
            await _wait(stop, interval)
            usage = self.live.usage
            if usage is None:
                continue
            try:
                head = await store.head_seq(self.pool)
                if behind is not None and usage.last_seq >= behind[1]:
                    behind = None
                if usage.last_seq < head:
                    behind = behind or (time.monotonic(), head)
                    if time.monotonic() - behind[0] >= patience:
                        while await self.catch_up() and usage.last_seq < head:
                            pass
                        behind = None
                self.live.confirm_head(head, self.live.clock())
                if failing:
                    log.info("ledger head readable again (seq %d)", head)
                failing = False
            except (*UNAVAILABLE, asyncpg.PostgresError) as exc:
                if not failing:
                    log.warning(
                        "cannot read the ledger head (%s: %s); usage freshness unknown",
                        type(exc).__name__,
                        exc,
                    )
                failing = True


async def _wait(event: asyncio.Event, seconds: float) -> None:
    with contextlib.suppress(TimeoutError):
        await asyncio.wait_for(event.wait(), seconds)
