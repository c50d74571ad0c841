"""The dstack stories: a per-workload-hour log quota and a per-workload egress quota."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from decimal import Decimal

from nats.aio.client import Client

from tests.conftest import unique, wait_until
from tests.integration.test_policy_support import Fleet, Inbox

pytest_plugins = ["tests.integration.test_policy_support"]
MB = 10**6
CONFIG = """
quotas:
  - name: log-per-workload-hour        # dstack PR 3668: 50 MB per job-hour
    metric: log.bytes
    limit: 50 MB
    window: {workload_hour: true}
    per: workload
    enforce: [terminate]
    termination: {reason: log_quota_exceeded, grace_seconds: 0}
  - name: egress-per-workload          # dstack PR 3685: outbound data transfer per job
    metric: net.tx.wan.bytes
    limit: 1 GB
    window: {lifetime: true}
    per: workload
    enforce: [terminate]
    termination: {grace_seconds: 5}
"""


async def _true(value: object) -> bool:
    return bool(value)


async def test_a_noisy_workload_is_killed_for_its_log_hour_but_a_steady_one_is_not(
    nc: Client, prefix: str, ledger, policy_for, inbox: Inbox
) -> None:
    user, node = unique("dev"), Fleet(nc, prefix, unique("gpu"))
    await policy_for(CONFIG)
    now = datetime.now(UTC)
    # Steady: 40 MB in its first hour and 40 MB in its second, never 50 in one hour.
    steady, steady_start = unique("train-"), now - timedelta(minutes=90)
    await node.started(user, steady, steady_start)
    await node.sample(steady_start + timedelta(minutes=50), (user, steady, "log.bytes", 40 * MB))
    await node.sample(steady_start + timedelta(minutes=80), (user, steady, "log.bytes", 80 * MB))
    # Noisy: 55 MB within twenty minutes of starting.
    noisy, noisy_start = unique("train-"), now - timedelta(minutes=20)
    await node.started(user, noisy, noisy_start)
    for minutes, mb in ((5, 10), (10, 30), (19, 55)):
        await node.sample(
            noisy_start + timedelta(minutes=minutes), (user, noisy, "log.bytes", mb * MB)
        )

    await wait_until(lambda: _true(inbox.terminations(noisy)), what="the noisy workload killed")
    (command,) = inbox.terminations(noisy)
    assert command["reason"] == "log_quota_exceeded"
    assert Decimal(command["grace_seconds"]) == 0
    assert (command["used"], command["limit"]) == (str(55 * MB), str(50 * MB))
    # Usage is folded in ledger order, so the steady workload's was decided on first.
    assert inbox.terminations(steady) == []


async def test_a_per_workload_egress_quota_kills_only_the_workload_that_went_over(
    nc: Client, prefix: str, ledger, policy_for, inbox: Inbox
) -> None:
    user, node = unique("dev"), Fleet(nc, prefix, unique("cpu"))
    await policy_for(CONFIG)
    now = datetime.now(UTC)
    modest, greedy = unique("job-"), unique("job-")
    await node.started(user, modest, now - timedelta(hours=2))
    # The greedy one never announced itself: its usage alone says it runs, and where.
    await node.sample(
        now - timedelta(minutes=30),
        (user, modest, "net.tx.wan.bytes", 600 * MB),
        (user, greedy, "net.tx.wan.bytes", 700 * MB),
    )
    await node.sample(
        now,
        (user, modest, "net.tx.wan.bytes", 900 * MB),
        (user, greedy, "net.tx.wan.bytes", 1_200 * MB),
    )
    await wait_until(lambda: _true(inbox.terminations(greedy)), what="the greedy job killed")
    (command,) = inbox.terminations(greedy)
    assert command["reason"] == "data_transfer_quota_exceeded"
    assert command["quota"] == "egress-per-workload"
    assert Decimal(command["grace_seconds"]) == 5
    assert inbox.terminations(modest) == []
    assert [s for s, _ in inbox.commands if ".terminate." in s] == [
        f"{prefix}.v1.commands.terminate.{node.host}"
    ]
