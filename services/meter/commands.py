"""Termination commands for this host: read from the commands stream, in order, each once.

The consumer is ours alone: an ephemeral pull consumer on the commands stream, filtered to
`tollgate.v1.commands.terminate.<host>`, that starts at the stream sequence after the last
command we handled (kept by the caller, e.g. in the agent's state directory) or at a start
time. When NATS goes away it is made again from that sequence, so commands published while
we were briefly offline still arrive, and nothing server-side outlives us for long
(`inactive_threshold`). Commands are deduplicated by `command_id`: the policy may repeat one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Any

import nats.errors
import nats.js
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy
from pydantic import ValidationError

from contracts._base import PayloadError, parse_json
from contracts.commands import TerminateWorkload, commands_stream, terminate_subject
from contracts.notice import (
    Notice,
    TerminationCancelled,
    TerminationScheduled,
    notice_subject,
)

from .publisher import MeterLink

log = logging.getLogger("tollgate.meter")
FETCH_WAIT = 1.0
RETRY_PAUSE = 1.0
INACTIVE = 120.0
REMEMBERED = 1000
STOP_WAIT = 2.0

Handler = Callable[[TerminateWorkload], Awaitable[None]]
NoticeHandler = Callable[[Notice], Awaitable[None]]


class CommandListener:
    """Calls `handle` once for each termination command addressed to `host`."""

    def __init__(
        self,
        link: MeterLink,
        prefix: str,
        host: str,
        handle: Handler,
        next_seq: int | None = None,
        since: datetime | None = None,
        seen: list[str] | None = None,
    ) -> None:
        self.link = link
        self.subject = terminate_subject(host, prefix)
        self.stream = commands_stream(prefix)
        self.handle: Callable[[Any], Awaitable[None]] = handle
        self.what = "termination command"
        self.next_seq = next_seq
        self.since = since
        self.seen: list[str] = list(seen or [])[-REMEMBERED:]
        self.ready = asyncio.Event()  # set once the consumer exists: tests wait on it
        self._said: str | None = None
        self._stopped = False

    async def run(self) -> None:
        """Listen until `stop`, through NATS outages."""
        while not self._stopped:
            nc = await self.link.connected(RETRY_PAUSE * 5)
            if nc is None:
                continue
            sub = None
            try:
                # Unused consumers expire on the server (INACTIVE): nothing to delete by hand.
                sub = await nc.jetstream().pull_subscribe(
                    self.subject, stream=self.stream, config=self._config()
                )
                self.ready.set()
                self._said = None
                await self._drain(sub)
            except (nats.errors.Error, OSError, TimeoutError) as exc:
                self._outage(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(RETRY_PAUSE)
            finally:
                if sub is not None:
                    with contextlib.suppress(nats.errors.Error):
                        await sub.unsubscribe()

    async def stop(self, task: asyncio.Task[None]) -> None:
        """End `task` (running `run`), waiting a little at most.

        A flag as well as a cancellation: the client library may turn a cancellation into
        one of its own errors, which `run` would take for an outage and retry after.
        """
        self._stopped = True
        task.cancel()
        await asyncio.wait({task}, timeout=STOP_WAIT)

    def _config(self) -> ConsumerConfig:
        config = ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT, inactive_threshold=INACTIVE, mem_storage=True
        )
        if self.next_seq is not None:
            config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = self.next_seq
        elif self.since is not None:
            config.deliver_policy = DeliverPolicy.BY_START_TIME
            config.opt_start_time = self.since
        else:
            config.deliver_policy = DeliverPolicy.NEW
        return config

    async def _drain(self, sub: nats.js.JetStreamContext.PullSubscription) -> None:
        while not self._stopped:
            try:
                messages = await sub.fetch(16, timeout=FETCH_WAIT)
            except nats.errors.TimeoutError:
                continue
            for msg in messages:
                await self._one(msg.data, msg.metadata.sequence.stream)
                with contextlib.suppress(nats.errors.Error):
                    await msg.ack()

    async def _one(self, data: bytes, stream_seq: int) -> None:
        self.next_seq = stream_seq + 1
        try:
            command = self._parse(data)
        except (PayloadError, ValidationError) as exc:
            log.error("ignoring a message on %s that is not a %s: %s", self.subject, self.what, exc)
            return
        key = self._key(command)
        if key in self.seen:
            log.info("%s %s was already carried out; ignoring the repeat", self.what, key)
            return
        self.seen = [*self.seen[-REMEMBERED + 1 :], key]
        await self.handle(command)

    def _parse(self, data: bytes) -> Any:
        return TerminateWorkload.model_validate(parse_json(data))

    def _key(self, command: Any) -> str:
        return str(command.command_id)

    def _outage(self, why: str) -> None:
        if self._said is None:
            log.warning(
                "cannot read %ss from %s (%s); retrying, and none "
                "published meanwhile will be missed",
                self.what,
                self.stream,
                why,
            )
        self._said = why


class NoticeListener(CommandListener):
    """Calls `handle` once for each notice (scheduled or cancelled termination) to `host`.

    A consumer of its own on `tollgate.v1.commands.notice.<host>`, so a host's NATS
    permissions name each subject it may read (see `tollgate nats-config`).
    """

    def __init__(
        self,
        link: MeterLink,
        prefix: str,
        host: str,
        handle: NoticeHandler,
        since: datetime | None = None,
    ) -> None:
        super().__init__(link, prefix, host, handle, since=since)  # type: ignore[arg-type]
        self.subject = notice_subject(host, prefix)
        self.what = "termination notice"

    def _parse(self, data: bytes) -> Notice:
        raw = parse_json(data)
        if (
            isinstance(raw, dict)
            and raw.get("schema") == TerminationCancelled.model_fields["schema_"].default
        ):
            return TerminationCancelled.model_validate(raw)
        return TerminationScheduled.model_validate(raw)

    def _key(self, command: Any) -> str:
        return f"{type(command).__name__}:{command.notice_id}"
