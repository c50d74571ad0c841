"""P1 to P4: the running system (ledger, policy, api as real processes) under load."""

from __future__ import annotations

import asyncio
import contextlib
import time
from dataclasses import dataclass, field
from decimal import Decimal

from nats.aio.client import Client
from nats.aio.msg import Msg
from rich.progress import Progress

from contracts.samples import samples_stream
from contracts.spawn import SpawnDecision, SpawnRequest, spawn_check_subject
from contracts.workloads import Resources

from .http import KeepAlivePool
from .load import Fleet, Window, paced, timed
from .stack import ADMIN, CpuMeter, Service, machine_busy, machine_busy_start

P4_GROUP_SIZE = 10
CONFIG = """
groups:
  regular: [{users}]
  enforced: [{enforced}]
quotas:
  - {{name: memory-30d, metric: mem.used.byte_seconds, limit: 1000000000 GiB*h,
     window: {{rolling: 30d}}, applies_to: {{groups: [regular]}}, enforce: [spawn, terminate],
     warn_at: [0.8, 0.95]}}
  - {{name: cpu-30d, metric: cpu.used.seconds, limit: 1000000000 core*h,
     window: {{rolling: 30d}}, applies_to: {{groups: [regular]}}, enforce: [spawn]}}
  - {{name: egress-month, metric: net.tx.wan.bytes, limit: 1000 PB,
     window: {{calendar: month, tz: Europe/Berlin}}, applies_to: {{groups: [regular]}},
     enforce: [spawn]}}
  - {{name: log-per-workload-hour, metric: log.bytes, limit: 50 GB,
     window: {{workload_hour: true}}, per: workload, applies_to: {{groups: [regular]}},
     enforce: [terminate]}}
  - {{name: p4-burst, metric: cpu.used.seconds, limit: 1 core*s, window: {{lifetime: true}},
     applies_to: {{groups: [enforced]}}, per: workload, enforce: [terminate],
     termination: {{reason: compute_quota_exceeded, grace_seconds: 0}}}}
"""


def quota_config(fleet: Fleet) -> str:
    enforced = ", ".join(f"enf{i}" for i in range(P4_GROUP_SIZE))
    return CONFIG.format(users=", ".join(fleet.subject_names()), enforced=enforced)


class AckFloor:
    """The ledger consumer's ack floor, polled: a sample is committed once it is below it."""

    def __init__(self, nc: Client, prefix: str, consumer: str = "ledger") -> None:
        self.js = nc.jetstream()
        self.stream = samples_stream(prefix)
        self.consumer = consumer
        self.seq = 0

    async def read(self) -> int:
        info = await self.js.consumer_info(self.stream, self.consumer)
        self.seq = info.ack_floor.stream_seq if info.ack_floor else 0
        return self.seq

    async def wait_for(self, seq: int, timeout: float = 300) -> None:
        deadline = time.monotonic() + timeout
        while await self.read() < seq:
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"the ledger acked up to stream seq {self.seq}, not {seq}, in {timeout:.0f}"
                    " s; see the ledger's log"
                )
            await asyncio.sleep(0.05)


async def stream_last_seq(nc: Client, prefix: str) -> int:
    info = await nc.jetstream().stream_info(samples_stream(prefix))
    return int(info.state.last_seq)


async def sample_services(services: list[Service], stop: asyncio.Event) -> None:
    """Peak RSS of every service, twice a second, until `stop`."""
    while not stop.is_set():
        for s in services:
            s.sample()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(stop.wait(), 0.5)


@dataclass
class IngestResult:
    points_per_s: float
    msgs_per_s: float
    seconds: float
    messages: int
    cpu: dict[str, float] = field(default_factory=dict)


async def p1_ingest(
    nc: Client, fleet: Fleet, services: list[Service], progress: Progress, *,
    seconds: float, warmup: float, meters: dict[str, CpuMeter], backlog: int = 3000,
) -> IngestResult:  # fmt: skip
    """Publish as fast as the ledger commits (bounded backlog); count points acked per second."""
    floor = AckFloor(nc, fleet.prefix)
    pub = Window(nc.jetstream(), 128)
    base = await stream_last_seq(nc, fleet.prefix)
    published = 0
    stop_pub = asyncio.Event()

    async def publisher() -> None:
        nonlocal published
        while not stop_pub.is_set():
            if published - (floor.seq - base) > backlog:
                await asyncio.sleep(0.02)
                continue
            for subject, body, headers in fleet.messages():
                await pub.publish(subject, body, headers)
                published += 1
        await pub.drain()

    async def poller() -> None:
        while not stop_pub.is_set():
            await floor.read()
            await asyncio.sleep(0.1)

    tasks = [asyncio.create_task(publisher()), asyncio.create_task(poller())]
    task = progress.add_task("P1 warm-up (series created)", total=warmup)
    t0 = time.perf_counter()
    while (elapsed := time.perf_counter() - t0) < warmup:
        progress.update(task, completed=elapsed)
        await asyncio.sleep(0.25)
    progress.update(task, completed=warmup)
    stop_rss = asyncio.Event()
    sampler = asyncio.create_task(sample_services(services, stop_rss))
    for s in services:
        s.cpu_start()
    for m in meters.values():
        m.start()
    machine_busy_start()
    first = await floor.read()
    t_first = time.perf_counter()
    task = progress.add_task("P1 sustained ingest", total=seconds)
    while (elapsed := time.perf_counter() - t_first) < seconds:
        progress.update(task, completed=elapsed)
        for t in tasks:
            if t.done():
                t.result()  # a publisher error ends the run with its cause
        await asyncio.sleep(0.25)
    last = await floor.read()
    elapsed = time.perf_counter() - t_first
    cpu = {s.name: s.cpu_share() for s in services}
    cpu |= {name: m.cores() for name, m in meters.items()}
    cpu["machine"] = machine_busy()
    progress.update(task, completed=seconds)
    stop_pub.set()
    await asyncio.gather(*tasks)
    stop_rss.set()
    await sampler
    await floor.wait_for(base + published)  # the next phase starts with no backlog
    messages = last - first
    return IngestResult(
        messages * fleet.series / elapsed, messages / elapsed, elapsed, messages, cpu
    )


@dataclass
class HalfRateResult:
    lags: list[float]
    nats_checks: list[float]
    http_checks: list[float]
    denied: int
    rate: float
    check_rate: float


async def half_rate(
    nc: Client, checks_nc: Client, fleet: Fleet, api_url: str, progress: Progress, *,
    msgs_per_s: float, seconds: float, check_rate: float,
) -> HalfRateResult:  # fmt: skip
    """Samples at half P1's rate throughout: for `seconds` P2 (each sample's lag to its
    commit), then P3, spawn checks at `check_rate` over NATS and then over HTTP, each for
    `seconds`. P2 runs without spawn checks, so each figure has only its own load."""
    floor = AckFloor(nc, fleet.prefix)
    await floor.read()
    pub = Window(nc.jetstream(), 64)
    acked_at: dict[int, float] = {}
    lags: list[float] = []
    queue: list[tuple[str, bytes, dict[str, str]]] = []
    stop = asyncio.Event()

    lag_window = True

    def on_ack(seq: int, t: float) -> None:
        if not lag_window:
            return
        if seq <= floor.seq:
            lags.append(0.0)  # committed before its publish ack reached us
        else:
            acked_at[seq] = t

    async def publish_one() -> None:
        if not queue:
            queue.extend(reversed(fleet.messages()))
        subject, body, headers = queue.pop()
        await pub.publish(subject, body, headers, on_ack=on_ack)

    async def poller() -> None:
        # Every 10 ms: the lag is exact to within one poll plus one consumer-info round trip.
        while (lag_window and not stop.is_set()) or acked_at:
            seq = await floor.read()
            now = time.perf_counter()
            for s in [s for s in acked_at if s <= seq]:
                lags.append(now - acked_at.pop(s))
            await asyncio.sleep(0.01)

    polling = asyncio.create_task(poller())
    subjects = fleet.subject_names()
    denied = 0
    n = 0

    def request() -> bytes:
        nonlocal n
        n += 1
        return SpawnRequest(
            subject=subjects[n % len(subjects)], workload=f"bench-spawn-{n}",
            resources=Resources(cpus=Decimal(2), mem_bytes=4 * 2**30), expected_seconds=60,
        ).to_json()  # fmt: skip

    nats_lat: list[float] = []
    http_lat: list[float] = []
    # At most this many requests in flight; the rest wait, and their wait is measured.
    in_flight = asyncio.Semaphore(32)

    async def over_nats() -> None:
        nonlocal denied
        body = request()
        replies: list[Msg] = []

        async def ask() -> None:
            replies.append(await checks_nc.request(spawn_check_subject(fleet.prefix), body, 10))

        await timed(ask, nats_lat, in_flight)
        denied += not SpawnDecision.model_validate_json(replies[0].data).allowed

    host, port = api_url.removeprefix("http://").rsplit(":", 1)
    http = await KeepAlivePool(host, int(port), 32, {"Authorization": f"Bearer {ADMIN}"}).open()
    try:

        async def over_http() -> None:
            nonlocal denied
            body = request()
            replies: list[tuple[int, bytes]] = []

            async def ask() -> None:
                replies.append(await http.post("/v1/spawn-checks", body))

            await timed(ask, http_lat, in_flight)
            status, data = replies[0]
            if status != 200:
                raise RuntimeError(f"POST /v1/spawn-checks answered {status}: {data[:300]!r}")
            denied += not SpawnDecision.model_validate_json(data).allowed

        for _ in range(50):  # warm both paths (connections, caches) before measuring
            await over_nats()
            await over_http()
        nats_lat.clear()
        http_lat.clear()
        task = progress.add_task("P2 lag, P3 spawn checks (half-rate ingest)", total=3)
        ingest = asyncio.create_task(paced(msgs_per_s, 3 * seconds, publish_one))
        await asyncio.sleep(seconds)  # P2: the samples' lags are recorded meanwhile
        lag_window = False
        progress.update(task, completed=1)
        await paced(check_rate, seconds, over_nats)
        progress.update(task, completed=2)
        await paced(check_rate, seconds, over_http)
        progress.update(task, completed=3)
        await ingest
    finally:
        await http.close()
    await pub.drain()
    stop.set()
    await asyncio.wait_for(polling, 120)
    return HalfRateResult(lags, nats_lat, http_lat, denied, msgs_per_s, check_rate)
