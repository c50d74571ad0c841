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

from .feedlag import LEVEL_WAIT, FeedLag, FeedWatch, summarize
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
    feed: FeedLag | None = None


async def p1_ingest(
    nc: Client, fleet: Fleet, services: list[Service], progress: Progress, *,
    seconds: float, warmup: float, meters: dict[str, CpuMeter], backlog: int = 3000,
    feed: FeedWatch | None = None,
) -> IngestResult:  # fmt: skip
    """Publish as fast as the ledger commits (bounded backlog); count points acked per second.

    With `feed`, the usage feed is sampled against the ledger head throughout (every
    100 ms), once more when the ledger has committed everything published, and then until
    the feed has caught up (at most LEVEL_WAIT s).
    """
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
    feed_first = await feed.start() if feed is not None else None
    task = progress.add_task("P1 sustained ingest", total=seconds)
    while (elapsed := time.perf_counter() - t_first) < seconds:
        progress.update(task, completed=elapsed)
        for t in tasks:
            if t.done():
                t.result()  # a publisher error ends the run with its cause
        await asyncio.sleep(0.25)
    last = await floor.read()
    elapsed = time.perf_counter() - t_first
    feed_last = await feed.stop() if feed is not None else None
    cpu = {s.name: s.cpu_share() for s in services}
    cpu |= {name: m.cores() for name, m in meters.items()}
    cpu["machine"] = machine_busy()
    progress.update(task, completed=seconds)
    stop_pub.set()
    await asyncio.gather(*tasks)
    stop_rss.set()
    await sampler
    await floor.wait_for(base + published)  # the next phase starts with no backlog
    lag = None
    if feed is not None and feed_first is not None and feed_last is not None:
        after = await feed.once()
        level, level_seconds = await feed.until_level(LEVEL_WAIT)
        lag = summarize(feed.samples, feed_first, feed_last, after, level, level_seconds)
    messages = last - first
    return IngestResult(
        messages * fleet.series / elapsed, messages / elapsed, elapsed, messages, cpu, lag
    )


class PacedIngest:
    """Samples published at a steady rate; while `recording`, each sample's lag from its
    JetStream publish ack to the ledger's commit (the consumer's ack floor passing it)."""

    def __init__(self, nc: Client, fleet: Fleet) -> None:
        self.fleet = fleet
        self.floor = AckFloor(nc, fleet.prefix)
        self.pub = Window(nc.jetstream(), 64)
        self.acked_at: dict[int, float] = {}
        self.lags: list[float] = []
        self.recording = False
        self._queue: list[tuple[str, bytes, dict[str, str]]] = []
        self._polling: asyncio.Task[None] | None = None

    def _on_ack(self, seq: int, t: float) -> None:
        if not self.recording:
            return
        if seq <= self.floor.seq:
            self.lags.append(0.0)  # committed before its publish ack reached us
        else:
            self.acked_at[seq] = t

    async def _publish_one(self) -> None:
        if not self._queue:
            self._queue.extend(reversed(self.fleet.messages()))
        subject, body, headers = self._queue.pop()
        await self.pub.publish(subject, body, headers, on_ack=self._on_ack)

    async def _poll(self) -> None:
        # Every 10 ms: the lag is exact to within one poll plus one consumer-info round trip.
        while self.recording or self.acked_at:
            seq = await self.floor.read()
            now = time.perf_counter()
            for s in [s for s in self.acked_at if s <= seq]:
                self.lags.append(now - self.acked_at.pop(s))
            await asyncio.sleep(0.01)

    async def record(self) -> None:
        """Start recording lags (from the samples published from now on)."""
        await self.floor.read()
        self.recording = True
        self._polling = asyncio.create_task(self._poll())

    async def stop_recording(self) -> list[float]:
        """Stop recording; wait for the samples already published to commit; their lags."""
        self.recording = False
        if self._polling is not None:
            await asyncio.wait_for(self._polling, 120)
            self._polling = None
        return self.lags

    async def run(self, msgs_per_s: float, seconds: float) -> None:
        """Publish at `msgs_per_s` for `seconds`, then wait for every JetStream ack."""
        await paced(msgs_per_s, seconds, self._publish_one)
        await self.pub.drain()


async def ingest_lag(
    nc: Client, fleet: Fleet, progress: Progress, *, msgs_per_s: float, seconds: float
) -> list[float]:
    """P2 on its own: the lag of every sample published at `msgs_per_s` for `seconds`."""
    ingest = PacedIngest(nc, fleet)
    task = progress.add_task(f"P2 lag at {msgs_per_s:,.1f} msgs/s", total=seconds)
    await ingest.record()
    running = asyncio.create_task(ingest.run(msgs_per_s, seconds))
    t0 = time.perf_counter()
    while not running.done():
        progress.update(task, completed=min(time.perf_counter() - t0, seconds))
        await asyncio.sleep(0.25)
    await running
    progress.update(task, completed=seconds)
    return await ingest.stop_recording()


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
    ingest = PacedIngest(nc, fleet)
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
        await ingest.record()
        running = asyncio.create_task(ingest.run(msgs_per_s, 3 * seconds))
        await asyncio.sleep(seconds)  # P2: the samples' lags are recorded meanwhile
        lags_done = asyncio.create_task(ingest.stop_recording())
        progress.update(task, completed=1)
        await paced(check_rate, seconds, over_nats)
        progress.update(task, completed=2)
        await paced(check_rate, seconds, over_http)
        progress.update(task, completed=3)
        await running
    finally:
        await http.close()
    lags = await lags_done
    return HalfRateResult(lags, nats_lat, http_lat, denied, msgs_per_s, check_rate)
