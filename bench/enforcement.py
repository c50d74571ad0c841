"""P4: from a crossing sample to the terminate command, by way of the ledger and the usage feed."""

from __future__ import annotations

import asyncio
import json
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime

from nats.aio.client import Client
from nats.aio.msg import Msg

from contracts.commands import TerminateWorkload, terminate_subject
from contracts.samples import samples_subject
from contracts.usage import usage_subject

from .load import Fleet
from .scenarios import P4_GROUP_SIZE, AckFloor


def mentions(data: bytes, workload: str) -> bool:
    """Whether a usage-feed message carries an event of `workload`: a per-event
    `tollgate.usage_recorded.v1` message or a `tollgate.usage_batch.v1` envelope."""
    body = json.loads(data)
    events = body.get("events")
    if isinstance(events, list):
        return any(e.get("workload") == workload for e in events)
    return bool(body.get("workload") == workload)


@dataclass
class Enforcement:
    """Per crossing: to the terminate command, and the stages on the way (seconds)."""

    total: list[float] = field(default_factory=list)
    committed: list[float] = field(default_factory=list)  # ledger ack floor passed the sample
    fed: list[float] = field(default_factory=list)  # its usage event on the usage feed

    def stages(self) -> str:
        def ms(xs: list[float]) -> str:
            return f"{1000 * sorted(xs)[len(xs) // 2]:.0f} ms"

        return (
            f"median stages from publish: committed {ms(self.committed)}, on the usage feed "
            f"{ms(self.fed)}, terminate command {ms(self.total)}"
        )


async def p4_enforcement(nc: Client, fleet: Fleet, trials: int, run: str) -> Enforcement:
    """From the publish of a crossing sample to the terminate command at the host's subject."""
    js = nc.jetstream()
    floor = AckFloor(nc, fleet.prefix)
    result = Enforcement()
    loop = asyncio.get_running_loop()
    warm = 3  # the first crossings meet cold caches (new subject, new host): not measured
    for i in range(-warm, trials):
        host, workload = f"p4-{run}-{i + warm}", f"p4-{run}-w{i + warm}"
        subject = f"enf{(i + warm) % P4_GROUP_SIZE}"
        arrived: asyncio.Future[tuple[float, bytes]] = loop.create_future()
        fed: asyncio.Future[float] = loop.create_future()

        async def on_command(msg: Msg, fut: asyncio.Future[tuple[float, bytes]] = arrived) -> None:
            if not fut.done():
                fut.set_result((time.perf_counter(), msg.data))

        async def on_usage(msg: Msg, fut: asyncio.Future[float] = fed, w: str = workload) -> None:
            if not fut.done() and mentions(msg.data, w):
                fut.set_result(time.perf_counter())

        subs = [
            await nc.subscribe(terminate_subject(host, fleet.prefix), cb=on_command),
            await nc.subscribe(usage_subject(subject, fleet.prefix), cb=on_usage),
        ]
        await nc.flush()
        body = json.dumps({
            "schema": "tollgate.counter_batch.v1", "host": host, "epoch": "p4", "seq": 1,
            "sampled_at": datetime.now(UTC).isoformat(),
            "counters": [{"subject": subject, "workload": workload,
                          "metric": "cpu.used.seconds", "value": 5}],
        }).encode()  # fmt: skip
        t0 = time.perf_counter()
        ack = await js.publish(samples_subject(host, fleet.prefix), body)
        try:
            # The ack floor has no event to wait on: poll it (a consumer-info round trip).
            while await floor.read() < ack.seq:  # noqa: ASYNC110
                await asyncio.sleep(0.002)
            committed = time.perf_counter() - t0
            t1, data = await asyncio.wait_for(arrived, 30)
            # The policy may act on usage it read from the ledger before the feed had it.
            fed_at = await asyncio.wait_for(fed, 30) - t0
        except TimeoutError:
            raise RuntimeError(
                f"no usage event or terminate command for {workload} on {host} within 30 s; "
                "see the ledger's and the policy's logs"
            ) from None
        finally:
            for sub in subs:
                await sub.unsubscribe()
        command = TerminateWorkload.model_validate_json(data)
        if command.workload != workload:
            raise RuntimeError(f"terminate command for {command.workload}, expected {workload}")
        if i >= 0:
            result.committed.append(committed)
            result.fed.append(fed_at)
            result.total.append(t1 - t0)
    return result
