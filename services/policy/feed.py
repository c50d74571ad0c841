"""Keeping usage current: the usage feed (durable consumer) and the ledger as a fallback.

Events are folded strictly by ledger seq, so a redelivered or replayed message is a no-op
and a missing one is noticed. The feed is the fast path; a watcher polls the ledger head,
which both tells how fresh the state is (for `max_staleness`) and, when the feed falls
behind or has a gap, reads the missing events straight from `usage_events` (the same
events, in the same order), so enforcement never waits on a stalled feed.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

import asyncpg
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from pydantic import ValidationError

from contracts import PayloadError, parse_json
from contracts.usage import UsageRecorded, usage_stream, usage_wildcard
from infra.bus import durable_pull

from . import store
from .journal import UNAVAILABLE
from .live import LiveState
from .turns import Turns
from .usage import Applied, UsageEvent

log = logging.getLogger("tollgate.policy.feed")


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
        batch: int = 500,
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
            max_ack_pending=20_000,
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
        turns = Turns()  # a fetched batch is folded in slices: spawn checks get in between
        for i, msg in enumerate(msgs):
            await turns.take()
            try:
                event = event_of(UsageRecorded.model_validate(parse_json(msg.data)))
            except (PayloadError, ValidationError) as exc:
                log.error("usage feed: message %s on %s is not a usage event (%s); skipped",
                          msg.metadata.sequence.stream, msg.subject, exc)  # fmt: skip
                await msg.term()
                continue
            if self.live.apply([event]) is Applied.GAP:
                log.warning("usage feed: gap before ledger seq %d; reading the missing events "
                            "from the ledger", event.seq)  # fmt: skip
                with contextlib.suppress(*UNAVAILABLE, asyncpg.PostgresError):
                    await self.catch_up()
                if self.live.apply([event]) is Applied.GAP:
                    for later in msgs[i:]:
                        await later.nak(delay=0.5)
                    return
            await msg.ack()

    async def catch_up(self, limit: int = 5000) -> int:
        """Fold events the feed has not delivered, read from the ledger."""
        usage = self.live.usage
        if usage is None:
            return 0
        async with self.pool.acquire() as conn:
            events = await store.events_after(conn, usage.last_seq, limit)
        before = usage.last_seq
        await self.live.apply_in_slices(events)
        gained = usage.last_seq - before
        self.live.stats.bump("usage_catchup_events", gained)
        return gained

    async def watch(
        self, stop: asyncio.Event, interval: float = 0.25, patience: float = 1.0
    ) -> None:
        """Poll the ledger head: freshness for failure_mode, and catch-up when the feed lags."""
        behind_since: float | None = None
        failing = False
        while not stop.is_set():
            await _wait(stop, interval)
            usage = self.live.usage
            if usage is None:
                continue
            try:
                head = await store.head_seq(self.pool)
                if usage.last_seq < head:
                    behind_since = behind_since or time.monotonic()
                    if time.monotonic() - behind_since >= patience:
                        while await self.catch_up() and usage.last_seq < head:
                            pass
                else:
                    behind_since = None
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
