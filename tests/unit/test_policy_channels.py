"""The policy's channels on FastStream's in-memory broker: typed spawn checks, error replies."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any, cast

from faststream.nats import TestNatsBroker

from contracts.grants import GrantRevoked, grants_subject
from contracts.spawn import SpawnDecision, SpawnRequest, spawn_check_subject
from infra.broker import TollgateBroker
from services.policy.app import PolicyChannels
from services.policy.config import parse_config
from services.policy.handlers import SpawnChecker
from services.policy.journal import DecisionJournal
from services.policy.live import LiveState
from services.policy.records import DecisionRecord
from services.policy.source import ConfigSource
from services.policy.usage import UsageState

NOW = datetime(2026, 11, 22, 10, 30, tzinfo=UTC)
PREFIX = "tchan"
CONFIG = parse_config("""
quotas:
  - {name: cpu, metric: cpu.alloc.seconds, limit: 1 core*h, window: {rolling: 30d},
     enforce: [spawn]}
""")


class Kept:
    """A journal that keeps what it is given (the real one writes it to Postgres)."""

    def __init__(self) -> None:
        self.records: list[DecisionRecord] = []

    def add(self, record: DecisionRecord) -> None:
        self.records.append(record)

    def learn(self, subject: str, groups: Sequence[str], source: str, at: datetime) -> None:
        pass


def channels(serving: bool = True, cue: asyncio.Event | None = None) -> tuple[TollgateBroker, Kept]:
    broker = TollgateBroker(name="policy-test")
    live = LiveState(ConfigSource.fixed(CONFIG), clock=lambda: NOW)
    live.usage, live.fresh_at = UsageState(), NOW
    journal = Kept()
    made = PolicyChannels(broker, PREFIX)
    if serving:
        made.serve(SpawnChecker(live, cast(DecisionJournal, journal)), cue)
    return broker, journal


async def ask(test: Any, body: object) -> dict[str, Any]:
    reply = await test.request(body, spawn_check_subject(PREFIX))
    return cast(dict[str, Any], await reply.decode())


async def test_a_spawn_check_is_decided_and_journaled_by_the_typed_handler() -> None:
    broker, journal = channels()
    async with TestNatsBroker(broker) as test:
        fits = await ask(test, SpawnRequest(subject="alice", resources={"cpus": 1},
                                            expected_seconds=1800))  # fmt: skip
        too_big = await ask(test, SpawnRequest(subject="alice", resources={"cpus": 4},
                                               expected_seconds=3600))  # fmt: skip
    assert SpawnDecision.model_validate(fits).allowed
    refused = SpawnDecision.model_validate(too_big)
    assert not refused.allowed and refused.reason == "quota_insufficient"
    assert [r.decision_id for r in journal.records] == [fits["decision_id"], refused.decision_id]


async def test_a_bad_check_is_answered_with_the_field_to_fix() -> None:
    broker, journal = channels()
    async with TestNatsBroker(broker) as test:
        bad = await ask(test, {"subject": "alice", "expected_seconds": "soon"})
    assert bad["schema"] == "tollgate.error.v1" and bad["field"] == "expected_seconds"
    assert journal.records == []


async def test_checks_before_the_service_is_wired_get_an_error_not_silence() -> None:
    broker, _ = channels(serving=False)
    async with TestNatsBroker(broker) as test:
        early = await ask(test, SpawnRequest(subject="alice"))
    assert early["schema"] == "tollgate.error.v1" and early["error"] == "internal_error"


async def test_a_published_grant_record_cues_the_policy_to_read_the_record() -> None:
    cue = asyncio.Event()
    broker, _ = channels(cue=cue)
    revoked = GrantRevoked(
        seq=2, grant_id="g-1", scope="subject", target="alice", quota="cpu", revoked_by="admin",
        revoked_at=NOW, reason="done", hash="0" * 64,
    )  # fmt: skip
    async with TestNatsBroker(broker) as test:
        await test.publish(revoked, grants_subject("subject", "alice", PREFIX))
    assert cue.is_set()
