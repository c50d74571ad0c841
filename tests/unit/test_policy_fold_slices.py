"""Folding in slices: the event loop runs between slices, and the result is the one fold."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from decimal import Decimal

from services.policy.config import parse_config
from services.policy.live import FOLD_CHUNK, LiveState
from services.policy.source import ConfigSource
from services.policy.usage import Applied, UsageEvent, UsageState

METRICS = ("cpu.used.seconds", "log.bytes")
NOW = datetime(2026, 11, 22, 10, 30, tzinfo=UTC)
CONFIG = parse_config("""
quotas:
  - {name: cpu, metric: cpu.used.seconds, limit: 10 core*h, window: {rolling: 30d}}
""")


def live_state() -> LiveState:
    live = LiveState(ConfigSource.fixed(CONFIG), clock=lambda: NOW)
    live.usage = UsageState(minute_metrics=frozenset({"log.bytes"}))
    return live


def events(n: int, first: int = 1) -> list[UsageEvent]:
    return [
        UsageEvent(seq, f"user{seq % 3}", f"w{seq % 5}", "h", METRICS[seq % 2], Decimal(seq) / 4,
                   NOW - timedelta(minutes=seq % 90))
        for seq in range(first, first + n)
    ]  # fmt: skip


def totals(live: LiveState) -> dict[tuple[str, str], Decimal]:
    assert live.usage is not None
    return {k: b.total() for k, b in live.usage.subjects.items()}


async def test_a_batch_folded_in_slices_lets_others_run_and_counts_as_the_whole_batch() -> None:
    batch = events(10 * FOLD_CHUNK)
    whole, sliced = live_state(), live_state()
    assert whole.apply(batch) is Applied.APPLIED
    turns = 0
    folding = True

    async def other_task() -> None:
        nonlocal turns
        while folding:
            turns += 1
            await asyncio.sleep(0)

    other = asyncio.create_task(other_task())
    await asyncio.sleep(0)
    started = turns
    # A budget of zero: the loop gets a turn after every chunk.
    assert await sliced.apply_in_slices(batch, budget=0) is Applied.APPLIED
    folding = False
    await other
    assert turns - started >= 9
    assert sliced.usage is not None and whole.usage is not None
    assert sliced.usage.last_seq == whole.usage.last_seq == len(batch)
    assert totals(sliced) == totals(whole)
    assert sliced.stats.usage_events_applied == len(batch)


async def test_a_gap_stops_a_sliced_fold_where_it_is_and_a_refold_adds_nothing() -> None:
    live = live_state()
    batch = events(3 * FOLD_CHUNK) + events(FOLD_CHUNK, first=3 * FOLD_CHUNK + 2)
    assert await live.apply_in_slices(batch, budget=0) is Applied.GAP
    assert live.usage is not None and live.usage.last_seq == 3 * FOLD_CHUNK
    before = totals(live)
    assert await live.apply_in_slices(events(3 * FOLD_CHUNK), budget=0) is Applied.APPLIED
    assert totals(live) == before
    assert live.stats.usage_feed_gaps == 1
