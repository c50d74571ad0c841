"""The meter's side of NATS: spawn checks and publishing that never hold up the workload.

One FastStream broker per link (`infra.broker.TollgateBroker`), its publishers declared in
`services.meter.app`. The connection is made in the background and retried forever. While
NATS is away, publishes fail fast and are reported once per outage; samples are cumulative,
so the next batch that gets through carries everything.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from pathlib import Path

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from pydantic import ValidationError

from contracts._base import DEFAULT_PREFIX
from contracts.spawn import SpawnDecision, SpawnRequest, spawn_check_subject
from infra.broker import TollgateBroker

from .app import MeterChannels, unreadable_is_ignored
from .messages import Message, NoDecision

__all__ = ["Message", "MeterLink", "NoDecision"]

log = logging.getLogger("tollgate.meter")
PUBLISH_TIMEOUT = 2.0
RETRY_PAUSE = 0.25


class MeterLink:
    """One NATS connection for one `tollgate run`, made in the background."""

    def __init__(
        self, url: str, name: str, seed_file: Path | None = None, prefix: str = DEFAULT_PREFIX
    ) -> None:
        self.url = url
        self.broker = TollgateBroker(
            url, name=name, seed_file=seed_file, middlewares=[unreadable_is_ignored()]
        )
        self.channels = MeterChannels(self.broker, prefix)
        self._connecting: asyncio.Task[Client] | None = None
        self._outage: str | None = None
        self._outbox: list[Message] = []

    def start(self) -> None:
        """Begin connecting; nothing waits for it unless it asks to."""
        self._connecting = asyncio.create_task(self._connect())

    async def _connect(self) -> Client:
        # Connected, not started: publishers need no start, and each listener starts its
        # own subscriber (from the sequence it has reached) when it is ready to.
        await self.broker.connect()
        return self.broker.nc

    async def wait_connected(self, timeout: float) -> bool:
        """True once connected, False if that takes longer than `timeout` seconds."""
        if self._connecting is None:
            return False
        await asyncio.wait({self._connecting}, timeout=timeout)
        return self._client() is not None

    async def connected(self, timeout: float) -> Client | None:
        """The connection once it is up, or None if that takes longer than `timeout` seconds."""
        await self.wait_connected(timeout)
        nc = self._client()
        return nc if nc is not None and nc.is_connected else None

    async def spawn_decision(
        self, prefix: str, request: SpawnRequest, timeout: float
    ) -> SpawnDecision | NoDecision:
        """Ask the policy whether this workload may start."""
        subject = spawn_check_subject(prefix)
        publisher = self.channels.spawn_check
        started = time.monotonic()
        if not await self.wait_connected(timeout):
            return NoDecision(self._unreachable(f"did not answer within {timeout:g} s"))
        assert self._client() is not None
        remaining = max(timeout - (time.monotonic() - started), 0.1)
        try:
            reply = await publisher.request(request, subject=subject, timeout=remaining)
        except nats.errors.NoRespondersError:
            return NoDecision(f"nobody answers spawn checks on {subject} (is the policy running?)")
        except nats.errors.TimeoutError:
            return NoDecision(f"no spawn decision on {subject} within {timeout:g} s")
        except nats.errors.Error as exc:
            return NoDecision(f"spawn check on {subject} failed: {exc or type(exc).__name__}")
        try:
            return SpawnDecision.model_validate(await reply.decode())
        except ValidationError as exc:
            return NoDecision(f"the answer on {subject} is not a spawn decision: {exc}")

    def enqueue(self, message: Message) -> None:
        """Send `message` before the next batch, and keep trying until it goes."""
        self._outbox.append(message)

    def pending(self) -> list[Message]:
        """What was enqueued and not yet delivered, oldest first."""
        return list(self._outbox)

    async def deliver(self, batch: Message | None = None) -> bool:
        """Send queued messages, then `batch`; True when all of them were acknowledged."""
        while self._outbox:
            if not await self._publish(self._outbox[0]):
                return False
            self._outbox.pop(0)
        return batch is None or await self._publish(batch)

    async def deliver_until(self, batch: Message | None, deadline: float) -> bool:
        """Retry `deliver` (same message ids, so no duplicates) until the monotonic deadline.

        One attempt is always made, even when the deadline has already passed.
        """
        while True:
            if self._client() is None:
                await self.wait_connected(min(max(deadline - time.monotonic(), 0), 1.0))
            if await self.deliver(batch):
                return True
            left = deadline - time.monotonic()
            if left <= 0:
                return False
            await asyncio.sleep(min(RETRY_PAUSE, left))

    async def close(self) -> None:
        """Disconnect, or stop trying to connect."""
        task = self._connecting
        if task is None:
            return
        if not task.done():
            task.cancel()
            await asyncio.wait({task})
            return
        if self._client() is not None:
            with contextlib.suppress(nats.errors.Error, OSError, TimeoutError):
                await self.broker.stop()

    def _client(self) -> Client | None:
        task = self._connecting
        if task is None or not task.done() or task.cancelled() or task.exception() is not None:
            return None
        return task.result()

    def _unreachable(self, otherwise: str) -> str:
        task = self._connecting
        if task is not None and task.done() and not task.cancelled() and task.exception():
            return f"cannot connect to NATS at {self.url}: {task.exception()}"
        return f"NATS at {self.url} {otherwise}"

    async def _publish(self, message: Message) -> bool:
        nc = self._client()
        if nc is None or not nc.is_connected:
            # Buffering while reconnecting would only queue stale, superseded batches.
            self._failed(self._unreachable("is not reachable"))
            return False
        publisher, stream = self.channels.publisher_for(message.subject)
        try:
            await publisher.publish(
                message.payload,
                subject=message.subject,
                stream=stream,
                headers={"Nats-Msg-Id": message.msg_id},
                timeout=PUBLISH_TIMEOUT,
            )
        except (nats.errors.NoRespondersError, nats.js.errors.NoStreamResponseError):
            self._failed(
                f"no JetStream stream takes {message.subject}; start the stack with "
                "`tollgate up`, which creates the streams"
            )
            return False
        except (nats.errors.Error, TimeoutError, OSError) as exc:
            _cancelled_inside()
            self._failed(f"publishing to {message.subject} failed: {exc or type(exc).__name__}")
            return False
        if self._outage is not None:
            log.warning("usage reporting to NATS works again; the next batch catches up")
            self._outage = None
        return True

    def _failed(self, why: str) -> None:
        if self._outage is None:
            log.warning(
                "cannot report usage (%s); the workload keeps running and usage is sent "
                "when NATS is back",
                why,
            )
        self._outage = why


def _cancelled_inside() -> None:
    # nats-py turns a cancellation that reaches it while waiting for its publish semaphore
    # into an error of its own; a caller that was cancelled must still see CancelledError.
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError
