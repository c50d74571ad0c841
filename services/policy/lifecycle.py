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
from contracts.dlq import DeadLetter, DeadLetterReason, host_of_subject, invalid
from contracts.errors import printable
from contracts.workloads import (
    STARTED_SCHEMA,
    STOPPED_SCHEMA,
    WorkloadStarted,
    WorkloadStopped,
    workloads_stream,
    workloads_wildcard,
)
from infra.bus import durable_pull
from infra.deadletters import file_dead_letter

from . import roster
from .journal import UNAVAILABLE
from .live import LiveState
from .workloads import Workload

log = logging.getLogger("tollgate.policy.workloads")


def parse_lifecycle(subject: str, body: bytes) -> WorkloadStarted | WorkloadStopped:
    """Validate one workload event; raise DeadLetter with the reason if it is unusable."""
    try:
        data = parse_json(body)
    except PayloadError as exc:
        raise DeadLetter(DeadLetterReason.INVALID_JSON, str(exc)) from None
    schema = data.get("schema")
    kind: type[WorkloadStarted | WorkloadStopped]
    if schema == STARTED_SCHEMA:
        kind = WorkloadStarted
    elif schema == STOPPED_SCHEMA:
        kind = WorkloadStopped
    else:
        raise DeadLetter(
            DeadLetterReason.UNKNOWN_SCHEMA,
            f"schema {schema!r} is not a workload lifecycle event "
            f"({STARTED_SCHEMA!r} or {STOPPED_SCHEMA!r})",
        )
    try:
        event = kind.model_validate(data)
    except ValidationError as exc:
        raise invalid(exc) from None
    subject_host = host_of_subject(subject)
    if event.host is not None and event.host != subject_host:
        raise DeadLetter(
            DeadLetterReason.HOST_MISMATCH,
            f"event host {event.host!r} was published on the subject of host "
            f"{subject_host!r}; a host may only report its own workloads",
        )
    return event


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
            event = parse_lifecycle(msg.subject, msg.data)
            self._check_owner(msg.subject, event)
        except DeadLetter as dead:
            log.error(
                "workload event %s on %s is a dead letter %s: %s",
                msg.metadata.sequence.stream,
                msg.subject,
                dead.reason.value,
                printable(dead.detail, 1000),
            )
            await file_dead_letter(
                self.js, msg, dead.reason, dead.detail, prefix=self.prefix, consumer=self.durable
            )
            return
        async with self.pool.acquire() as conn:
            await roster.apply_workload_event(
                conn, self.durable, msg.metadata.sequence.stream, event
            )
        self.evolve(event)
        await msg.ack()

    def _check_owner(self, subject: str, event: WorkloadStarted | WorkloadStopped) -> None:
        """Only the host a workload runs on may stop it (its `host` field is optional)."""
        if not isinstance(event, WorkloadStopped):
            return
        known = self.live.book.running.get(event.workload)
        host = host_of_subject(subject)
        if known is not None and known.host != host:
            raise DeadLetter(
                DeadLetterReason.HOST_MISMATCH,
                f"host {host!r} reported workload {event.workload!r} stopped, but it runs on "
                f"{known.host!r}; a host may only report its own workloads",
            )

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
