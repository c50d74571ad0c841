"""The meter's command and notice handlers on FastStream's in-memory broker: typed by the
contract, each command once, unreadable messages logged and never handed over."""

from __future__ import annotations

import logging
from decimal import Decimal

import pytest
from faststream.nats import TestNatsBroker

from contracts._base import utcnow
from contracts.commands import TerminateWorkload, commands_stream, terminate_subject
from contracts.notice import Notice, TerminationCancelled, TerminationScheduled, notice_subject
from services.meter.commands import CommandListener, NoticeListener
from services.meter.publisher import MeterLink

PREFIX, HOST = "t", "h1"


def _command(command_id: str) -> TerminateWorkload:
    return TerminateWorkload(
        command_id=command_id, workload="w1", subject="alice", reason="log_quota_exceeded",
        quota="logs", metric="log.bytes", used=Decimal("2.5"), limit=Decimal(1),
        grace_seconds=Decimal(0), decided_at=utcnow(),
    )  # fmt: skip


async def test_each_command_is_handled_once_and_typed(caplog: pytest.LogCaptureFixture) -> None:
    link = MeterLink("nats://127.0.0.1:1", "unit", prefix=PREFIX)  # never connects
    got: list[TerminateWorkload] = []

    async def handle(command: TerminateWorkload) -> None:
        got.append(command)

    CommandListener(link, PREFIX, HOST, handle)
    subject, stream = terminate_subject(HOST, PREFIX), commands_stream(PREFIX)
    with caplog.at_level(logging.INFO, "tollgate.meter"):
        async with TestNatsBroker(link.broker) as test:
            await test.publish(_command("c1"), subject, stream=stream)
            await test.publish(_command("c1"), subject, stream=stream)  # the policy repeats
            await test.publish({"schema": "tollgate.terminate_workload.v1"}, subject, stream=stream)
            await test.publish(_command("c2"), subject, stream=stream)
    assert [c.command_id for c in got] == ["c1", "c2"]
    assert got[0].used == Decimal("2.5")
    assert "already carried out" in caplog.text
    assert f"ignoring a message on {subject}" in caplog.text and "command_id" in caplog.text


async def test_notices_of_both_kinds_reach_the_handler() -> None:
    link = MeterLink("nats://127.0.0.1:1", "unit", prefix=PREFIX)
    got: list[Notice] = []

    async def handle(notice: Notice) -> None:
        got.append(notice)

    NoticeListener(link, PREFIX, HOST, handle)
    now = utcnow()
    scheduled = TerminationScheduled(
        notice_id="n1", command_id="c1", workload="w1", host=HOST, subject="alice",
        quota="logs", metric="log.bytes", used=Decimal(2), limit=Decimal(1), unit="B",
        terminate_at=now, reason="log_quota_exceeded", message="stops soon", decided_at=now,
    )  # fmt: skip
    cancelled = TerminationCancelled(
        notice_id="n1", workload="w1", host=HOST, subject="alice", quota="logs",
        terminate_at=now, why="grant", message="no longer", decided_at=now,
    )  # fmt: skip
    async with TestNatsBroker(link.broker) as test:
        for notice in (scheduled, cancelled, scheduled):
            await test.publish(notice, notice_subject(HOST, PREFIX), stream=commands_stream(PREFIX))
    assert [type(n).__name__ for n in got] == ["TerminationScheduled", "TerminationCancelled"]
