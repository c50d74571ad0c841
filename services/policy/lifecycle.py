"""Workload lifecycle: `workload_started` / `workload_stopped` from every host (SPEC 2.4).

Stored in `policy_workloads` together with the consumer's stream position, then acked,
so the running set survives restarts and a redelivered event changes nothing.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg
import nats.errors
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from pydantic import ValidationError

from contracts import PayloadError, parse_json
from contracts.workloads import (
    STARTED_SCHEMA,
    STOPPED_SCHEMA,
    WorkloadStarted,
    WorkloadStopped,
    workloads_stream,
    workloads_wildcard,
)
from tollgate.bus import durable_pull

from . import roster
from .journal import UNAVAILABLE
from .live import LiveState
from .workloads import Workload

log = logging.getLogger("tollgate.policy.workloads")


def parse_lifecycle(body: bytes) -> WorkloadStarted | WorkloadStopped:
    data = parse_json(body)
    schema = data.get("schema")
    if schema == STARTED_SCHEMA:
        return WorkloadStarted.model_validate(data)
    if schema == STOPPED_SCHEMA:
        return WorkloadStopped.model_validate(data)
    raise PayloadError(f"schema {schema!r} is not a workload lifecycle event")


class WorkloadFollower:
    """Keeps the live state's running workloads in step with the hosts."""

    def __init__(
        self,
        nc: Client,
        pool: asyncpg.Pool,
        live: LiveState,
        prefix: str,
        durable: str = "policy-workloads",
    ) -> None:
        self.js = nc.jetstream()
        self.pool = pool
        self.live = live
        self.prefix = prefix
        self.durable = durable
        self._sub: JetStreamContext.PullSubscription | None = None

    async def subscribe(self) -> None:
        self._sub = await durable_pull(
            self.js,
            stream=workloads_stream(self.prefix),
            subject=workloads_wildcard(self.prefix),
            durable=self.durable,
            ack_wait=30,
        )

    async def run(self, stop: asyncio.Event) -> None:
        backoff = 0.1
        while not stop.is_set():
            try:
                if self._sub is None:
                    await self.subscribe()
                assert self._sub is not None
                msgs: list[Msg] = await self._sub.fetch(200, timeout=0.5)
                for msg in msgs:
                    await self.handle(msg)
                backoff = 0.1
            except TimeoutError:
                continue
            except (nats.errors.Error, OSError, *UNAVAILABLE, asyncpg.PostgresError) as exc:
                log.warning(
                    "workload events: %s: %s; retrying in %.1fs", type(exc).__name__, exc, backoff
                )
                if isinstance(exc, nats.errors.Error | OSError):
                    self._sub = None
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), backoff)
                backoff = min(backoff * 2, 5.0)

    async def catch_up(self, wait: float = 0.2) -> int:
        """Apply the events waiting in the stream now (at start, before the first decision,
        so workloads that started while the policy was away are known when it acts)."""
        done = 0
        try:
            if self._sub is None:
                await self.subscribe()
            assert self._sub is not None
            while True:
                msgs = await self._sub.fetch(200, timeout=wait)
                for msg in msgs:
                    await self.handle(msg)
                done += len(msgs)
        except TimeoutError:
            return done
        except (nats.errors.Error, OSError) as exc:
            log.warning("workload events: cannot catch up now (%s); continuing", exc)
            self._sub = None
            return done

    async def handle(self, msg: Msg) -> None:
        try:
            event = parse_lifecycle(msg.data)
        except (PayloadError, ValidationError) as exc:
            log.error(
                "workload event %s on %s is not valid (%s); skipped",
                msg.metadata.sequence.stream,
                msg.subject,
                exc,
            )
            await msg.term()
            return
        async with self.pool.acquire() as conn:
            await roster.apply_workload_event(
                conn, self.durable, msg.metadata.sequence.stream, event
            )
        self.evolve(event)
        await msg.ack()

    def evolve(self, event: WorkloadStarted | WorkloadStopped) -> None:
        book = self.live.book
        if isinstance(event, WorkloadStarted):
            book.start(
                Workload(
                    event.workload, event.subject, event.host, event.started_at, tuple(event.groups)
                )
            )
            self.live.touch(event.subject)
            return
        gone = book.stop(event.workload, event.stopped_at)
        self.live.holds.release_workload(event.workload)
        subject = event.subject or (gone.subject if gone else None)
        if subject:
            self.live.touch(subject)
