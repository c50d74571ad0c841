"""The usage feed as the policy consumes it: by ledger seq, once, whatever JetStream delivers.

No ledger runs here, so the ledger table is empty and cannot fill gaps: what the policy
knows comes from the feed messages the test publishes itself.
"""

from __future__ import annotations

from datetime import UTC, datetime
from decimal import Decimal

from nats.aio.client import Client

from contracts.spawn import SpawnRequest
from contracts.usage import UsageRecorded, usage_subject
from tests.conftest import unique, wait_until
from tests.integration.test_policy_support import GIB_HOUR, spawn

pytest_plugins = ["tests.integration.test_policy_support"]
CONFIG = """
quotas:
  - {name: memory, metric: mem.alloc.byte_seconds, limit: 100 GiB*h, window: {rolling: 7d}}
"""


async def test_feed_events_count_once_in_seq_order_across_duplicates_and_gaps(
    nc: Client, prefix: str, policy_for
) -> None:
    alice = unique("alice")
    policy = await policy_for(CONFIG)
    js = nc.jetstream()

    async def publish(seq: int, gib_hours: str, msg_id: str | None = None) -> None:
        event = UsageRecorded(
            seq=seq, recorded_at=datetime.now(UTC), host="node-1", epoch="e1", subject=alice,
            workload="nb", metric="mem.alloc.byte_seconds",
            delta=Decimal(gib_hours) * GIB_HOUR, window_end=datetime.now(UTC),
            batch_hash="0" * 64,
        )  # fmt: skip
        await js.publish(
            usage_subject(alice, prefix), event.to_json(),
            headers={"Nats-Msg-Id": msg_id or f"usage:{seq}"},
        )  # fmt: skip

    async def used_is(gib_hours: str) -> bool:
        (status,) = (await spawn(nc, prefix, SpawnRequest(subject=alice))).quotas
        return status.used == Decimal(gib_hours)

    await publish(1, "1")
    await publish(2, "2")
    await publish(2, "2", msg_id="usage:2:replayed")  # past JetStream's dedupe: seq drops it
    await publish(4, "4")  # 3 is missing, and the ledger cannot supply it

    async def held_back() -> bool:
        return policy.service.live.stats.usage_feed_gaps >= 1 and await used_is("3")

    await wait_until(held_back, what="seq 1 and 2 counted once, 4 held back at the gap")
    await publish(3, "3")  # the missing event arrives; 4 is redelivered after it
    await publish(5, "0.5")
    await wait_until(lambda: used_is("10.5"), what="1..5 counted once each")
    assert policy.service.live.usage is not None
    assert policy.service.live.usage.last_seq == 5
