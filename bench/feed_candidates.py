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
from decimal import Decimal
from pathlib import Path

import nats
from nats.aio.client import Client

from contracts.usage import UsageBatch, UsageRecorded
from services.ledger.feed import FeedBatch, FeedEvent, envelopes
from services.policy.feed import decode_envelope
from tollgate.embedded import EmbeddedNats

SUBJECTS = 20
BATCH_EVENTS = 10_000
METRICS = ("cpu.used.seconds", "net.tx.wan.bytes", "log.bytes", "mem.used.byte_seconds")


def make_batches(total: int) -> list[FeedBatch]:
    """Committed ledger batches of P1's shape, seqs grouped by subject within each."""
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
                seq, f"node{h}", "bench", f"node{h}-w{i // 4}", METRICS[i % 4], delta,
                at - timedelta(seconds=10), at, False, {}, at, at, None,
            )  # fmt: skip
            events.append(event)
            seq += 1
        out.append(
            FeedBatch(b, f"{b:064x}", start, events[0].seq, events[-1].seq, subjects, events)
        )
    return out


def per_event_messages(batches: list[FeedBatch]) -> list[tuple[str, bytes, str]]:
    """(subject, body, msg id) of today's feed: one UsageRecorded per event, via pydantic."""
    out = []
    for b in batches:
        for subject, e in zip(b.subjects, b.events, strict=True):
            body = UsageRecorded(
                seq=e.seq, recorded_at=b.recorded_at, host=e.host, epoch=e.epoch,
                subject=subject, workload=e.workload, metric=e.metric, delta=Decimal(e.delta),
                window_start=e.window_start, window_end=e.window_end, reset=e.reset,
                batch_hash=b.batch_hash, labels=e.labels, received_at=e.received_at,
                sampled_at=e.sampled_at,
            ).to_json()  # fmt: skip
            out.append((f"feedbench.a.{subject}", body, f"usage:{e.seq}"))
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
    work = Path(tempfile.mkdtemp(prefix="tollgate-feedbench-"))
    server = EmbeddedNats(work / "nats").start()
    try:
        nc = await nats.connect(server.url, max_reconnect_attempts=-1)
        batches = make_batches(total)
        few = make_batches(per_event_total)
        t0 = time.process_time()
        msgs = per_event_messages(few)
        build_a = (time.process_time() - t0) / len(msgs) * 1e6
        t0 = time.process_time()
        for b in batches:
            for _ in envelopes(b, "x"):
                pass
        build_c = (time.process_time() - t0) / total * 1e6
        print(f"build CPU per event: per-event messages {build_a:.1f} us, "
              f"envelopes {build_c:.2f} us")  # fmt: skip
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


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000, help="events for (c)")
    parser.add_argument("--per-event", type=int, default=20_000, help="events for (a), (b)")
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    asyncio.run(main(args.events, args.rounds, args.per_event))
