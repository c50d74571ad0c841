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
from nats.aio.msg import Msg
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig, DeliverPolicy

from contracts.commands import TerminateWorkload, commands_stream, terminate_subject
from contracts.notice import Notice, notice_subject
from infra.broker import Consume, consume_with

from .app import FETCH_BATCH, FETCH_WAIT, MeterChannels
from .publisher import MeterLink

log = logging.getLogger("tollgate.meter")
RETRY_PAUSE = 1.0
INACTIVE = 120.0
REMEMBERED = 1000
STOP_WAIT = 2.0

Handler = Callable[[TerminateWorkload], Awaitable[None]]
NoticeHandler = Callable[[Notice], Awaitable[None]]


class CommandListener:
    """Calls `handle` once for each termination command addressed to `host`.

    The consumer is a FastStream pull subscriber declared in `services.meter.app`, typed by
    the contract; this class starts it from the sequence it has reached, and again after an
    outage. Its fetch loop is our own (`consume_with`): messages are handled one at a time,
    in stream order, and a consumer the server lost (a NATS restart drops in-memory
    consumers) ends the loop so the consumer is made again, which FastStream's loop would
    retry forever.
    """

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
        self._lost: asyncio.Future[BaseException] | None = None
        self.subscriber = self._declare(link.channels, host, prefix)
        consume_with(self.subscriber, self._fetch)

    def _declare(self, channels: MeterChannels, host: str, prefix: str) -> Any:
        subscriber = channels.commands(host, prefix, self._config())

        @subscriber
        async def terminate(command: TerminateWorkload) -> None:
            await self._take(command, str(command.command_id))

        return subscriber

    async def run(self) -> None:
        """Listen until `stop`, through NATS outages."""
        while not self._stopped:
            nc = await self.link.connected(RETRY_PAUSE * 5)
            if nc is None:
                continue
            self._lost = asyncio.get_running_loop().create_future()
            try:
                # Unused consumers expire on the server (INACTIVE): nothing to delete by hand.
                self._restart_from_here()
                await self.link.broker.prepare(self.subscriber)
                await self.subscriber.start()
                self.ready.set()
                self._said = None
                raise await self._lost
            except (nats.errors.Error, OSError, TimeoutError) as exc:
                self._outage(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(RETRY_PAUSE)
            finally:
                with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
                    await self.subscriber.stop()

    async def stop(self, task: asyncio.Task[None]) -> None:
        """End `task` (running `run`), waiting a little at most.

        A flag as well as a cancellation: the client library may turn a cancellation into
        one of its own errors, which `run` would take for an outage and retry after.
        """
        self._stopped = True
        task.cancel()
        await asyncio.wait({task}, timeout=STOP_WAIT)

    def _config(self) -> ConsumerConfig:
        return ConsumerConfig(
            ack_policy=AckPolicy.EXPLICIT, inactive_threshold=INACTIVE, mem_storage=True
        )

    def _restart_from_here(self) -> None:
        config = self.subscriber.config
        config.name = None  # a new ephemeral consumer each time (nats-py names it)
        config.opt_start_seq = config.opt_start_time = None
        if self.next_seq is not None:
            config.deliver_policy = DeliverPolicy.BY_START_SEQUENCE
            config.opt_start_seq = self.next_seq
        elif self.since is not None:
            config.deliver_policy = DeliverPolicy.BY_START_TIME
            config.opt_start_time = self.since
        else:
            config.deliver_policy = DeliverPolicy.NEW

    async def _fetch(self, sub: JetStreamContext.PullSubscription, consume: Consume) -> None:
        lost = self._lost
        assert lost is not None
        try:
            while not self._stopped:
                try:
                    messages: list[Msg] = await sub.fetch(FETCH_BATCH, timeout=FETCH_WAIT)
                except nats.errors.TimeoutError:
                    continue
                for msg in messages:
                    self.next_seq = msg.metadata.sequence.stream + 1
                    await consume(msg)  # validated, handled, then acked (AckPolicy.ACK)
        except (nats.errors.Error, OSError, TimeoutError) as exc:
            if not lost.done():
                lost.set_result(exc)

    async def _take(self, command: Any, key: str) -> None:
        if key in self.seen:
            log.info("%s %s was already carried out; ignoring the repeat", self.what, key)
            return
        self.seen = [*self.seen[-REMEMBERED + 1 :], key]
        await self.handle(command)

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

    def _declare(self, channels: MeterChannels, host: str, prefix: str) -> Any:
        subscriber = channels.notices(host, prefix, self._config())

        @subscriber
        async def notice(notice: Notice) -> None:
            await self._take(notice, f"{type(notice).__name__}:{notice.notice_id}")

        return subscriber
