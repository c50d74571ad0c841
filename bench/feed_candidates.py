"""The usage feed's candidate designs side by side, on one embedded nats-server (issue 13).

    .venv/bin/python -m bench.feed_candidates [--events 60000] [--rounds 2]

Every candidate publishes the same committed events (P1-shaped: 20 subjects, ledger
batches of 10,000 events) to its own file-storage stream with `sync_interval: always`, as
the bench's and `tollgate up`'s server runs, and waits for every JetStream ack:

(a) per-event: one `tollgate.usage_recorded.v1` message per event, 500 acks outstanding
    (the feed before issue 13);
(b) atomic batch: the same per-event messages in JetStream atomic batches (ADR-50,
    `allow_atomic: true`) of at most 1000 messages, `Nats-Batch-Id` / `Nats-Batch-Sequence`
    / `Nats-Batch-Commit` headers, one request to open a batch and one to commit it,
    up to 8 batches in flight (the server allows 50 per stream);
(c) envelope: `tollgate.usage_batch.v1` per (ledger batch, subject, <= 1000 events /
    512 KiB), every envelope of a round in flight (the feed after issue 13).

Also: the CPU to build the messages (the ledger's process pays it), and decoding one
envelope of 1000 events with pydantic against msgspec (the policy pays that).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING

import nats
from nats.aio.client import Client

from tollgate.embedded import EmbeddedNats

if TYPE_CHECKING:
    from services.ledger.feed import FeedBatch

SUBJECTS = 20
BATCH_EVENTS = 10_000
BUILD_A = 0.0  # CPU per event to build the per-event messages (us)
ENCODE_C = 0.0  # CPU to encode the envelopes' events (s)
METRICS = ("cpu.used.seconds", "net.tx.wan.bytes", "log.bytes", "mem.used.byte_seconds")


def make_batches(total: int) -> list[FeedBatch]:
    """Committed ledger batches of P1's shape, seqs grouped by subject within each."""
    from services.ledger.feed import FeedBatch, FeedEvent, encode_event

    start = datetime.now(UTC) - timedelta(hours=1)
    out, seq = [], 1
    for b in range(1, total // BATCH_EVENTS + 1):
        rows = sorted(
            ((f"user{(h * 7 + i) % SUBJECTS}", h, i) for h in range(100) for i in range(100)),
            key=lambda r: r[0],
        )
        subjects, events = [], []
        for subject, h, i in rows:
            at = start + timedelta(seconds=10 * b)
            subjects.append(subject)
            delta = "10.25" if i % 4 in (0, 3) else "1000"
            event = FeedEvent(
                seq, f"node{h}", "bench", f"node{h}-w{i // 4}", METRICS[i % 4], delta, at,
                window_start=at - timedelta(seconds=10), received_at=at, sampled_at=at,
            )  # fmt: skip
            events.append(event)
            seq += 1
        t0 = time.process_time()
        encoded = [encode_event(e) for e in events]
        global ENCODE_C  # one figure for the report
        ENCODE_C += time.process_time() - t0
        out.append(FeedBatch(b, f"{b:064x}", start, events[0].seq, subjects, encoded))
    return out


def per_event_messages(batches: list[FeedBatch]) -> list[tuple[str, bytes, str]]:
    """(subject, body, msg id) of today's feed: one UsageRecorded per event, via pydantic."""
    from contracts.usage import UsageBatchEvent, UsageRecorded

    parsed = [
        (b, subject, UsageBatchEvent.model_validate_json(data))
        for b in batches
        for subject, data in zip(b.subjects, b.events, strict=True)
    ]
    t0 = time.process_time()
    out = []
    for b, subject, e in parsed:
        body = UsageRecorded(
            **dict(e), subject=subject, recorded_at=b.recorded_at, batch_hash=b.batch_hash
        ).to_json()
        out.append((f"feedbench.a.{subject}", body, f"usage:{e.seq}"))
    global BUILD_A  # one figure for the report
    BUILD_A = (time.process_time() - t0) / max(len(out), 1) * 1e6
    return out


async def create_stream(nc: Client, name: str, subject: str, atomic: bool = False) -> None:
    """Through the JS API's JSON, so `allow_atomic` gets there whatever nats-py knows."""
    config = {
        "name": name, "subjects": [subject], "storage": "file", "retention": "limits",
        "duplicate_window": 120 * 10**9, "num_replicas": 1,
    }  # fmt: skip
    if atomic:
        config["allow_atomic"] = True
    reply = await nc.request(f"$JS.API.STREAM.CREATE.{name}", json.dumps(config).encode(), 10)
    answer = json.loads(reply.data)
    if "error" in answer:
        raise RuntimeError(f"stream {name}: {answer['error']}")
    if atomic and not answer["config"].get("allow_atomic"):
        raise RuntimeError("this nats-server does not keep allow_atomic")


async def per_event(nc: Client, msgs: list[tuple[str, bytes, str]]) -> None:
    js = nc.jetstream()
    for i in range(0, len(msgs), 500):
        acks = await asyncio.gather(
            *(js.publish(s, b, headers={"Nats-Msg-Id": m}) for s, b, m in msgs[i : i + 500])
        )
        assert all(a.seq for a in acks)


async def atomic_batches(nc: Client, msgs: list[tuple[str, bytes, str]]) -> None:
    def check(data: bytes, count: int | None = None) -> None:
        if data:
            answer = json.loads(data)
            if "error" in answer or (count is not None and answer.get("count") != count):
                raise RuntimeError(f"atomic batch refused: {answer}")

    async def one(chunk: list[tuple[str, bytes, str]]) -> None:
        batch_id = uuid.uuid4().hex
        last = len(chunk)
        for n, (subject, body, msg_id) in enumerate(chunk, 1):
            headers = {"Nats-Batch-Id": batch_id, "Nats-Batch-Sequence": str(n),
                       "Nats-Msg-Id": msg_id}  # fmt: skip
            if n == last:
                headers["Nats-Batch-Commit"] = "1"
                reply = await nc.request(subject, body, 10, headers=headers)
                check(reply.data, last)
            elif n == 1:  # the server answers the opening message: the batch is there
                check((await nc.request(subject, body, 10, headers=headers)).data)
            else:
                await nc.publish(subject, body, headers=headers)

    chunks = [msgs[i : i + 1000] for i in range(0, len(msgs), 1000)]
    slots = asyncio.Semaphore(8)

    async def bounded(chunk: list[tuple[str, bytes, str]]) -> None:
        async with slots:
            await one(chunk)

    await asyncio.gather(*(bounded(c) for c in chunks))


async def envelope_feed(nc: Client, batches: list[FeedBatch]) -> None:
    from services.ledger.feed import envelopes

    js = nc.jetstream()
    for b in batches:
        envs = list(envelopes(b, "feedbench.c"))
        acks = await asyncio.gather(
            *(
                js.publish(f"feedbench.c.{e.subject}", e.body, headers={"Nats-Msg-Id": e.msg_id})
                for e in envs
            )
        )
        assert all(a.seq for a in acks)


async def timed(what: Callable[[], Awaitable[None]]) -> float:
    t0 = time.perf_counter()
    await what()
    return time.perf_counter() - t0


def decode_figures(batches: list[FeedBatch]) -> dict[str, float]:
    """Microseconds per event to decode a 1000-event envelope: pydantic vs msgspec."""
    from contracts.usage import UsageBatch
    from services.ledger.feed import envelopes
    from services.policy.feed import decode_envelope

    body = next(envelopes(batches[0], "x")).body
    events = len(json.loads(body)["events"])
    figures = {}
    for name, fn in (
        ("pydantic UsageBatch.model_validate_json", lambda: UsageBatch.model_validate_json(body)),
        ("msgspec decode_envelope (policy)", lambda: decode_envelope(body)),
    ):
        fn()
        t0 = time.perf_counter()
        for _ in range(20):
            fn()
        figures[name] = (time.perf_counter() - t0) / 20 / events * 1e6
    return figures


async def main(total: int, rounds: int, per_event_total: int) -> None:
    from services.ledger.feed import envelopes

    work = Path(tempfile.mkdtemp(prefix="tollgate-feedbench-"))
    server = EmbeddedNats(work / "nats").start()
    try:
        nc = await nats.connect(server.url, max_reconnect_attempts=-1)
        batches = make_batches(total)
        encode_c = ENCODE_C
        few = make_batches(per_event_total)
        msgs = per_event_messages(few)
        build_a = BUILD_A
        t0 = time.process_time()
        for b in batches:
            for _ in envelopes(b, "x"):
                pass
        build_c = (time.process_time() - t0 + encode_c) / total * 1e6
        print(f"build CPU per event: per-event messages {build_a:.1f} us, "
              f"envelopes {build_c:.2f} us (events encoded, then envelopes)")  # fmt: skip
        for name, us in decode_figures(batches).items():
            print(f"decode CPU per event, {name}: {us:.2f} us")
        results: dict[str, list[float]] = {"a": [], "b": [], "c": []}
        for r in range(rounds):
            await create_stream(nc, f"FEEDBENCH_A{r}", "feedbench.a.>")
            results["a"].append(len(msgs) / await timed(lambda: per_event(nc, msgs)))
            await nc.request(f"$JS.API.STREAM.DELETE.FEEDBENCH_A{r}", b"", 10)
            await create_stream(nc, f"FEEDBENCH_B{r}", "feedbench.a.>", atomic=True)
            results["b"].append(len(msgs) / await timed(lambda: atomic_batches(nc, msgs)))
            await nc.request(f"$JS.API.STREAM.DELETE.FEEDBENCH_B{r}", b"", 10)
            await create_stream(nc, f"FEEDBENCH_C{r}", "feedbench.c.>")
            results["c"].append(total / await timed(lambda: envelope_feed(nc, batches)))
            await nc.request(f"$JS.API.STREAM.DELETE.FEEDBENCH_C{r}", b"", 10)
        names = {
            "a": f"(a) one message per event, {len(msgs):,} events",
            "b": f"(b) atomic batches of 1000 per-event messages, {len(msgs):,} events",
            "c": f"(c) usage_batch.v1 envelopes, {total:,} events",
        }
        for key, rates in results.items():
            print(f"{names[key]}: " + ", ".join(f"{x:,.0f}" for x in rates) + " events/s")
        await nc.close()
    finally:
        server.stop()


async def live(seconds: float, backlog: int) -> None:
    """The real `tollgate ledger` and `tollgate policy` under P1's load (as fast as the ledger
    commits, `backlog` messages outstanding): how far the feed stays behind the ledger head.

    Runs on any checkout (the feed before and after issue 13): it reads only positions.
    """
    import asyncpg

    from bench import scenarios
    from bench.load import Fleet, Window
    from bench.stack import Stack, service_env, start_service
    from infra.bus import ensure_streams

    stack = Stack().start()
    services = []
    try:
        url = await stack.create_database("bench")
        config = stack.work / "quotas.yaml"
        fleet = Fleet()
        config.write_text(scenarios.quota_config(fleet))
        env = service_env(stack, "bench", config, 0)
        for name in ("ledger", "policy"):
            services.append(await start_service(name, env, stack.work / "logs"))
        nc = await nats.connect(stack.nats_url, max_reconnect_attempts=-1)
        await ensure_streams(nc.jetstream(), fleet.prefix, 20 * 60)
        pool = await asyncpg.create_pool(url, min_size=1, max_size=2)

        async def positions() -> tuple[int, int]:
            try:
                head = await pool.fetchval("SELECT last_seq FROM ledger_head WHERE id = 1")
                fed = await pool.fetchval("SELECT seq FROM feed_positions WHERE feed = 'usage'")
            except asyncpg.UndefinedTableError:  # the ledger has not migrated yet
                return 0, 0
            return int(head or 0), int(fed or 0)

        pub = Window(nc.jetstream(), 128)
        stop = asyncio.Event()

        async def publisher() -> None:
            sent = 0
            while not stop.is_set():
                head, _ = await positions()
                if sent * fleet.series - head > backlog * fleet.series:
                    await asyncio.sleep(0.02)
                    continue
                for subject, body, headers in fleet.messages():
                    await pub.publish(subject, body, headers)
                    sent += 1
            await pub.drain()

        samples: list[tuple[float, int, int]] = []
        task = asyncio.create_task(publisher())
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < seconds:
            head, fed = await positions()
            samples.append((time.perf_counter() - t0, head, fed))
            await asyncio.sleep(0.1)
        stop.set()
        await task
        end_head, end_fed = await positions()
        t_end = time.perf_counter()
        # Positions live in Postgres: nothing to wait on but polling.
        while (await positions())[1] < end_head and time.perf_counter() - t_end < 600:  # noqa: ASYNC110
            await asyncio.sleep(0.1)
        drained = time.perf_counter() - t_end
        warm = [x for x in samples if x[0] >= 10]  # the first 10 s create the series
        (ta, ha, fa), (tb, hb, fb) = warm[0], warm[-1]
        # How long the oldest event not yet on the feed has been committed (0: none waits).
        lags = []
        for t, head, fed in warm:
            waiting = next((t2 for t2, h2, _ in samples if h2 > fed), t) if head > fed else t
            lags.append(t - waiting)
        print(f"ledger {(hb - ha) / (tb - ta):,.0f} events/s, feed {(fb - fa) / (tb - ta):,.0f} "
              f"events/s over {tb - ta:.0f} s of P1-style ingest")  # fmt: skip
        print(f"feed behind the ledger head: max {max(h - f for _, h, f in warm):,} events, "
              f"max {max(lags):.2f} s, p50 {sorted(lags)[len(lags) // 2]:.2f} s")  # fmt: skip
        print(f"when ingest stopped: {end_head - end_fed:,} events not yet on the feed; "
              f"on it {drained:.1f} s later")  # fmt: skip
        await pool.close()
        await nc.close()
    finally:
        for s in services:
            await s.stop()
        stack.stop()


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000, help="events for (c)")
    parser.add_argument("--per-event", type=int, default=20_000, help="events for (a), (b)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--live", type=float, metavar="SECONDS", help="measure the real "
                        "ledger's feed lag under P1-style ingest for SECONDS instead")  # fmt: skip
    parser.add_argument("--backlog", type=int, default=3000, help="--live: messages outstanding")
    args = parser.parse_args()
    if args.live:
        asyncio.run(live(args.live, args.backlog))
    else:
        asyncio.run(main(args.events, args.rounds, args.per_event))
