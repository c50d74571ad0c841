"""Traffic the harness makes: realistic sample batches, paced and windowed publishing."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from nats.js import JetStreamContext

from contracts.samples import samples_subject

METRICS = ("cpu.used.seconds", "net.tx.wan.bytes", "log.bytes", "mem.used.byte_seconds")


@dataclass
class Fleet:
    """`hosts` hosts, each publishing all its `series` counters in one message per round."""

    hosts: int = 50
    series: int = 100
    subjects: int = 20
    prefix: str = "tollgate"
    epoch: str = "bench"
    start: datetime = field(default_factory=lambda: datetime.now(UTC) - timedelta(hours=3))
    round: int = 0
    _templates: dict[int, str] = field(default_factory=dict, repr=False)

    def subject_names(self) -> list[str]:
        return [f"user{i}" for i in range(self.subjects)]

    def body(self, host: int, seq: int) -> bytes:
        """Cumulative values that grow every round: every reading is a usage event."""
        at = (self.start + timedelta(seconds=10 * seq)).isoformat()
        template = self._templates.get(host)
        if template is None:
            template = self._templates[host] = self._template(host)
        values = [seq * (i + 1) for i in range(self.series)]
        # JSON by string formatting: the harness must not eat the CPU the ledger needs.
        return template.format(seq=seq, at=at, v=values).encode()

    def _template(self, host: int) -> str:
        counters = []
        for i in range(self.series):
            kind = i % 4
            # Byte counters are integers; the others JSON numbers with a fraction, as meters send.
            value = f"{{v[{i}]}}" if kind in (1, 2) else f"{{v[{i}]}}.25"
            subject = f"user{(host * 7 + i) % self.subjects}"
            counters.append(
                f'{{{{"subject": "{subject}", "workload": "node{host}-w{i // 4}", '
                f'"metric": "{METRICS[kind]}", "value": {value}}}}}'
            )
        return (
            f'{{{{"schema": "tollgate.counter_batch.v1", "host": "node{host}", '
            f'"epoch": "{self.epoch}", "seq": {{seq}}, "sampled_at": "{{at}}", '
            f'"counters": [{", ".join(counters)}]}}}}'
        )

    def messages(self) -> list[tuple[str, bytes, dict[str, str]]]:
        """The next round: one message per host."""
        self.round += 1
        r = self.round
        return [
            (
                samples_subject(f"node{h}", self.prefix),
                self.body(h, r),
                {"Nats-Msg-Id": f"node{h}:{self.epoch}:{r}"},
            )
            for h in range(self.hosts)
        ]


class Window:
    """At most `size` publishes awaiting their JetStream ack at once."""

    def __init__(self, js: JetStreamContext, size: int) -> None:
        self.js = js
        self.slots = asyncio.Semaphore(size)
        self.tasks: set[asyncio.Task[None]] = set()
        self.error: BaseException | None = None

    async def publish(
        self, subject: str, body: bytes, headers: dict[str, str] | None = None,
        on_ack: Callable[[int, float], None] | None = None,
    ) -> None:  # fmt: skip
        await self.slots.acquire()
        if self.error is not None:
            raise self.error

        async def one() -> None:
            try:
                ack = await self.js.publish(subject, body, headers=headers, timeout=30)
                if on_ack is not None:
                    on_ack(ack.seq, time.perf_counter())
            except BaseException as exc:  # surfaced on the next publish or at drain()
                self.error = exc
            finally:
                self.slots.release()

        task = asyncio.create_task(one())
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)

    async def drain(self) -> None:
        while self.tasks:
            await asyncio.gather(*list(self.tasks))
        if self.error is not None:
            raise self.error


async def paced(
    rate: float,
    seconds: float,
    fn: Callable[[], Awaitable[None]],
    stop: asyncio.Event | None = None,
) -> int:
    """Start fn() `rate` times a second for `seconds` (open loop: late calls don't slow it)."""
    loop = asyncio.get_running_loop()
    t0 = loop.time()
    tasks: set[asyncio.Task[None]] = set()
    errors: list[BaseException] = []
    n = 0
    while loop.time() - t0 < seconds and not (stop and stop.is_set()):
        due = t0 + n / rate
        delay = due - loop.time()
        if delay > 0:
            await asyncio.sleep(delay)
        task = asyncio.create_task(fn())
        tasks.add(task)

        def done(t: asyncio.Task[None]) -> None:
            tasks.discard(t)
            if not t.cancelled() and t.exception() is not None:
                errors.append(t.exception())  # type: ignore[arg-type]

        task.add_done_callback(done)
        n += 1
        if errors:
            raise errors[0]
    if tasks:
        await asyncio.gather(*tasks)
    return n


async def timed(
    fn: Callable[[], Awaitable[object]], into: list[float], limit: asyncio.Semaphore | None = None
) -> None:
    """Time fn() from now, the moment it was due: waiting for a free slot under `limit`
    counts, so a slow server shows as latency instead of as fewer requests."""
    t0 = time.perf_counter()
    if limit is None:
        await fn()
    else:
        async with limit:
            await fn()
    into.append(time.perf_counter() - t0)
