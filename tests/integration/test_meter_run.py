"""`tollgate run` stopped by Tollgate: a termination command for its workload, obeyed with
SIGTERM, the command's grace and SIGKILL; and dstack's hourly log quota, enforced locally."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from decimal import Decimal

import asyncpg
import pytest
from nats.aio.client import Client

import tests.integration.test_run as run_tests
from contracts.commands import TerminateWorkload, terminate_subject
from contracts.workloads import workloads_stream
from services.ledger.app import LedgerService
from tests.conftest import unique
from tests.integration.conftest import total
from tests.integration.test_run import Runs, final_series, python, stream_messages

env, runs = run_tests.env, run_tests.runs  # the fixtures `tollgate run` tests use


POLITE = """
import signal, sys, time
signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""
STUBBORN = """
import signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)
print("ready", flush=True)
while True:
    time.sleep(0.05)
"""


def terminate_order(workload: str, subject: str, grace: str) -> TerminateWorkload:
    return TerminateWorkload(
        command_id=unique("cmd"), workload=workload, subject=subject,
        reason="compute_quota_exceeded", quota="compute-30d", metric="cpu.used.seconds",
        used=Decimal("12"), limit=Decimal("10"), grace_seconds=Decimal(grace),
        decided_at=datetime.now(UTC),
    )  # fmt: skip


@pytest.mark.parametrize(
    ("script", "grace", "status", "signal_name"),
    [(POLITE, "5", 128 + 15, b"SIGTERM"), (STUBBORN, "0.4", 128 + 9, b"SIGKILL")],
    ids=["honours-sigterm", "ignores-sigterm"],
)
async def test_a_termination_command_stops_the_run_and_it_says_why(
    script: str, grace: str, status: int, signal_name: bytes,
    runs: Runs, nc: Client, prefix: str, pool: asyncpg.Pool, ledger: LedgerService,
) -> None:  # fmt: skip
    alice, workload, host = unique("alice"), unique("w"), unique("h")
    proc = await runs.start(
        "-s", alice, "--workload", workload, "--host", host, "--interval", "0.2",
        "--", *python(script),
    )  # fmt: skip
    assert proc.stdout is not None
    assert await asyncio.wait_for(proc.stdout.readline(), 20) == b"ready\n"
    js = nc.jetstream()
    for order in (
        terminate_order(unique("other"), alice, "0"),
        terminate_order(workload, alice, grace),
    ):
        await js.publish(terminate_subject(host, prefix), order.to_json(),
                         headers={"Nats-Msg-Id": order.command_id})  # fmt: skip
    sent = time.monotonic()
    _, err = await asyncio.wait_for(proc.communicate(), 30)
    took = time.monotonic() - sent
    assert proc.returncode == status, err
    said = [line for line in err.splitlines() if b"terminated" in line]
    assert said == [
        b"tollgate: terminated (compute_quota_exceeded) with " + signal_name
        + b": quota compute-30d: cpu.used.seconds used 12 of 10"
    ]  # fmt: skip
    assert (took >= float(grace)) if signal_name == b"SIGKILL" else (took < float(grace))
    series = await final_series(pool, workload)
    assert series["log.bytes"]["high"] == len(b"ready\n")
    stops = [e for e in await stream_messages(nc, workloads_stream(prefix))
             if e["schema"] == "tollgate.workload_stopped.v1"]  # fmt: skip
    assert [(e["exit_status"], e["termination_reason"]) for e in stops] == [
        (status, "compute_quota_exceeded")
    ]


CHATTY = """
import sys, time
line = b"\\x1b[32m" + b"x" * 999 + b"\\x1b[0m\\n"
while True:
    sys.stdout.buffer.write(line)
    sys.stdout.flush()
    time.sleep(0.001)
"""


async def test_a_run_over_its_hourly_log_quota_is_killed_at_once(
    runs: Runs, nc: Client, prefix: str, pool: asyncpg.Pool, ledger: LedgerService
) -> None:
    alice, workload = unique("alice"), unique("w")
    ran = await runs.run(
        "-s", alice, "--workload", workload, "--host", unique("h"),
        "--log-quota-per-hour", "20KB", "--", *python(CHATTY),
    )  # fmt: skip
    assert ran.status == 128 + 9, ran.stderr
    assert b"terminated (log_quota_exceeded) with SIGKILL" in ran.stderr
    await final_series(pool, workload)
    logged = await total(pool, alice, "log.bytes")
    # Killed on the pipe read that crossed 20 000 visible bytes; what was already in the
    # pipe (at most two reads more) still counts.
    assert 20_000 < logged <= 20_000 + 3 * 65_536
    assert logged % 1000 == 0  # whole visible lines: the colour codes are not counted
    stops = [e for e in await stream_messages(nc, workloads_stream(prefix))
             if e["schema"] == "tollgate.workload_stopped.v1"]  # fmt: skip
    assert [e["termination_reason"] for e in stops] == ["log_quota_exceeded"]
